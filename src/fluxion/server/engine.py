"""The engine: jobs in (submit, cancel), images out. Worker threads (`workers`, 1 by default) take pending jobs
oldest first, group the compatible ones (batching.pick_group) up to `max_batch` images and run each group as one
pipeline call (batching.render_group). While requests come concurrently, the oldest waits at most `batch_wait_ms`
for companions; a lone client never waits. Images are written atomically before a job is marked ready; a cancelled
job is dropped between steps.

The HTTP layer (app.py) only submits, cancels, waits and reads; the engine can run without it."""

import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image

from ..errors import InputError
from . import jobs as states
from .batching import BATCH_INVARIANT_CACHES, GroupCancelled, StepInfo, pick_group, preview_steps, render_group
from .config import ServerConfig
from .errors import input_error
from .events import EventHub
from .jobs import GroupCommit, Job, JobStore
from .loras import AdapterCache
from .metrics import Metrics
from .models import ModelPool, load_pipeline
from .outputs import encode, result_name, write_result
from .specs import JobSpec
from .webhooks import WebhookSender

log = logging.getLogger(__name__)


# a job arriving while others wait or run means concurrent clients: for this long after, the oldest pending job
# waits up to batch_wait_ms for companions; a lone client's requests never wait
CONCURRENCY_MEMORY_S = 5.0


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"the queue is full ({depth} jobs waiting or running)")
        self.depth, self.retry_after = depth, retry_after


class Engine:
    def __init__(self, config: ServerConfig, *, loader=None, hub: EventHub | None = None,
                 metrics: Metrics | None = None):
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = config.data_dir / "results"
        self.inputs_dir = config.data_dir / "inputs"
        self.store = JobStore(config.database)
        self.commits = GroupCommit(self.store)
        self.hub = hub or EventHub()
        self.metrics = metrics or Metrics()
        loader = loader or partial(load_pipeline, device=config.device, dtype=config.dtype, quantize=config.quantize)
        self.pool = ModelPool(config.models, config.model_cache_size, loader)
        self.adapters = AdapterCache(config.lora_cache_size)
        self.webhooks = WebhookSender(self.store, config, self.webhook_payload)
        self.ready = threading.Event()  # set once the start-up (recovery, preloading) is done
        self.startup_error: str | None = None
        self.group_seconds = 1.0  # the last group's time: the base of Retry-After estimates
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._cancelled: set[str] = set()  # running jobs cancelled, noticed between steps
        self._threads: list[threading.Thread] = []
        self._dispatch = threading.Lock()  # picking and starting a group is one step, whatever the workers
        self._concurrent_at = float("-inf")  # when a job last arrived while others were queued or running
        self._writer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fluxion-write")
        self.payload_for_webhook = None  # set by the app: job -> the JSON a webhook receives

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        requeued, failed = self.store.recover()
        if requeued or failed:
            log.warning("restart: %d interrupted job(s) queued again, %d failed after a second interruption",
                        len(requeued), len(failed))
        for job_id in requeued + failed:  # a killed write leaves its temp file: the rerun writes every image anew
            shutil.rmtree(self.results_dir / job_id, ignore_errors=True)
        targets = [(self._start_up, "fluxion-start"), (self._janitor, "fluxion-janitor")]
        targets += [(self._work, f"fluxion-worker-{i}") for i in range(self.config.workers)]
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.webhooks.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.webhooks.stop()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self.commits.close()
        self._writer.shutdown(wait=True)
        self.store.close()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # -- what the HTTP layer calls ------------------------------------------------------------------------------
    def submit(self, job: Job) -> tuple[Job, bool]:
        """Commit a job, or find the one its idempotency key already made (created False); raises QueueFull."""
        if job.idempotency_key is not None:
            existing = self.store.find(job.owner, job.idempotency_key)
            if existing is not None:
                return existing, False
        counts = self.store.counts()
        depth = counts[states.PENDING] + counts[states.RUNNING]
        if depth >= self.config.queue_size:
            raise QueueFull(depth, self.retry_after())
        if depth:
            self._concurrent_at = time.monotonic()
        job, created = self.commits.submit(job).result()
        if created:
            self.notify()
        return job, created

    def cancel(self, job_id: str) -> bool:
        if not self.store.cancel(job_id):
            return False
        self._cancelled.add(job_id)  # whatever state it was in a moment ago: a worker may have just started it
        self.metrics.job_finished(states.CANCELLED)
        self.hub.publish(job_id, {"type": "end", "state": states.CANCELLED})
        return True

    def retry_after(self) -> float:
        counts = self.store.counts()
        waiting = counts["pending_images"] + counts["running_images"]
        groups = max(1.0, waiting / self.config.max_batch)
        return max(1.0, min(300.0, groups * self.group_seconds))

    def result_path(self, job_id: str, name: str) -> Path:
        return self.results_dir / job_id / name

    def webhook_payload(self, job: Job) -> dict:
        if self.payload_for_webhook is not None:
            return self.payload_for_webhook(job)
        return {"id": job.id, "status": job.state, "error": job.error}

    # -- the worker ---------------------------------------------------------------------------------------------
    def _start_up(self) -> None:
        try:
            if self.config.preload:
                self.pool.get(self.config.models[0])
        except Exception as e:  # the server still starts: jobs for this model will fail with the reason
            self.startup_error = f"model {self.config.models[0]!r} failed to load: {e}"
            log.error("%s", self.startup_error)
        self.ready.set()
        self.notify()

    def _work(self) -> None:
        self.ready.wait()
        while not self._stop.is_set():
            group = self._next_group()
            if group:
                self._run(group)

    def _next_group(self) -> list[Job]:
        """Pick and start the next group, or wait (then return []) when there is none yet, or when requests are
        arriving concurrently and the oldest may still wait for companions."""
        wait_s = self.config.batch_wait_ms / 1000.0
        data_dependent_cache = self.config.cache and self.config.cache.split(":")[0] not in BATCH_INVARIANT_CACHES
        with self._dispatch:
            pending = self.store.pending(limit=max(4 * self.config.max_batch, 64))
            if pending:
                group = pick_group(pending, self.config.max_batch, max_jobs=1 if data_dependent_cache else None)
                images = sum(job.num_images for job in group)
                remaining = pending[0].created_at + wait_s - time.time()
                busy = time.monotonic() - self._concurrent_at < CONCURRENCY_MEMORY_S
                if images >= self.config.max_batch or remaining <= 0 or data_dependent_cache or not busy:
                    started = set(self.store.start([job.id for job in group]))
                    return [job for job in group if job.id in started]
        with self._wake:  # nothing to run yet: a new job (or the wait running out) wakes us to look again
            self._wake.wait(remaining if pending else 1.0)
        return []

    def _run(self, group: list[Job]) -> None:
        start = time.perf_counter()
        specs = [JobSpec.from_dict(job.spec) for job in group]
        for job in group:
            self.hub.publish(job.id, {"type": "started"})
        try:
            pipe = self.pool.get(specs[0].model)
            with self.adapters.use(pipe, specs[0].loras):
                outputs = render_group(pipe, specs, images=self._inputs(specs[0]), cache=self.config.cache,
                                       on_step=partial(self._on_step, group, specs))
        except GroupCancelled:
            if self._stop.is_set():  # a clean shutdown: the jobs run again after the restart, attempt not spent
                self.store.requeue([job.id for job in group])
            log.info("group of %d job(s) stopped", len(group))
            outputs = None
        except InputError as e:  # refused by the pipeline's own plan (e.g. the memory estimate at run time)
            error = input_error(e)
            self._fail(group, error.message, error.param)
            outputs = None
        except Exception as e:
            log.exception("a group of %d job(s) failed", len(group))
            self._fail(group, f"generation failed: {' '.join(str(e).split()) or type(e).__name__}")
            outputs = None
        if outputs is not None:
            self._finish(group, specs, outputs)
            self.metrics.batch_done(sum(spec.n for spec in specs))
        self._cancelled.difference_update(job.id for job in group)
        self.group_seconds = time.perf_counter() - start

    def _on_step(self, group: list[Job], specs: list[JobSpec], info: StepInfo) -> None:
        if self._stop.is_set() or all(job.id in self._cancelled for job in group):
            raise GroupCancelled()
        offset = 0
        for job, spec in zip(group, specs):
            indices = [i for i in range(offset, offset + spec.n) if info.start <= i < info.start + info.count]
            offset += spec.n
            if not indices or job.id in self._cancelled or not self.hub.wants(job.id):
                continue
            self.hub.publish(job.id, {"type": "progress", "step": info.step + 1, "steps": info.total})
            first_step = 0 if spec.kind == "generate" else 1
            chosen = sorted(preview_steps(info.total, spec.partial_images, first_step))
            if info.step in chosen:
                previews = info.preview(indices)
                for index, image in zip(indices, previews):
                    self.hub.publish(job.id, {"type": "partial", "image_index": index - (offset - spec.n),
                                              "partial_image_index": chosen.index(info.step),
                                              "data": encode(image, spec.output_format, spec.output_compression)})

    def _inputs(self, spec: JobSpec) -> dict | None:
        if spec.kind != "edit":
            return None
        images = {}
        for key, name in (("image", spec.image), ("mask_image", spec.mask)):
            if name:
                with Image.open(self.config.data_dir / name) as im:
                    im.load()
                    images[key] = im.copy()
        return images

    def _finish(self, group: list[Job], specs: list[JobSpec], outputs: list[list[Image.Image]]) -> None:
        """Write the images (atomically, in parallel: their fsyncs overlap), then mark the jobs ready in one
        transaction. A job cancelled meanwhile keeps its cancelled state and loses its files."""
        live = [(job, spec, images) for job, spec, images in zip(group, specs, outputs)
                if job.id not in self._cancelled]
        written = list(self._writer.map(lambda item: self._write(*item), live))
        done = self.store.finish_many([(job.id, results) for (job, _, _), results in zip(live, written)])
        for (job, _, _), ok in zip(live, done):
            if ok:
                self.metrics.job_finished(states.READY, time.time() - job.created_at)
                self.hub.publish(job.id, {"type": "end", "state": states.READY})
            else:
                shutil.rmtree(self.results_dir / job.id, ignore_errors=True)
        self.webhooks.notify()

    def _write(self, job: Job, spec: JobSpec, images: list[Image.Image]) -> list[dict]:
        results = []
        for i, (image, seed) in enumerate(zip(images, spec.seeds)):
            name = result_name(i, spec.output_format)
            write_result(self.results_dir / job.id / name, encode(image, spec.output_format, spec.output_compression))
            results.append({"file": name, "seed": seed})
        return results

    def _fail(self, group: list[Job], message: str, param: str | None = None) -> None:
        for job in group:
            if self.store.fail(job.id, message, param, states=(states.RUNNING,)):
                self.metrics.job_finished(states.ERROR)
                self.hub.publish(job.id, {"type": "end", "state": states.ERROR})
        self.webhooks.notify()

    # -- retention ----------------------------------------------------------------------------------------------
    def _janitor(self) -> None:
        interval = min(60.0, max(0.5, self.config.result_ttl_s / 4))
        while not self._stop.wait(interval):
            try:
                self.purge(time.time() - self.config.result_ttl_s)
            except Exception:  # never let clean-up kill the thread
                log.exception("purging expired jobs failed")

    def purge(self, finished_before: float) -> int:
        self._cancelled.intersection_update(self.store.ids(states.RUNNING))  # forget those that never ran
        expired = self.store.expired(finished_before)
        for job_id in expired:
            shutil.rmtree(self.results_dir / job_id, ignore_errors=True)
            shutil.rmtree(self.inputs_dir / job_id, ignore_errors=True)
            self.store.delete(job_id)
        return len(expired)
