"""create_app(config) -> FastAPI: the routes (openai_api, bfl_api, the web page, /healthz, /metrics), one error
shape for everything, a request-body limit and request counting. The engine starts and stops with the app."""

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from . import bfl_api, openai_api, web
from .bfl_api import bfl_result
from .common import ServerState, authenticate, state_of
from .config import ServerConfig
from .engine import Engine
from .errors import APIError

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The server for `config`; pass `engine` to share one (its worker starts with the app)."""
    engine = engine or Engine(config)
    state = ServerState.create(config, engine)
    engine.payload_for_webhook = lambda job: bfl_result(state, job, job.id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="fluxion", version=_version(), lifespan=lifespan)
    app.state.server = state
    _install_error_handlers(app)
    app.add_route("/healthz", _healthz, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"], dependencies=[Depends(authenticate)],
                      response_class=PlainTextResponse)
    app.include_router(web.router)
    app.include_router(openai_api.router)
    app.include_router(bfl_api.router)
    app.add_middleware(RequestMetrics, state=state)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


def _version() -> str:
    from .. import __version__

    return __version__


async def _healthz(request: Request):
    state: ServerState = state_of(request)
    engine = state.engine
    counts = engine.store.counts()
    ready = engine.ready.is_set()
    body = {"status": "ok" if ready else "loading", "models": {"served": state.config.models,
                                                               "loaded": engine.pool.loaded(),
                                                               "loading": engine.pool.loading},
            "queue": {"pending": counts["pending"], "running": counts["running"]}}
    if engine.startup_error:
        body["error"] = engine.startup_error
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "1"})


async def _metrics(request: Request):
    state: ServerState = state_of(request)
    engine = state.engine
    counts = engine.store.counts()
    gauges = {
        "fluxion_queue_depth": ("jobs waiting to run", counts["pending"]),
        "fluxion_queue_images": ("images waiting to run", counts["pending_images"]),
        "fluxion_jobs_running": ("jobs running now", counts["running"]),
        "fluxion_models_loaded": ("pipelines in memory", len(engine.pool.loaded())),
        "fluxion_model_loads_total": ("model loads since start", engine.pool.loads),
    }
    return PlainTextResponse(engine.metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = (error.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param,
                                     code="invalid_value").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind, code=code).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(error).__name__})", type="server_error",
                                     code="internal_error").body(), status_code=500)


class BodyLimit:
    """Refuse bodies over `max_bytes` (413) by their Content-Length, or as they stream in when it is absent."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # an APIError: the app's handler answers it as any other
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is over the server's limit of {self.max_bytes} bytes",
                        code="body_too_large")

    async def _refuse(self, send):
        error = self._error()
        response = JSONResponse(error.body(), status_code=413)
        await response({"type": "http"}, None, send)


class RequestMetrics:
    """Count requests by method, route template (not the raw path: ids would make a series each) and status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.state.engine.metrics.request(scope["method"], getattr(route, "path", "other"), status)
