"""The quantization schemes and their weight math: plain tensors in, plain tensors out (what the files store).

Every scheme is symmetric around zero except int4, which stores a per-group minimum as well (asymmetric, as
torchao's and GPTQ's 4-bit formats): with 16 levels, spending one on an unused sign half costs too much accuracy.
Scales are always float32, whatever the model dtype.
"""

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from ..errors import InputError

INT8_MAX = 127  # symmetric: -128 is unused, so -w and w quantize alike
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
INT4_LEVELS = 15
INT4_GROUP = 64  # measured on the 300m benchmark model: 64 halves group 128's output error for 3% more bytes


@dataclass(frozen=True)
class Scheme:
    name: str
    storage: torch.dtype  # dtype of the stored weight data: int8, float8_e4m3fn, uint8 (two 4-bit values a byte)
    dynamic: bool = False  # activations quantized to int8 per call, integer matmul
    group_size: int | None = None  # None: one scale per output channel
    summary: str = ""


SCHEME_TABLE: dict[str, Scheme] = {
    "int8": Scheme("int8", torch.int8, dynamic=True,
                   summary="int8 weights (per-channel scales) and dynamic int8 activations, integer matmul"),
    "int8-weight": Scheme("int8-weight", torch.int8, summary="int8 weights (per-channel scales), model-dtype matmul"),
    "fp8": Scheme("fp8", torch.float8_e4m3fn,
                  summary="fp8 e4m3 weights (per-channel scales), model-dtype matmul (fp8 matmul on fp8 GPUs)"),
    "int4": Scheme("int4", torch.uint8, group_size=INT4_GROUP,
                   summary=f"4-bit weights in groups of {INT4_GROUP} (scale and minimum each), model-dtype matmul"),
}
SCHEMES = tuple(SCHEME_TABLE)


def get_scheme(scheme: str) -> Scheme:
    if not isinstance(scheme, str) or scheme not in SCHEME_TABLE:
        raise InputError(f"scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    return SCHEME_TABLE[scheme]


def group_size_for(scheme: Scheme, in_features: int) -> int | None:
    """The scheme's group size, halved until it divides in_features (small test models have 32-wide inputs)."""
    g = scheme.group_size
    if g is None:
        return None
    while in_features % g:
        g //= 2
    if g < 2:
        raise InputError(f"{scheme.name}: in_features {in_features} is odd; 4-bit weights pack two values a byte")
    return g


@torch.no_grad()
def quantize_weight(weight: Tensor, scheme: Scheme) -> dict[str, Tensor]:
    """(out, in) float weight -> {"qweight", "qscale"[, "qzero"]}, computed in float32."""
    w = weight.detach().float()
    if scheme.storage == torch.int8:
        scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return {"qweight": q, "qscale": scale}
    if scheme.storage == torch.float8_e4m3fn:
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"qweight": q, "qscale": scale}
    g = group_size_for(scheme, w.shape[1])
    groups = w.reshape(w.shape[0], -1, g)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / INT4_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, INT4_LEVELS).to(torch.uint8)
    q = q.reshape(w.shape[0], -1)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "qscale": scale, "qzero": low}


@cache
def _fp8_table(device: torch.device) -> Tensor:
    """float32 value of each e4m3 bit pattern (NaN patterns, which quantize_weight never writes, as 0)."""
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.nan_to_num(table, nan=0.0).to(device)


def stored_values(qweight: Tensor) -> Tensor:
    """int8 or fp8 weight data as float32. On the CPU an fp8 cast takes ~4 ns an element (torch 2.13 has no vector
    path for it; int8 casts are 30x faster): a lookup in a 256-entry table is 7x faster than the cast."""
    if qweight.dtype == torch.float8_e4m3fn and qweight.device.type == "cpu":
        codes = qweight.view(torch.uint8).reshape(-1).int()
        return _fp8_table(qweight.device).index_select(0, codes).view(qweight.shape)
    return qweight.to(torch.float32)


def dequantize_weight(qweight: Tensor, qscale: Tensor, qzero: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight the stored data stands for, in `dtype` (float32 arithmetic, one rounding)."""
    if qzero is None:  # int8 / fp8, one scale per output channel
        return (stored_values(qweight) * qscale[:, None]).to(dtype)
    out = qweight.shape[0]
    q = torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(out, qscale.shape[1], -1)
    return (q.to(torch.float32) * qscale[..., None] + qzero[..., None]).reshape(out, -1).to(dtype)
