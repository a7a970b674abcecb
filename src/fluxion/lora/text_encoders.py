"""Text-encoder parts of LoRA files applied to a text encoder's Linear layers by name: kohya writes Hugging Face
CLIPTextModel's `text_model.encoder.layers.0.self_attn.q_proj` as
`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`, diffusers as
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`; both match, also inside a wrapper module."""

import logging

from torch import nn

from ..errors import CheckpointError
from .adapters import Adapter, add_adapter
from .updates import Update

logger = logging.getLogger(__name__)


def text_encoder_targets(text_encoder: nn.Module, updates: dict[str, Update]) -> tuple[dict[str, Update], list[str]]:
    """({Linear path in text_encoder: update}, names that match no Linear). A name matches the one Linear whose path,
    with "." as "_", equals it, or ends with "_" + it (the encoder inside a wrapper), or is its end after a "_"
    (transformers 5's CLIPTextModel has no `text_model.` level)."""
    linears = {name.replace(".", "_"): name for name, m in text_encoder.named_modules() if isinstance(m, nn.Linear)}
    mapped, unmapped = {}, []
    for name, update in updates.items():
        flat = name.replace(".", "_")
        path = linears.get(flat)
        if path is None:
            found = [p for u, p in linears.items() if u.endswith("_" + flat) or flat.endswith("_" + u)]
            path = found[0] if len(found) == 1 else None
        if path is None:
            unmapped.append(name)
        else:
            mapped[path] = update
    return mapped, unmapped


def text_encoder_adapter(text_encoder: nn.Module, adapter: Adapter, part: str, *, strict: bool = True) -> Adapter:
    """The adapter's `part` ("clip_l" or "t5") updates as an Adapter on `text_encoder`'s own module paths."""
    updates = adapter.text_encoders.get(part, {})
    mapped, unmapped = text_encoder_targets(text_encoder, updates)
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        message = (f"{adapter.source or adapter.name}: {len(unmapped)} {part} text-encoder module(s) match no Linear "
                   f"of this {type(text_encoder).__name__}: {shown}")
        if strict:
            raise CheckpointError(message + " (strict=False applies the rest)")
        logger.warning(message)
    if not mapped:
        raise CheckpointError(f"{adapter.source or adapter.name}: none of its {part} text-encoder updates applies to "
                              f"this {type(text_encoder).__name__}")
    return Adapter(name=adapter.name, updates=mapped, source=adapter.source, format=adapter.format)


def apply_text_encoder_lora(text_encoder: nn.Module, adapter: Adapter, part: str = "clip_l", *, scale: float = 1.0,
                            strict: bool = True) -> str:
    """Attach the adapter's `part` text-encoder updates to `text_encoder` (a Hugging Face CLIPTextModel or T5
    encoder, or a module holding one), unfused at `scale`; set/fuse/unfuse/unload_loras then work on it as on the
    transformer."""
    return add_adapter(text_encoder, text_encoder_adapter(text_encoder, adapter, part, strict=strict), scale)
