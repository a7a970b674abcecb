"""`fluxion serve --ray`: run the Serve application (ray_app) on a local Ray instance started here, or on a running
cluster (--ray-address), until SIGINT or SIGTERM; then Serve and a local Ray are shut down."""

import logging
import os
import signal
import threading

from ..errors import InputError
from .config import ServerConfig

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # jobs carry prompts and encoded images: a small store is plenty
PASSED_ENV = ("FLUXION_", "HF_", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")  # what the replicas must see as we do


def check_deployment(replicas: int, num_gpus: float, replica_cpus: float) -> None:
    if replicas < 1 or num_gpus < 0 or replica_cpus < 0:
        raise InputError("--replicas must be at least 1; --num-gpus and --replica-cpus at least 0")


def serve_ray(config: ServerConfig, *, replicas: int = 1, num_gpus: float = 0.0, replica_cpus: float = 1.0,
              address: str | None = None, num_cpus: int | None = None) -> None:
    check_deployment(replicas, num_gpus, replica_cpus)  # before importing Ray, which takes seconds
    try:
        import ray
        from ray import serve

        from .ray_app import build_app
    except ImportError as e:
        raise InputError(f"--ray needs Ray Serve: pip install 'fluxion[ray]' ({e})") from None
    application = build_app(config, replicas, num_gpus, replica_cpus)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home unless asked for
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
    local = {"num_cpus": num_cpus, "object_store_memory": LOCAL_OBJECT_STORE_BYTES} if not address else {}
    ray.init(address=address or "local", include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=config.log_level in ("info", "debug"), **local)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own: the clean-up must run
        signal.signal(sig, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application, name="fluxion", route_prefix="/")
        print(f"fluxion serve --ray: ready, {replicas} renderer replica(s)", flush=True)
        while not stopping.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
