"""LoRA adapters for Flux: load community files of every format, stack and switch them at run time, fuse and
unfuse, describe them, and write them in the layouts other tools read."""

import logging
from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from .adapters import (
    Adapter,
    add_adapter,
    delete_adapter,
    disable_hotswap,
    enable_hotswap,
    fuse_adapters,
    hotswap_rank,
    loaded_adapters,
    set_adapters,
    unfuse_adapters,
    unload_adapters,
)
from .formats import (
    FORMATS,
    LoraFile,
    describe_lora,
    detect_lora_format,
    load_peft,
    read_lora,
    read_lora_file,
)
from .text_encoders import apply_text_encoder_lora, text_encoder_adapter
from .updates import DenseDelta, Hadamard, Kronecker, LowRank, RowBlocks, Update
from .writers import LAYOUTS, convert_lora, save_lora

logger = logging.getLogger(__name__)


def load_lora(transformer: nn.Module, path: str | Path, *, scale: float = 1.0, name: str | None = None,
              strict: bool = True, text_encoders: dict[str, nn.Module] | None = None) -> str:
    """Apply the adapter in `path` (any supported format) to `transformer`, unfused and active at `scale`; returns
    its name. Text-encoder updates apply to `text_encoders` ({"clip_l": ..., "t5": ...}) under the same name; a part
    with no encoder given is an error naming its keys (strict=False: a warning, skipped)."""
    adapter = read_lora(path, transformer, name=name or Path(path).stem, strict=strict)
    text_adapters = []
    for part, updates in adapter.text_encoders.items():
        encoder = (text_encoders or {}).get(part)
        if encoder is not None:
            text_adapters.append((encoder, text_encoder_adapter(encoder, adapter, part, strict=strict)))
            continue
        names = sorted(updates)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        message = (f"{path}: {len(names)} {part} text-encoder update(s) ({shown}) but no {part} text encoder to "
                   f"apply them to; pass text_encoders={{{part!r}: module}}")
        if strict:
            raise CheckpointError(message + " or strict=False to skip them")
        logger.warning(message + "; skipped")
    if not adapter.updates and not adapter.replacements and not text_adapters:
        raise CheckpointError(f"{path}: no LoRA update applies to this model")
    add_adapter(transformer, adapter, scale)
    for encoder, text_adapter in text_adapters:
        add_adapter(encoder, text_adapter, scale)
    return adapter.name


set_loras = set_adapters
fuse_loras = fuse_adapters
unfuse_loras = unfuse_adapters
unload_loras = unload_adapters

__all__ = [
    "FORMATS", "LAYOUTS", "Adapter", "DenseDelta", "Hadamard", "Kronecker", "LoraFile", "LowRank", "RowBlocks",
    "Update", "add_adapter", "apply_text_encoder_lora", "convert_lora", "delete_adapter", "describe_lora",
    "detect_lora_format", "disable_hotswap", "enable_hotswap", "fuse_loras", "hotswap_rank", "load_lora", "load_peft",
    "loaded_adapters", "read_lora", "read_lora_file", "save_lora", "set_loras", "unfuse_loras", "unload_loras",
]
