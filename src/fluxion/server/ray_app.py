"""Ray Serve scale-out: the whole HTTP API (create_app: OpenAI, BFL, jobs, files, the page, /healthz, /metrics) in
one gateway deployment, its jobs rendered by N renderer replicas (a GPU each with num_gpus=1).

- Gateway (1 replica, `@serve.ingress`): the FastAPI app over a RayEngine, which keeps the SQLite job store (so
  polling, idempotency and kill -9 recovery work as in `fluxion serve`) and sends each job to the renderers.
- Renderer (N replicas): `@serve.multiplexed` holds pipelines by model id (model + adapter set, ray_engine.model_id)
  so the router sends a job to a replica that already holds its model and adapters; `@serve.batch` gathers the jobs
  that reach a replica, which are grouped by JobSpec.batch_key and run by batching.render_group, so every image is
  bit-identical to a lone pipeline call.

    fluxion serve --ray --replicas 2 --num-gpus 1               # starts Ray on this machine (or --ray-address)
    serve run deploy/ray-serve.yaml                              # import path fluxion.server.ray_app:app_builder
"""

import asyncio
import dataclasses
import logging
from functools import partial

from ray import serve

from ..errors import InputError
from .app import create_app
from .batching import BATCH_INVARIANT_CACHES, render_group
from .config import ServerConfig
from .errors import input_error
from .loras import AdapterCache
from .models import ModelPool, load_pipeline
from .outputs import encode
from .ray_engine import RayEngine, model_id
from .ray_run import check_deployment
from .specs import JobSpec

log = logging.getLogger(__name__)


def build_app(config: ServerConfig, replicas: int = 1, num_gpus: float = 0.0, replica_cpus: float = 1.0,
              gateway_resources: dict | None = None):
    """The Serve application: `serve.run(build_app(config, 2), route_prefix="/")`. gateway_resources (custom Ray
    resources, e.g. {"fluxion-gateway": 0.01}) pins the gateway, and so its job store, to the node that has them."""
    check_deployment(replicas, num_gpus, replica_cpus)
    # replicas may run in another folder (or on another node): paths must not depend on the caller's
    config = dataclasses.replace(config, data_dir=config.data_dir.resolve(), adapters_dir=config.adapters_dir.resolve())
    renderer = _renderer(config, replicas, num_gpus, replica_cpus).bind(config)
    return _gateway(config, gateway_resources or {}).bind(config, renderer, replicas)


def app_builder(args: dict):
    """For `serve run` (a config file's import_path, or `serve run fluxion.server.ray_app:app_builder k=v ...`):
    `replicas`, `num_gpus`, `replica_cpus`, `gateway_resources` and ServerConfig's fields (models, data_dir,
    max_batch, api_keys...)."""
    args = dict(args or {})
    deployment = {k: type_(args.pop(k)) for k, type_ in (("replicas", int), ("num_gpus", float),
                                                         ("replica_cpus", float), ("gateway_resources", dict))
                  if k in args}
    return build_app(ServerConfig(**_from_text(args)), **deployment)


def _from_text(args: dict) -> dict:
    """`serve run ... k=v` gives every value as text: read them as the types of ServerConfig's defaults."""
    defaults = ServerConfig()
    out = {}
    for key, value in args.items():
        default = getattr(defaults, key, None)
        if isinstance(value, str) and not isinstance(default, str):
            if isinstance(default, bool):
                value = value.lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float)):
                value = type(default)(value)
            elif isinstance(default, list):  # models=tiny-schnell,tiny-dev
                value = value.split(",")
        out[key] = value
    return out


def _gateway(config: ServerConfig, resources: dict):
    # sync requests wait for their images: the gateway must take as many at once as the queue holds
    @serve.deployment(name="FluxionGateway", num_replicas=1, max_ongoing_requests=config.queue_size + 64,
                      ray_actor_options={"num_cpus": 0, "resources": resources})
    @serve.ingress()
    class Gateway:
        """One replica: the job store is one SQLite file (see the README on running it on several nodes)."""

        def __init__(self, config: ServerConfig, renderer, replicas: int):
            # enough jobs out to fill two batches per replica: one running, one gathering
            self.engine = RayEngine(config, renderer, max_inflight=2 * replicas * config.max_batch)

        def __serve_build_asgi_app__(self):
            return create_app(self.engine.config, self.engine)

    return Gateway


def _images(request: dict) -> int:
    return len(request["spec"]["seeds"])


def _renderer(config: ServerConfig, replicas: int, num_gpus: float, replica_cpus: float):
    max_batch = config.max_batch
    one_job_per_group = bool(config.cache) and config.cache.split(":")[0] not in BATCH_INVARIANT_CACHES

    @serve.deployment(name="FluxionRenderer", num_replicas=replicas, max_ongoing_requests=2 * max_batch,
                      ray_actor_options={"num_cpus": replica_cpus, "num_gpus": num_gpus})
    class Renderer:
        async def __init__(self, config: ServerConfig):
            self.config = config
            self.name = serve.get_replica_context().replica_tag
            loader = partial(load_pipeline, device=config.device, dtype=config.dtype, quantize=config.quantize)
            self.pool = ModelPool(config.models, config.model_cache_size, loader)
            self.adapters = AdapterCache(config.lora_cache_size)
            self._loras: list[dict] = []  # the adapters of the model id `hold` is loading
            if config.preload:  # held (and so announced to the router) before the first request
                await self.hold(config.models[0])

        @serve.multiplexed(max_num_models_per_replica=config.model_cache_size + config.lora_cache_size)
        async def hold(self, held_id: str) -> str:
            """Load the model and adapters of `held_id`; Serve then routes that id here first. Serve's LRU of ids
            only steers routing: the pipelines and adapters have their own LRUs (ModelPool, AdapterCache)."""
            pipe = await asyncio.to_thread(self.pool.get, held_id.split("+")[0])
            if self._loras:
                await asyncio.to_thread(self.adapters.activate, pipe, self._loras)
            return held_id

        # a job of more images than max_batch counts as max_batch: it runs alone (the pipeline splits it to fit)
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=config.batch_wait_ms / 1000,
                     batch_size_fn=lambda requests: sum(min(_images(r), max_batch) for r in requests))
        async def render(self, requests: list[dict]) -> list[dict]:
            """[{"spec": JobSpec dict, "images": edit inputs or None}] -> [{"images": [encoded], "replica",
            "batch"} or {"error", "param"}], one group (render_group) per batch key, in arrival order."""
            groups: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                key = JobSpec.from_dict(request["spec"]).batch_key()
                groups.setdefault(f"{key}-{i}" if one_job_per_group else key, []).append(i)
            answers: list[dict] = [{}] * len(requests)
            for indices in groups.values():
                specs = [JobSpec.from_dict(requests[i]["spec"]) for i in indices]
                try:
                    self._loras = specs[0].loras
                    await self.hold(model_id(specs[0]))
                    blobs = await asyncio.to_thread(self._render, specs, requests[indices[0]]["images"])
                    batch = sum(spec.n for spec in specs)
                    for i, images in zip(indices, blobs):
                        answers[i] = {"images": images, "replica": self.name, "batch": batch}
                except InputError as e:  # refused by the pipeline's plan (e.g. the memory estimate)
                    error = input_error(e)
                    for i in indices:
                        answers[i] = {"error": error.message, "param": error.param}
                except Exception as e:
                    log.exception("a group of %d job(s) failed", len(indices))
                    for i in indices:
                        answers[i] = {"error": f"generation failed: {' '.join(str(e).split()) or type(e).__name__}"}
            return answers

        def _render(self, specs: list[JobSpec], images: dict | None) -> list[list[bytes]]:
            pipe = self.pool.get(specs[0].model)
            with self.adapters.use(pipe, specs[0].loras):
                outputs = render_group(pipe, specs, images=images, cache=self.config.cache)
            return [[encode(image, spec.output_format, spec.output_compression) for image in group]
                    for spec, group in zip(specs, outputs)]

    return Renderer
