"""Step caching: skip most of the transformer on sampling steps where its input barely changed.

First-Block Cache (as ParaAttention's FBCache): every step runs the embedders and the first double-stream block.
When the residual that block adds has moved, relative to its value at the last fully computed step, by less than
`threshold` (mean absolute change over mean absolute value), the rest of the network is skipped and the residual
it added at that step is reused. The wrapper sits outside the model (the sampler calls it like a `Flux`), so LoRA
hooks, true CFG (both halves decide together, as one batch) and image-to-image work unchanged.
"""

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

log = logging.getLogger(__name__)

CACHE_KINDS = ("fbcache",)
DEFAULT_THRESHOLDS = {"fbcache": 0.15}  # 0.6x the time at 28 steps, GenEval-shapes within 0.01 (README)


@dataclass(frozen=True)
class CacheSpec:
    """A cache setting as users write it: "fbcache" or "fbcache:0.08"."""

    kind: str
    threshold: float

    @classmethod
    def parse(cls, text: str, name: str = "cache") -> "CacheSpec":
        from .settings import invalid, number

        if not isinstance(text, str):
            raise invalid(name, text, f"a string such as 'fbcache' or 'fbcache:0.1' (kinds: {', '.join(CACHE_KINDS)})")
        kind, _, value = text.partition(":")
        if kind not in CACHE_KINDS:
            raise invalid(name, text, f"one of {', '.join(CACHE_KINDS)}, optionally with ':THRESHOLD'")
        if not value:
            return cls(kind, DEFAULT_THRESHOLDS[kind])
        try:
            threshold = float(value)
        except ValueError:
            raise invalid(name, text, f"'{kind}:THRESHOLD' with a number, e.g. '{kind}:0.1'") from None
        return cls(kind, number(f"{name}[threshold]", threshold, 0.0, 1.0))

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}"

    def wrap(self, model) -> "FirstBlockCache":
        """A fresh cache for one denoising run of `model`."""
        return FirstBlockCache(model, self.threshold)


def relative_change(new: Tensor, old: Tensor) -> float:
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


class FirstBlockCache:
    """Callable like the Flux `model` for one denoising run; `computed` and `skipped` count its steps."""

    def __init__(self, model, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"cache threshold must be in [0, 1], got {threshold}")
        self.model, self.threshold = model, threshold
        self.params = model.params  # the sampler reads params.guidance_embed
        self.reference: Tensor | None = None  # the first block's residual at the last computed step
        self.rest: Tensor | None = None  # what the rest of the network added to the image tokens then
        self.computed = self.skipped = 0

    @torch.no_grad()
    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None) -> Tensor:
        m = self.model
        img, txt, vec, pe = m.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        first, *others = m.double_blocks
        img1, txt1 = first(img=img, txt=txt, vec=vec, pe=pe)
        signal = img1 - img
        reusable = self.rest is not None and self.rest.shape == img1.shape
        if reusable and relative_change(signal, self.reference) < self.threshold:
            self.skipped += 1
            return m.final_layer(img1 + self.rest, vec)
        h, t = img1, txt1
        for block in others:
            h, t = block(img=h, txt=t, vec=vec, pe=pe)
        out = m.single_stream(h, t, vec, pe)
        self.reference, self.rest = signal, out - img1
        self.computed += 1
        return m.final_layer(out, vec)
