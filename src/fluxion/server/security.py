"""API keys (kept as SHA-256 digests), per-key rate limits, signed image URLs and paths that stay in their folder."""

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path, PurePosixPath

from .errors import bad_request


def hash_key(key: str) -> str:
    """The digest a key is stored and compared as: "sha256:HEX". Keys are long random tokens, so an unsalted
    SHA-256 is enough to make a leaked config or database useless (no dictionary to search)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: str) -> str:
    """A short, non-secret name for a key (its digest's first 16 hex digits): what jobs record as their owner."""
    return digest[7:23]


class KeyRing:
    """The accepted keys' digests. With none configured the server is open (and binds to 127.0.0.1 by default)."""

    def __init__(self, digests: list[str]):
        self.digests = list(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def owner(self, presented: str | None) -> str | None:
        """The key id for a presented key, or None if it is not one of ours. Every digest is compared in constant
        time, so timing does not tell how close a guess came."""
        if not presented:
            return None
        digest = hash_key(presented)
        found = None
        for known in self.digests:
            if hmac.compare_digest(known, digest):
                found = known
        return key_id(found) if found else None


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_minute` / 60 a second."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until a token is back."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > 100_000:  # forget idle clients (full buckets) so the table cannot grow forever
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst}
            return (1.0 - tokens) / self.rate


def contained(root: Path, relative: str, param: str) -> Path:
    """`root / relative`, refused (400, naming `param`) unless it stays inside root: no absolute paths, no '..',
    no backslashes or NULs, and no symlink that leads out."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
        raise bad_request(f"{param}: expected a relative path inside the adapters folder, got {relative!r:.80}",
                          param)
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or relative.startswith("~"):
        raise bad_request(f"{param}: {relative!r:.80} leaves the adapters folder; give a path relative to it",
                          param, code="path_not_allowed")
    base = root.resolve()
    target = (base / pure).resolve()
    if not target.is_relative_to(base):
        raise bad_request(f"{param}: {relative!r:.80} resolves outside the adapters folder", param,
                          code="path_not_allowed")
    return target


class URLSigner:
    """Image URLs that work without an API key (an <img> tag cannot send one) but cannot be guessed or kept past
    their expiry: HMAC-SHA256 of the path and expiry under a secret kept in the data folder."""

    def __init__(self, secret_file: Path):
        self.secret = self._secret(secret_file)

    @staticmethod
    def _secret(path: Path) -> bytes:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two servers starting at once on one folder still agree on one secret
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for _ in range(50):
                data = path.read_bytes()
                if len(data) == 32:
                    return data
                time.sleep(0.01)
            raise RuntimeError(f"{path}: expected a 32-byte secret") from None
        with os.fdopen(fd, "wb") as f:
            data = secrets.token_bytes(32)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return data

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, ttl_s: float) -> str:
        expires = int(time.time() + ttl_s)
        return f"{path}?exp={expires}&sig={self.signature(path, expires)}"

    def verify(self, path: str, expires: str | None, signature: str | None) -> bool:
        if not expires or not signature or not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(self.signature(path, int(expires)), signature)
