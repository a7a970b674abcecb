"""The engine of the Ray Serve gateway: the same job store, API and life cycle as Engine, but no model of its own.
Each pending job goes, alone, to the renderer deployment (ray_app.Renderer) through a DeploymentHandle, routed by
its model id (model + adapters, `@serve.multiplexed`); the replicas batch what reaches them (`@serve.batch`) and
send back encoded images, which are written and committed here exactly as Engine does."""

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from .config import ServerConfig
from .engine import Engine
from .jobs import Job
from .outputs import result_name, write_result
from .specs import JobSpec

log = logging.getLogger(__name__)


def model_id(spec: JobSpec) -> str:
    """What a replica "holds": the model and its adapters, by file hash, in order (scales change nothing loaded)."""
    return "+".join([spec.model] + [adapter["sha256"][:16] for adapter in spec.loras])


def _no_local_models(name: str):
    raise RuntimeError(f"the Ray gateway loads no model ({name}): the renderer replicas do")


class RayEngine(Engine):
    """Engine whose dispatcher sends jobs to Ray Serve replicas. At most `max_inflight` jobs are running at once
    (claimed in the store and sent): enough to fill every replica's batches, few enough that a crash of the gateway
    requeues only those."""

    def __init__(self, config: ServerConfig, renderer, max_inflight: int):
        super().__init__(dataclasses.replace(config, workers=1), loader=_no_local_models)
        self.renderer = renderer
        self.max_inflight = max_inflight
        self._inflight: set[str] = set()
        self._replica: dict[str, tuple[str, int]] = {}  # job id -> (replica, images in its batch), until written
        self._lock = threading.Lock()
        self._retried: set[str] = set()  # jobs sent again after their replica died
        self._calls = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="fluxion-ray")

    def _start_up(self) -> None:  # the replicas load the models (Serve starts them before routing to them)
        self.ready.set()
        self.notify()

    def _work(self) -> None:
        self.ready.wait()
        while not self._stop.is_set():
            with self._wake:  # claimed under the condition: a job submitted meanwhile wakes the wait below
                jobs = self._claim()
                if not jobs:
                    self._wake.wait(1.0)
                    continue
            for job in jobs:
                self._calls.submit(self._call, job)

    def _claim(self) -> list[Job]:
        with self._lock:
            free = self.max_inflight - len(self._inflight)
        if free <= 0:
            return []
        pending = self.store.pending(limit=free)
        started = set(self.store.start([job.id for job in pending])) if pending else set()
        jobs = [job for job in pending if job.id in started]
        with self._lock:
            self._inflight.update(job.id for job in jobs)
        return jobs

    def _call(self, job: Job) -> None:
        spec = JobSpec.from_dict(job.spec)
        try:
            self.hub.publish(job.id, {"type": "started"})
            request = {"spec": job.spec, "images": self._inputs(spec)}
            response = self.renderer.options(multiplexed_model_id=model_id(spec)).render.remote(request)
            answer = response.result(timeout_s=self.config.request_timeout_s)
            if self._stop.is_set():
                return  # stop() put it back in the queue: the restart runs it
            if "error" in answer:
                self._fail([job], answer["error"], answer.get("param"))
            else:  # (no batch-size metric here: the batches form on the replicas)
                self._replica[job.id] = (answer["replica"], answer["batch"])
                self._finish([job], [spec], [answer["images"]])
        except Exception as e:
            if self._replica_died(e) and job.id not in self._retried:
                self._retried.add(job.id)  # once, as after a restart: a job that kills replicas is not retried
                log.warning("job %s: its replica died (%s); queued again", job.id, type(e).__name__)
                self.store.requeue([job.id])
            elif not self._stop.is_set():
                log.exception("job %s failed on Ray", job.id)
                self._fail([job], f"generation failed: {' '.join(str(e).split()) or type(e).__name__}")
        finally:
            self._replica.pop(job.id, None)
            with self._lock:
                self._inflight.discard(job.id)
            self.notify()

    @staticmethod
    def _replica_died(error: Exception) -> bool:
        from ray.exceptions import RayActorError

        return isinstance(error, RayActorError)

    def _write(self, job: Job, spec: JobSpec, blobs: list[bytes]) -> list[dict]:
        """The replica's encoded images, written as Engine writes its own; each result names the replica (and its
        batch's size), for GET /v1/jobs/{id} and the X-Fluxion-Replica header."""
        replica, batch = self._replica.get(job.id, (None, None))
        results = []
        for i, (blob, seed) in enumerate(zip(blobs, spec.seeds)):
            name = result_name(i, spec.output_format)
            write_result(self.results_dir / job.id / name, blob)
            results.append({"file": name, "seed": seed, "replica": replica, "batch": batch})
        return results

    def stop(self, timeout: float = 10.0) -> None:
        """A clean stop puts the jobs still out on Ray back in the queue (their answers are dropped), so a restart
        runs them again without spending an attempt, as Engine does with the group it stops."""
        self._stop.set()
        with self._lock:
            inflight = list(self._inflight)
        if inflight:
            self.store.requeue(inflight)
            log.info("stopping: %d job(s) sent to Ray go back to the queue", len(inflight))
        self._calls.shutdown(wait=False, cancel_futures=True)
        super().stop(timeout)
