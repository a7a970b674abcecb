"""torchao, imported quietly when installed: fluxion's quantization does not need it (see fluxion.quant), the
benchmark compares against it.

On a CPU-only machine its import logs "Failed to load ... .so" for each CUDA extension it ships, and torch's pytree
module a deprecation note about an Enum torchao registers: neither is something a user can act on, so both are
dropped while it imports. Its other messages, and any import error, pass through."""

import importlib
import logging

from ..errors import InputError

_NOISE = ("Failed to load", "is an Enum subclass and is now natively supported")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in _NOISE)


def import_torchao():
    """The torchao module; InputError telling how to install it when it is missing."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    noise = _DropNoise()
    for log in loggers:
        log.addFilter(noise)
    try:
        return importlib.import_module("torchao")
    except ImportError as e:
        raise InputError(f"torchao is not installed ({e}): pip install 'torchao>=0.18' (or pip install "
                         "'fluxion[quant]')") from e
    finally:
        for log in loggers:
            log.removeFilter(noise)
