"""fluxion's HTTP server: the OpenAI Images API and the BFL API over a batching engine, jobs kept in SQLite.

    from fluxion.server import ServerConfig, create_app, serve
    serve(ServerConfig(models=["tiny-schnell"], port=8000))        # what `fluxion serve` runs

Modules, one job each: config (ServerConfig), jobs (the SQLite job store), specs (checking a request into a JobSpec),
models (ModelInfo, the LRU of pipelines), loras (per-request adapters), batching (groups and one pipeline call
per group, bit-exact through fluxion.invariance), engine (the worker), events, outputs, webhooks, security,
metrics, errors, common, openai_api, bfl_api, web (the page at /, files in page/), app (create_app); for Ray Serve
(fluxion[ray]): ray_engine (the gateway's engine), ray_app (the deployments), ray_run (`fluxion serve --ray`)."""

_EXPORTS = {"ServerConfig": "fluxion.server.config", "create_app": "fluxion.server.app",
            "Engine": "fluxion.server.engine", "serve": "fluxion.server.run"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fluxion.server' has no attribute {name!r}")


__all__ = list(_EXPORTS)
