"""Webhooks: when a job with a `webhook_url` ends, POST its result there; on a failure (no answer, or not 2xx)
retry after backoff, 2 x backoff, 4 x backoff, ... up to `webhook_retries` times. The schedule lives in the job
table, so deliveries due before a restart are made after it (at least once: a crash between the POST and its
record sends it again). With a `webhook_secret`, `X-Fluxion-Signature: sha256=HMAC(secret, body)` signs the body."""

import hashlib
import hmac
import json
import logging
import threading
import time
from urllib.parse import urlsplit

from .errors import bad_request

log = logging.getLogger(__name__)


def check_webhook_url(url, param: str = "webhook_url") -> str | None:
    if url is None:
        return None
    if not isinstance(url, str) or len(url) > 2048:
        raise bad_request(f"{param}: expected an http(s) URL", param)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request(f"{param}: expected an http:// or https:// URL with a host, got {url!r:.80}", param)
    return url


class WebhookSender:
    def __init__(self, store, config, payload):
        self.store, self.config, self.payload = store, config, payload
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fluxion-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.config.webhook_timeout_s + 1)

    def notify(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.config.webhook_timeout_s, follow_redirects=False) as client:
            while not self._stop.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                try:
                    for job in self.store.due_webhooks(time.time()):
                        if self._stop.is_set():
                            return
                        self._deliver(client, job)
                except Exception:  # a broken row or a closing database must not end deliveries for good
                    log.exception("webhook delivery failed")

    def _deliver(self, client, job) -> None:
        body = json.dumps(self.payload(job)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "fluxion-server"}
        if job.webhook_secret:
            digest = hmac.new(job.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Fluxion-Signature"] = f"sha256={digest}"
        try:
            ok = 200 <= client.post(job.webhook_url, content=body, headers=headers).status_code < 300
        except Exception as e:  # httpx.HTTPError and anything the URL provokes: counted as a failed try
            log.info("webhook for job %s to %s failed: %s", job.id, job.webhook_url, e)
            ok = False
        if ok:
            self.store.webhook_result(job.id, "delivered", None)
            return
        tries = job.webhook_attempts + 1  # this one included
        if tries > self.config.webhook_retries:
            log.warning("webhook for job %s to %s given up after %d tries", job.id, job.webhook_url, tries)
            self.store.webhook_result(job.id, "failed", None)
        else:
            self.store.webhook_result(job.id, "due", time.time() + self.config.webhook_backoff_s * 2 ** (tries - 1))
            self._wake.set()  # look again soon: the retry may be due before the next notify
