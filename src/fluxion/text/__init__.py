"""Text encoders: T5 + CLIP for FLUX checkpoints, MiniLM for fluxion's in-house models."""

from typing import Any, Protocol, Self, runtime_checkable

import torch
from torch import Tensor

from fluxion.errors import InputError
from fluxion.text.hf import FluxTextEncoder, HFEmbedder, load_clip, load_flux_text_encoder, load_t5
from fluxion.text.minilm import MINILM_MAX_LENGTH, MiniLMEncoder, load_minilm

# T5 sequence length per FLUX variant, as the BFL reference (cli.py: 256 for schnell, else 512).
T5_MAX_LENGTH = {"schnell": 256, "dev": 512, "pro": 512}


@runtime_checkable
class TextEncoder(Protocol):
    """What the pipeline and training need from a text encoder."""

    @property
    def context_dim(self) -> int: ...  # D of txt

    @property
    def vec_dim(self) -> int: ...  # Dv of vec

    @property
    def max_length(self) -> int: ...  # L of txt

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...  # txt (B, L, D), vec (B, Dv)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self: ...


def load_text_encoder(files: Any, variant: str | None = None, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> TextEncoder:
    """The encoder a resolved model needs (`fluxion.registry.ModelFiles`): MiniLM, or T5 + CLIP from its folders."""
    if files.text_encoder == "minilm":
        # MiniLM stays fp32 whatever the pipeline dtype: it is small, and the in-house models were trained on fp32 states.
        # Prompts are padded to the length the model was trained with (manifests from before text_length: 32).
        return load_minilm(device=device, max_length=files.text_length or MINILM_MAX_LENGTH)
    if files.text_encoder == "t5+clip":
        t5 = load_t5(files.t5, files.t5_tokenizer, max_length=T5_MAX_LENGTH.get(variant or "dev", 512),
                     dtype=dtype, device=device)
        clip = load_clip(files.clip, files.clip_tokenizer, dtype=dtype, device=device)
        return FluxTextEncoder(t5, clip)
    raise InputError(f"text_encoder must be 'minilm' or 't5+clip' (model {files.name!r}), got {files.text_encoder!r}")


__all__ = [
    "FluxTextEncoder", "HFEmbedder", "MINILM_MAX_LENGTH", "MiniLMEncoder", "T5_MAX_LENGTH", "TextEncoder",
    "load_clip", "load_flux_text_encoder", "load_minilm", "load_t5", "load_text_encoder",
]
