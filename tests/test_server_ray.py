"""Ray Serve scale-out (fluxion.server.ray_app): `fluxion serve --ray --replicas 2` on this CPU, a local Ray of 2
CPUs started once (one test holds the whole live run: test workers must not start a Ray each). Both replicas serve,
@serve.batch forms batches, LoRA jobs route by model id, BFL polling and the page go through the gateway, every
image is the plain pipeline's bit for bit, and SIGTERM takes Ray down with the server."""

import base64
import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import pytest
from PIL import Image

from fluxion.pipeline import Pipeline
from server_fixtures import LiveServer, one_thread, wait_until  # noqa: F401  (fixture)

STEPS = 2
MAX_BATCH = 2  # each replica takes 2 * MAX_BATCH jobs at once: 8 concurrent jobs need both replicas
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "ray-serve.yaml"
INSTALL = "Ray Serve is not installed: pip install -e '.[ray]' (make install does)"


def ray_serve():
    try:
        from ray import serve
    except ImportError:
        pytest.fail(INSTALL, pytrace=False)
    return serve


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def generate(url: str, prompt: str, seed: int, **extra) -> httpx.Response:
    answer = httpx.post(url + "/v1/images/generations", timeout=120,
                        json={"prompt": prompt, "size": "64x64", "steps": STEPS, "seed": seed, **extra})
    assert answer.status_code == 200, answer.text
    return answer


def image(answer: httpx.Response, index: int = 0) -> bytes:
    return base64.b64decode(answer.json()["data"][index]["b64_json"])


def children(pid: int) -> set[int]:
    """The server's descendants (a local Ray's processes), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def test_deploy_config_and_builder():
    """The documented `serve run deploy/ray-serve.yaml` config is valid for Serve and builds the application
    (no Ray started): the replica count and GPUs per replica reach the renderer deployment."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    ray_serve()
    from fluxion.server.ray_app import _renderer, app_builder
    from fluxion.server.config import ServerConfig

    config = yaml.safe_load(DEPLOY.read_text())
    schema = ServeDeploySchema.model_validate(config)
    application = schema.applications[0]
    assert application.import_path == "fluxion.server.ray_app:app_builder"
    args = dict(application.args)
    assert app_builder({**args, "data_dir": "/tmp/fluxion-unused"}) is not None
    renderer = _renderer(ServerConfig(models=args["models"], max_batch=args["max_batch"]), args["replicas"],
                         args["num_gpus"], args["replica_cpus"])
    assert renderer.num_replicas == 2 and renderer.ray_actor_options["num_gpus"] == 1
    assert renderer.max_ongoing_requests == 2 * args["max_batch"]
    # `serve run fluxion.server.ray_app:app_builder k=v` gives text
    assert app_builder({"models": "tiny-schnell,tiny-dev", "max_batch": "4", "replicas": "3"}) is not None


class FakeRenderer:
    """A DeploymentHandle stand-in: `options(...).render.remote(request).result()` answers as Renderer does,
    after `deaths` replica deaths (RayActorError)."""

    def __init__(self, deaths: int):
        self.deaths, self.calls, self.model_ids = deaths, 0, []
        self.render = self

    def options(self, multiplexed_model_id: str):
        self.model_ids.append(multiplexed_model_id)
        return self

    def remote(self, request: dict):
        return self

    def result(self, timeout_s=None):
        from ray.exceptions import ActorDiedError

        self.calls += 1
        if self.calls <= self.deaths:
            raise ActorDiedError()
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buffer, format="PNG")
        return {"images": [buffer.getvalue()], "replica": "r1", "batch": 1}


@pytest.mark.parametrize("deaths, state", [(1, "ready"), (2, "error")])
def test_a_job_whose_replica_died_runs_once_more(tmp_path, deaths, state):
    """RayEngine without Ray: a replica's death sends the job back to the queue once; a second death fails it."""
    ray_serve()
    from fluxion.server.config import ServerConfig
    from fluxion.server.jobs import Job
    from fluxion.server.ray_engine import RayEngine
    from fluxion.server.specs import JobSpec

    renderer = FakeRenderer(deaths)
    engine = RayEngine(ServerConfig(models=["tiny-schnell"], data_dir=tmp_path), renderer, max_inflight=4)
    engine.start()
    try:
        spec = JobSpec(model="tiny-schnell", prompt="a red circle", seeds=[1], width=64, height=64, steps=2)
        job, _ = engine.submit(Job(id=Job.new_id(), api="openai", model=spec.model, spec=spec.to_dict(),
                                   batch_key=spec.batch_key(), num_images=1))
        done = wait_until(lambda: (j := engine.store.get(job.id)).finished and j, timeout=30, what="the job's end")
    finally:
        engine.stop()
    assert done.state == state and renderer.calls == 2 and renderer.model_ids == ["tiny-schnell"] * 2
    if state == "ready":
        assert done.results == [{"file": "0.png", "seed": 1, "replica": "r1", "batch": 1}]
        assert (tmp_path / "results" / job.id / "0.png").is_file()


def test_bad_replica_count_is_refused_before_ray_starts(tmp_path):
    ray_serve()
    run = subprocess.run([sys.executable, "-m", "fluxion.cli", "serve", "--ray", "--replicas", "0", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--replicas must be at least 1" in run.stderr, run.stderr


def test_two_replicas_batch_route_and_stay_bit_exact(tmp_path, one_thread):  # noqa: F811
    ray_serve()
    server = LiveServer(tmp_path / "data", "--ray", "--replicas", 2, "--ray-num-cpus", 2, "--model", "tiny-schnell",
                        "--model", "tiny-dev", "--max-batch", MAX_BATCH, "--batch-wait-ms", 200)
    ray_processes: set[int] = set()
    try:
        server.start(timeout=300)
        ray_processes = children(server.process.pid)
        assert ray_processes, "a local Ray should run under the server"
        url = server.url
        schnell, dev = Pipeline.from_pretrained("tiny-schnell"), Pipeline.from_pretrained("tiny-dev")

        # concurrent plain jobs: both replicas serve (the gateway's router may learn of the second a moment after
        # start: a few rounds), @serve.batch groups them, every image is the pipeline's
        answers, prompts, seeds = [], [], []
        for round_ in range(5):
            batch = [(f"a red circle {round_}-{i}", 50 + 10 * round_ + i) for i in range(8)]
            with ThreadPoolExecutor(len(batch)) as pool:
                answers += pool.map(lambda job: generate(url, *job), batch)
            prompts += [p for p, _ in batch]
            seeds += [s for _, s in batch]
            if len({a.headers["x-fluxion-replica"] for a in answers}) == 2:
                break
        replicas = {a.headers["x-fluxion-replica"] for a in answers}
        assert len(replicas) == 2, replicas
        jobs = [httpx.get(f"{url}/v1/jobs/{a.json()['id']}").json()["results"][0] for a in answers]
        assert [j["replica"] for j in jobs] == [a.headers["x-fluxion-replica"] for a in answers]
        assert max(j["batch"] for j in jobs) == MAX_BATCH, jobs
        for prompt, seed, answer in zip(prompts, seeds, answers):
            reference = schnell(prompt, seed=seed, height=64, width=64, num_inference_steps=STEPS)[0]
            assert np.array_equal(pixels(image(answer)), np.asarray(reference)), prompt

        # a LoRA job (model id tiny-dev+<adapter>) beside a plain one of the same model, and two images in one job
        star = generate(url, "a blue square", 7, model="tiny-dev", lora=[{"name": "star", "scale": 0.9}])
        plain = generate(url, "a blue square", 7, model="tiny-dev", n=2)
        expected = [dev("a blue square", seed=seed, height=64, width=64, num_inference_steps=STEPS)[0]
                    for seed in (7, 8)]
        assert [np.array_equal(pixels(image(plain, i)), np.asarray(expected[i])) for i in (0, 1)] == [True, True]
        dev.load_lora("star", scale=0.9)
        starred = dev("a blue square", seed=7, height=64, width=64, num_inference_steps=STEPS)[0]
        assert np.array_equal(pixels(image(star)), np.asarray(starred))

        # the rest of the API goes through the same gateway: BFL submit and poll, the signed file URL, the page
        job = httpx.post(url + "/v1/tiny-schnell", json={"prompt": prompts[0], "seed": seeds[0], "width": 64,
                                                         "height": 64, "steps": STEPS, "output_format": "png"})
        result = wait_until(lambda: (r := httpx.get(job.json()["polling_url"]).json())["status"] == "Ready" and r,
                            timeout=60, interval=0.1, what="the BFL job")
        assert httpx.get(result["result"]["sample"]).content == image(answers[0])
        assert httpx.get(url + "/").headers["content-type"].startswith("text/html")
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log.read_text()[-3000:]  # stopped by SIGTERM, not killed
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in ray_processes):
        time.sleep(0.5)
    left = [p for p in ray_processes if alive(p)]
    for pid in left:  # ours: end them, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes left after the server stopped: {left}"
