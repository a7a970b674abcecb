"""Step caching: skip most of the transformer on sampling steps, reusing what the skipped blocks added before.

Every step runs the embedders and the first double-stream block; what the rest of the network added to the image
tokens at a fully computed step ("the rest") stands in for it on skipped steps.
- First-Block Cache (as ParaAttention's FBCache), `fbcache:THRESHOLD`: skip when the first block's residual has
  moved, relative to its value at the last full step, by less than THRESHOLD (mean absolute change over mean
  absolute value); reuse the rest as it was.
- TaylorSeer-style, `taylorseer:N`: a full step every N steps; in between, the rest is extrapolated to the current
  time to first order from the last two full steps.
The wrappers sit outside the model (the sampler calls them like a `Flux`), so LoRA hooks, true CFG (both halves
decide together, as one batch) and image-to-image work unchanged.
"""

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

log = logging.getLogger(__name__)

CACHE_KINDS = ("fbcache", "taylorseer")
# each at most 0.6x the time at 28 steps on tiny-dev and tiny-pro for GenEval-shapes within 0.02 (README)
DEFAULT_THRESHOLDS = {"fbcache": 0.2, "taylorseer": 3}


@dataclass(frozen=True)
class CacheSpec:
    """A cache setting as users write it: "fbcache", "fbcache:0.08", "taylorseer:3"."""

    kind: str
    threshold: float  # fbcache: the relative change below which a step is skipped; taylorseer: the interval N

    @classmethod
    def parse(cls, text: str, name: str = "cache") -> "CacheSpec":
        from .settings import integer, invalid, number

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
        if kind == "taylorseer":
            return cls(kind, integer(f"{name}[interval]", int(threshold) if threshold.is_integer() else threshold,
                                     1, 100))
        return cls(kind, number(f"{name}[threshold]", threshold, 0.0, 1.0))

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}"

    def wrap(self, model) -> "FirstBlockCache":
        """A fresh cache for one denoising run of `model`."""
        if self.kind == "taylorseer":
            return TaylorSeerCache(model, int(self.threshold))
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

    def skip(self, signal: Tensor, t: float) -> bool:
        return self.rest is not None and relative_change(signal, self.reference) < self.threshold

    def predicted_rest(self, t: float) -> Tensor:
        return self.rest

    def remember(self, signal: Tensor, rest: Tensor, t: float) -> None:
        self.reference, self.rest = signal, rest

    @torch.no_grad()
    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None) -> Tensor:
        m = self.model
        t = float(timesteps[0])
        img, txt, vec, pe = m.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        first, *others = m.double_blocks
        img1, txt1 = first(img=img, txt=txt, vec=vec, pe=pe)
        signal = img1 - img
        if (self.rest is None or self.rest.shape == img1.shape) and self.skip(signal, t):
            self.skipped += 1
            return m.final_layer(img1 + self.predicted_rest(t), vec)
        h_img, h_txt = img1, txt1
        for block in others:
            h_img, h_txt = block(img=h_img, txt=h_txt, vec=vec, pe=pe)
        out = m.single_stream(h_img, h_txt, vec, pe)
        self.remember(signal, out - img1, t)
        self.computed += 1
        return m.final_layer(out, vec)


class TaylorSeerCache(FirstBlockCache):
    """A full step every `interval` steps; in between, the rest extrapolated linearly in t from the last two full
    steps (held constant until there are two)."""

    def __init__(self, model, interval: int):
        super().__init__(model, threshold=0.0)
        if interval < 1:
            raise InputError(f"taylorseer interval must be >= 1, got {interval}")
        self.interval, self.calls = interval, 0
        self.history: list[tuple[float, Tensor]] = []  # (t, rest) of the last two full steps

    def skip(self, signal: Tensor, t: float) -> bool:
        self.calls += 1
        return self.rest is not None and (self.calls - 1) % self.interval != 0

    def predicted_rest(self, t: float) -> Tensor:
        if len(self.history) < 2:
            return self.rest
        (t0, r0), (t1, r1) = self.history
        return r1 + (r1 - r0) * ((t - t1) / (t1 - t0))

    def remember(self, signal: Tensor, rest: Tensor, t: float) -> None:
        super().remember(signal, rest, t)
        self.history = (self.history + [(t, rest)])[-2:]
