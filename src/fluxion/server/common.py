"""What both APIs share: the server's state, authentication and rate limits, model lookup, submission, waiting for a
job, and signed result URLs."""

import asyncio
import json
import re
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from . import jobs as states
from .config import ServerConfig
from .engine import Engine, QueueFull
from .errors import APIError, bad_request, not_found, rate_limited, unauthorized, unavailable
from .jobs import Job
from .security import KeyRing, RateLimiter, URLSigner
from .specs import JobSpec, SpecLimits, build_spec, request_hash

JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_IDEMPOTENCY_KEY = 255


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    keys: KeyRing
    limiter: RateLimiter
    signer: URLSigner

    @classmethod
    def create(cls, config: ServerConfig, engine: Engine) -> "ServerState":
        return cls(config=config, engine=engine, keys=KeyRing(config.api_keys),
                   limiter=RateLimiter(config.rate_limit, config.rate_burst),
                   signer=URLSigner(config.data_dir / "url-signing.key"))

    @property
    def limits(self) -> SpecLimits:
        c = self.config
        return SpecLimits(max_prompt_chars=c.max_prompt_chars, max_steps=c.max_steps, max_images=c.max_images)


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def presented_key(request: Request) -> str | None:
    """'Authorization: Bearer KEY' (OpenAI clients) or 'x-key: KEY' (BFL clients)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-key")


async def authenticate(request: Request) -> str:
    """The caller's owner id (its key's id; '' on an open server), after the key and rate-limit checks."""
    state = state_of(request)
    owner = ""
    if state.keys.enabled:
        owner = state.keys.owner(presented_key(request))
        if owner is None:
            raise unauthorized()
    wait = state.limiter.take(owner or (request.client.host if request.client else "?"))
    if wait > 0:
        raise rate_limited(f"rate limit of {state.config.rate_limit:g} requests per minute reached; retry in "
                           f"{wait:.1f} s", wait)
    return owner


def base_url(request: Request) -> str:
    public = state_of(request).config.public_url
    return public or str(request.base_url).rstrip("/")


def pick_model(state: ServerState, name) -> str:
    if name is None or name == "":
        return state.config.models[0]
    if not isinstance(name, str) or not state.engine.pool.known(name):
        raise not_found(f"model {name!r:.80} is not served here; models: {', '.join(state.config.models)}", "model",
                        code="model_not_found")
    return name


def require_ready(state: ServerState) -> None:
    if not state.engine.ready.is_set():
        model = state.config.models[0]
        estimate = state.engine.pool.load_seconds.get(model, 5.0)
        raise unavailable(f"the server is loading model {model!r}; retry shortly", estimate)


async def read_json(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise bad_request("the request body must be a JSON object", None, code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, code="invalid_json")
    return body


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and (not key or len(key) > MAX_IDEMPOTENCY_KEY):
        raise bad_request(f"Idempotency-Key: expected 1 to {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key")
    return key


async def make_spec(state: ServerState, fields: dict, *, model: str, names: dict[str, str],
                    kind: str = "generate") -> JobSpec:
    """Check a request against the limits and the model (off the event loop: the first look at a model reads its
    files, a resident one runs the memory estimate)."""
    pool = state.engine.pool

    def check() -> JobSpec:
        return build_spec(fields, model=model, info=pool.info(model), limits=state.limits, pipe=pool.resident(model),
                          names=names, kind=kind, max_job_seconds=state.config.max_job_seconds)

    return await run_in_threadpool(check)


async def submit(state: ServerState, request: Request, *, api: str, owner: str, spec: JobSpec, payload: dict,
                 webhook_url: str | None = None, webhook_secret: str | None = None, job_id: str | None = None) -> Job:
    """Commit the job (it is on disk when this returns), or return the one the same Idempotency-Key made."""
    key = idempotency_key(request)
    fingerprint = request_hash({"api": api, **payload})
    job = Job(id=job_id or Job.new_id(), api=api, model=spec.model, spec=spec.to_dict(), batch_key=spec.batch_key(),
              num_images=spec.n, owner=owner, idempotency_key=key, request_hash=fingerprint,
              base_url=base_url(request), webhook_url=webhook_url, webhook_secret=webhook_secret)
    try:
        stored, created = await run_in_threadpool(state.engine.submit, job)
    except QueueFull as e:
        raise rate_limited(f"{e}; retry later", e.retry_after, code="queue_full") from None
    if not created and stored.request_hash != fingerprint:
        raise APIError(409, "Idempotency-Key was already used for a different request", param="Idempotency-Key",
                       code="idempotency_key_reused")
    return stored


async def wait_for(state: ServerState, job_id: str, timeout: float) -> Job | None:
    """The job once it has finished (or as it is when `timeout` runs out)."""
    engine = state.engine
    queue = engine.hub.subscribe(job_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            job = await run_in_threadpool(engine.store.get, job_id)
            remaining = deadline - loop.time()
            if job is None or job.finished or remaining <= 0:
                return job
            try:  # woken by the engine's end event; the store is read again every second regardless
                await asyncio.wait_for(queue.get(), timeout=min(1.0, remaining))
            except TimeoutError:
                pass
    finally:
        engine.hub.unsubscribe(job_id, queue)


def job_error(job: Job) -> APIError:
    """What a synchronous request answers when its job did not end ready."""
    if job.state == states.CANCELLED:
        return APIError(409, f"job {job.id} was cancelled", code="job_cancelled")
    if job.error_param:
        return APIError(400, job.error or "invalid request", param=job.error_param, code="invalid_value")
    return APIError(500, job.error or "generation failed", type="server_error", code="generation_failed")


def owned_job(state: ServerState, job_id: str, owner: str) -> Job | None:
    """The job if it exists and belongs to this caller: another key's jobs look exactly like missing ones."""
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        return None
    job = state.engine.store.get(job_id)
    if job is None or job.owner != owner:
        return None
    return job


def result_url(state: ServerState, job: Job, name: str, base: str | None = None) -> str:
    path = f"/v1/files/{job.id}/{name}"
    return (base or job.base_url or "") + state.signer.sign(path, state.config.result_ttl_s)


def result_bytes(state: ServerState, job: Job) -> list[bytes]:
    return [state.engine.result_path(job.id, r["file"]).read_bytes() for r in job.results or []]
