"""From the engine's worker thread to the requests waiting on a job (asyncio): progress, step previews, the end."""

import asyncio
import threading
from collections import defaultdict


class EventHub:
    """publish() may be called from any thread; each subscriber gets the events of its job on its own event loop.
    Events are not stored: a waiter subscribes first, then reads the job's state from the store, so it cannot miss
    the end (and polls the store now and then besides)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = defaultdict(list)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers[job_id].append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            subscribers = self._subscribers.get(job_id, [])
            subscribers[:] = [(loop, q) for loop, q in subscribers if q is not queue]
            if not subscribers:
                self._subscribers.pop(job_id, None)

    def wants(self, job_id: str) -> bool:
        with self._lock:
            return bool(self._subscribers.get(job_id))

    def publish(self, job_id: str, event: dict) -> None:
        with self._lock:
            subscribers = list(self._subscribers.get(job_id, []))
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that loop has closed (its request is gone)
                pass
