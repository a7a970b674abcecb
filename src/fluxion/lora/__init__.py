"""LoRA adapters for Flux: load community files, stack and switch them at run time, fuse and unfuse."""

from pathlib import Path

from torch import nn

from .adapters import (Adapter, LowRank, add_adapter, fuse_adapters, loaded_adapters, set_adapters, unfuse_adapters,
                       unload_adapters)
from .formats import load_peft


def load_lora(transformer: nn.Module, path: str | Path, *, scale: float = 1.0, name: str | None = None,
              strict: bool = True) -> str:
    """Apply the adapter in `path` to `transformer` (unfused, active at `scale`); returns its name."""
    name = name or Path(path).stem
    return add_adapter(transformer, load_peft(path, transformer, name=name, strict=strict), scale)


set_loras = set_adapters
fuse_loras = fuse_adapters
unfuse_loras = unfuse_adapters
unload_loras = unload_adapters

__all__ = ["Adapter", "LowRank", "load_lora", "set_loras", "fuse_loras", "unfuse_loras", "unload_loras",
           "loaded_adapters"]
