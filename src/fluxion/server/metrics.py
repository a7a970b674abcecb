"""Prometheus metrics in the text exposition format (written here: a few counters need no client library)."""

import bisect
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 60.0


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What the server counts; `render(gauges)` adds the gauges read at scrape time (queue depth, models)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job_latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.images_total = 0
        self.jobs_total: dict[str, int] = {}
        self.requests_total: dict[tuple[str, str, int], int] = {}
        self._recent_images: deque[tuple[float, int]] = deque()

    def job_finished(self, state: str, seconds: float | None = None) -> None:
        with self._lock:
            self.jobs_total[state] = self.jobs_total.get(state, 0) + 1
            if seconds is not None:
                self.job_latency.observe(seconds)

    def batch_done(self, images: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.batch_size.observe(images)
            self.images_total += images
            self._recent_images.append((now, images))

    def request(self, method: str, route: str, status: int) -> None:
        key = (method, route, status)
        with self._lock:
            self.requests_total[key] = self.requests_total.get(key, 0) + 1

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent_images and self._recent_images[0][0] < now - RATE_WINDOW_S:
                self._recent_images.popleft()
            return sum(n for _, n in self._recent_images) / RATE_WINDOW_S

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """gauges: name -> (help, value)."""
        rate = self.images_per_second()
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        for name, (help_text, value) in gauges.items():
            metric(name, "gauge", help_text, [f"{name} {value:g}"])
        with self._lock:
            metric("fluxion_images_per_second", "gauge", f"images finished per second over the last "
                   f"{RATE_WINDOW_S:g} s", [f"fluxion_images_per_second {rate:.4f}"])
            metric("fluxion_images_generated_total", "counter", "images generated",
                   [f"fluxion_images_generated_total {self.images_total}"])
            metric("fluxion_jobs_total", "counter", "jobs finished, by final state",
                   [f'fluxion_jobs_total{{state="{s}"}} {n}' for s, n in sorted(self.jobs_total.items())])
            metric("fluxion_job_latency_seconds", "histogram", "seconds from submission to a ready job",
                   self.job_latency.lines("fluxion_job_latency_seconds"))
            metric("fluxion_batch_size", "histogram", "images per pipeline call (a batch group)",
                   self.batch_size.lines("fluxion_batch_size"))
            metric("fluxion_http_requests_total", "counter", "HTTP requests, by method, route and status",
                   [f'fluxion_http_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                    for (m, r, s), n in sorted(self.requests_total.items())])
        return "\n".join(lines) + "\n"
