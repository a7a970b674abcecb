"""The server's settings, checked once (`fluxion serve` flags or a Python dataclass), each refusal naming its flag."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..registry import DEFAULT_MODEL, fluxion_home
from .security import hash_key


def _check_int(flag: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{flag}: expected an integer from {low} to {high}, got {value!r}")
    return value


def _check_number(flag: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{flag}: expected a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


@dataclass
class ServerConfig:
    """What `fluxion serve` runs with. Models are only ever those named here: requests pick among them by name and
    never name a path. API keys are kept as SHA-256 digests only (give "sha256:HEX" to never pass the key)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: fluxion_home() / "server")
    max_batch: int = 16  # images sharing one forward pass
    batch_wait_ms: float = 50.0  # how long the oldest pending request may wait for companions
    queue_size: int = 256  # pending and running jobs beyond which requests get 429
    api_keys: list[str] = field(default_factory=list)  # raw keys or "sha256:HEX"; stored hashed
    quantize: str | None = None  # weight quantization applied at load (fluxion.quant), e.g. "int8"
    cache: str | None = None  # step caching for every job (fluxion.cache), e.g. "taylorseer:3"
    device: str | None = None
    dtype: str | None = None
    workers: int = 1  # groups generated at once (threads sharing the pipelines); see run.serve for torch threads
    model_cache_size: int = 2  # pipelines kept loaded (least recently used goes first)
    lora_cache_size: int = 8  # adapters kept loaded per pipeline
    adapters_dir: Path | None = None  # LoRA files requests may name by relative path (default: DATA_DIR/adapters)
    preload: bool = True  # load the first model at start (requests get 503 until it is in memory)
    result_ttl_s: float = 24 * 3600.0  # finished jobs (rows, images, inputs) are deleted this long after
    max_body_bytes: int = 25 * 2**20
    max_prompt_chars: int = 4000
    max_steps: int = 50
    max_images: int = 10  # n per request
    max_input_pixels: int = 4096 * 4096  # uploaded images (edits)
    max_job_seconds: float | None = None  # refuse jobs whose estimated time (memory.job_flops) exceeds this
    rate_limit: float = 0.0  # requests per minute per API key (or per client address without keys); 0: no limit
    rate_burst: int = 10  # requests a key may make at once before the rate applies
    request_timeout_s: float = 600.0  # a synchronous (OpenAI) request waits at most this long for its images
    webhook_retries: int = 5
    webhook_backoff_s: float = 1.0  # retry k waits backoff * 2^(k-1)
    webhook_timeout_s: float = 10.0
    public_url: str | None = None  # the base of polling and image URLs when behind a proxy (default: the request's)
    log_level: str = "warning"

    def __post_init__(self):
        if isinstance(self.models, str):
            self.models = [self.models]
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise InputError(f"--model: expected at least one model name, got {self.models!r}")
        self.models = list(dict.fromkeys(self.models))
        self.port = _check_int("--port", self.port, 0, 65535)
        self.data_dir = Path(self.data_dir).expanduser()
        self.adapters_dir = Path(self.adapters_dir).expanduser() if self.adapters_dir else self.data_dir / "adapters"
        self.max_batch = _check_int("--max-batch", self.max_batch, 1, 1024)
        self.batch_wait_ms = _check_number("--batch-wait-ms", self.batch_wait_ms, 0, 60_000)
        self.queue_size = _check_int("--queue-size", self.queue_size, 1, 10**6)
        self.workers = _check_int("--workers", self.workers, 1, 64)
        self.model_cache_size = _check_int("--model-cache-size", self.model_cache_size, 1, 64)
        self.lora_cache_size = _check_int("--lora-cache-size", self.lora_cache_size, 1, 1024)
        self.result_ttl_s = _check_number("--result-ttl", self.result_ttl_s, 1, 10**9)
        self.max_body_bytes = _check_int("--max-body-bytes", self.max_body_bytes, 1024, 2**34)
        self.max_prompt_chars = _check_int("--max-prompt-chars", self.max_prompt_chars, 1, 10_000)
        self.max_steps = _check_int("--max-steps", self.max_steps, 1, 1000)
        self.max_images = _check_int("--max-images", self.max_images, 1, 1000)
        self.max_input_pixels = _check_int("--max-input-pixels", self.max_input_pixels, 1, 2**31)
        if self.max_job_seconds is not None:
            self.max_job_seconds = _check_number("--max-job-seconds", self.max_job_seconds, 0.001, 10**7)
        self.rate_limit = _check_number("--rate-limit", self.rate_limit, 0, 10**7)
        self.rate_burst = _check_int("--rate-burst", self.rate_burst, 1, 10**6)
        self.request_timeout_s = _check_number("--request-timeout", self.request_timeout_s, 0.1, 10**6)
        self.webhook_retries = _check_int("--webhook-retries", self.webhook_retries, 0, 100)
        self.webhook_backoff_s = _check_number("--webhook-backoff", self.webhook_backoff_s, 0, 3600)
        self.webhook_timeout_s = _check_number("--webhook-timeout", self.webhook_timeout_s, 0.1, 600)
        # keep digests only, so a config object (or a dump of it) never carries a usable key
        self.api_keys = [key if key.startswith("sha256:") else hash_key(key) for key in self._keys()]
        if self.cache is not None:
            from ..cache import CacheSpec

            CacheSpec.parse(self.cache, "--cache")
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/")

    def _keys(self) -> list[str]:
        keys = [self.api_keys] if isinstance(self.api_keys, str) else list(self.api_keys)
        for key in keys:
            if not isinstance(key, str) or not key.strip() or any(c.isspace() for c in key):
                raise InputError("--api-key: expected a non-empty key without spaces")
            if key.startswith("sha256:") and (len(key) != 71 or any(c not in "0123456789abcdef" for c in key[7:])):
                raise InputError("--api-key: 'sha256:' must be followed by 64 lowercase hex digits")
        return keys

    @property
    def database(self) -> Path:
        return self.data_dir / "jobs.sqlite3"


def read_key_file(path: str | os.PathLike) -> list[str]:
    """API keys from a file, one a line (raw or "sha256:HEX"); blank lines and # comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--api-key-file: no such file {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
