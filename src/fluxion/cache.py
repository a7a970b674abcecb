"""Step caching: skip most of the transformer on sampling steps, reusing what the skipped blocks added before.

Every step runs the embedders and the first double-stream block; what the rest of the network added to the image
tokens at a fully computed step ("the rest") stands in for it on skipped steps.
- First-Block Cache (as ParaAttention's FBCache), `fbcache:THRESHOLD`: skip when the first block's residual has
  moved, relative to its value at the last full step, by less than THRESHOLD (mean absolute change over mean
  absolute value); reuse the rest as it was.
- TaylorSeer-style, `taylorseer:N`: a full step every N steps; in between, the rest is extrapolated to the current
  time to first order from the last two full steps.
- TeaCache (Liu et al. 2024), `teacache:THRESHOLD`: decides before the first block, from the first block's modulated
  image input (the embedders and one adaLN projection: the cheapest signal). Its relative change since the previous
  step, mapped through a polynomial fitted per model to the relative change of the model's output
  (`fit_teacache`), is summed over steps; while the sum stays below THRESHOLD the step reuses the residual of all
  blocks, otherwise it is computed and the sum restarts.
The wrappers sit outside the model (the sampler calls them like a `Flux`), so LoRA hooks, true CFG (both halves
decide together, as one batch) and image-to-image work unchanged.
"""

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

log = logging.getLogger(__name__)

CACHE_KINDS = ("fbcache", "teacache", "taylorseer")
# each at most 0.6x the time at 28 steps on tiny-dev and tiny-pro for GenEval-shapes within 0.02 (docs/performance.md)
DEFAULT_THRESHOLDS = {"fbcache": 0.2, "teacache": 0.1, "taylorseer": 3}
# TeaCache without a polynomial fitted for the model: the raw relative change of the modulated input
IDENTITY_POLYNOMIAL = (1.0, 0.0)


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

    def wrap(self, model, teacache_polynomial: tuple[float, ...] | None = None) -> "FirstBlockCache":
        """A fresh cache for one denoising run of `model`; TeaCache takes the model's fitted polynomial
        (coefficients, highest power first; None: the identity)."""
        if self.kind == "taylorseer":
            return TaylorSeerCache(model, int(self.threshold))
        if self.kind == "teacache":
            return TeaCache(model, self.threshold, teacache_polynomial or IDENTITY_POLYNOMIAL)
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


class TeaCache(FirstBlockCache):
    """Skips while the summed, rescaled change of the first block's modulated input stays under the threshold;
    a skipped step reuses what all the blocks added at the last computed one. `trace` keeps, for consecutive
    computed steps, (input change, output change): the data `fit_teacache` fits the polynomial to."""

    def __init__(self, model, threshold: float, polynomial: tuple[float, ...] = IDENTITY_POLYNOMIAL):
        if threshold < 0:
            raise InputError(f"teacache threshold must be >= 0, got {threshold}")
        super().__init__(model, threshold=0.0)
        self.threshold, self.polynomial = threshold, tuple(polynomial)
        self.previous_input: Tensor | None = None  # the modulated input at the previous step (computed or not)
        self.previous_output: Tensor | None = None  # the model output at the previous step, if computed
        self.accumulated = 0.0
        self.trace: list[tuple[float, float]] = []

    def rescale(self, change: float) -> float:
        value = 0.0
        for c in self.polynomial:  # Horner
            value = value * change + c
        return max(value, 0.0)  # a fitted line may cross zero at small changes; a change is never negative

    @torch.no_grad()
    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None) -> Tensor:
        m = self.model
        img, txt, vec, pe = m.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        first = m.double_blocks[0]
        modulated = first.img_mod(vec)[0].modulate(first.img_norm1(img))
        change = None
        if self.previous_input is not None and self.previous_input.shape == modulated.shape:
            change = relative_change(modulated, self.previous_input)
        self.previous_input = modulated
        if change is not None and self.rest is not None:
            self.accumulated += self.rescale(change)
            if self.accumulated < self.threshold:
                self.skipped += 1
                self.previous_output = None
                return m.final_layer(img + self.rest, vec)
        self.accumulated = 0.0
        h_img, h_txt = img, txt
        for block in m.double_blocks:
            h_img, h_txt = block(img=h_img, txt=h_txt, vec=vec, pe=pe)
        out = m.single_stream(h_img, h_txt, vec, pe)
        self.rest = out - img
        self.computed += 1
        output = m.final_layer(out, vec)
        if change is not None and self.previous_output is not None:
            self.trace.append((change, relative_change(output, self.previous_output)))
        self.previous_output = output
        return output


@dataclass(frozen=True)
class TeaCacheFit:
    polynomial: tuple[float, ...]  # highest power first
    r_squared: float  # of the output change explained by the fit
    pairs: int  # (input change, output change) pairs it was fitted to
    input_range: tuple[float, float]


def fit_teacache(pipe, prompts: list[str], *, steps: int | None = None, degree: int = 1, seed: int = 0,
                 **generate_kwargs) -> TeaCacheFit:
    """Fit TeaCache's polynomial for `pipe`'s model: generate `prompts` with every step computed, and fit the
    relative change of the model's output between consecutive steps as a polynomial (least squares) of the
    relative change of the first block's modulated input. Degree 1 by default: on the tiny models degrees 2-4
    explain little more (R^2 0.45 against 0.40 on tiny-dev) and turn downwards just past the fitted range."""
    import numpy as np

    pairs = []
    for i, prompt in enumerate(prompts):  # one image per call: pipe.last_cache is that run's cache
        pipe(prompt, seed=seed + i, num_inference_steps=steps, output_type="latent", cache="teacache:0",
             **generate_kwargs)
        pairs += pipe.last_cache.trace
    if len(pairs) <= degree:
        raise InputError(f"fit_teacache: {len(pairs)} step pairs are too few for a degree-{degree} polynomial")
    x, y = np.array(pairs, dtype=np.float64).T
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    return TeaCacheFit(tuple(float(c) for c in coefficients), float(1 - residual.var() / y.var()), len(pairs),
                       (float(x.min()), float(x.max())))
