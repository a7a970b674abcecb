"""Run the server under uvicorn (what `fluxion serve` calls)."""

import logging
import os

from ..errors import InputError
from .config import ServerConfig

log = logging.getLogger(__name__)


def serve(config: ServerConfig) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise InputError(f"the server needs its extra: pip install 'fluxion[server]' ({e})") from None
    if not config.api_keys and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without API keys: anyone who can reach it can use it (--api-key)", config.host)
    if config.workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        # workers run groups side by side: split the cores between them rather than oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    app = create_app(config)
    # one process: the engine's worker thread owns the models, so more uvicorn workers would load them again
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                timeout_graceful_shutdown=5)
