"""QuantLinear: an nn.Linear whose weight is stored quantized, as plain buffers (what the files hold).

It stays an nn.Linear, so fluxion.lora's forward hooks, hot-swap slots and offload treat it as any Linear. Its
`weight` is a 0-element placeholder in the compute dtype: code that asks for the weight's device and dtype (LoRA
updates, hot-swap slots) gets the right answer, and nothing can write a full weight into it unnoticed (a fused
LoRA would have to re-quantize; fluxion.lora refuses it). The stored data: `qweight` (int8, float8_e4m3fn, or uint8
holding two 4-bit values), `qscale` (float32, per output channel or per group) and, for int4, `qzero` (float32).

Kernels, chosen per call by device (measured on a 2-core AMD EPYC with AVX-512 VNNI; benchmarks/quantize.py):
- int8, CPU: PyTorch's fbgemm dynamic linear (`quantized::linear_dynamic` on weights packed once and cached): one
  op quantizes the activations (per tensor, asymmetric uint8), multiplies in int8 and adds the bias; 6x faster than
  the fp32 GEMM on a 1088x1024x4096 linear, where `torch._int_mm` with activation quantization and dequantization as
  separate ops is about as slow as fp32 and torchao's Int8DynamicActivationInt8WeightConfig 1.6x slower. It runs
  per sample, so a sample's result does not depend on the batch it is in. The packed copy is extra memory (1 byte
  per weight) while the layer runs on the CPU.
- int8, CUDA (or a CPU build without fbgemm): per-token int8 activations and `torch._int_mm` (cuBLASLt on CUDA).
- fp8 on CUDA GPUs with fp8 tensor cores (compute capability 8.9+) in bf16: per-token fp8 activations and
  `torch._scaled_mm`; everywhere else fp8 dequantizes to the model dtype (CPUs have no fp8 matmul that pays:
  `torch._scaled_mm` on this CPU is 2.5x slower than the fp32 GEMM).
- int8-weight, int4, fp8 elsewhere and every conditioning vector (2-D inputs: the adaLN modulation): the weight is
  dequantized to the model dtype for the call and multiplied by the usual GEMM. On the CPU that is about
  the fp32 speed: these schemes save memory, int8 saves time. (torch's `_weight_int8pack_mm` and
  `_weight_int4pack_mm_for_cpu` were as fast in bf16 and 20-60x slower in fp32.)
"""

import logging
import warnings
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schemes import (FP8_MAX, INT8_MAX, Scheme, dequantize_weight, get_scheme, group_size_for, quantize_weight,
                      stored_values)

logger = logging.getLogger(__name__)

# Fewer tokens than this run on the dequantized weight: integer GEMM set-up costs more than it saves (and
# cuBLASLt's int8 GEMM needs more than 16 rows).
DYNAMIC_MIN_TOKENS = 17
# CPU kernel for int8: "fbgemm" (when this torch build has it) or "int_mm"; tests switch it to cover both.
CPU_INT8_KERNEL = "fbgemm"
_TINY = torch.finfo(torch.float32).tiny


class QuantLinear(nn.Linear):
    """nn.Linear with quantized weights; see the module docstring. Build with `from_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, device=None,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full float weight
        self.in_features, self.out_features = in_features, out_features
        self.scheme: Scheme = get_scheme(scheme)
        s = self.scheme
        g = group_size_for(s, in_features)
        packed_in = in_features // 2 if s.storage == torch.uint8 else in_features
        scale_shape = (out_features,) if g is None else (out_features, in_features // g)
        self.register_buffer("weight", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self.register_buffer("qweight", torch.empty(out_features, packed_in, device=device, dtype=s.storage))
        self.register_buffer("qscale", torch.empty(scale_shape, device=device, dtype=torch.float32))
        if g is not None:
            self.register_buffer("qzero", torch.empty(scale_shape, device=device, dtype=torch.float32))
        else:
            self.qzero = None
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self._packed = None  # (key, fbgemm packed weight) cache, see _fbgemm_weight
        self._kernel_failed = False  # a GPU kernel raised: dequantize instead

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "QuantLinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device="meta",
                  dtype=w.dtype)
        for name, tensor in quantize_weight(w, new.scheme).items():
            setattr(new, name, tensor.to(w.device))
        new.weight = torch.empty(0, device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}"

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full weight the stored data stands for, in `dtype` (default: the compute dtype)."""
        return dequantize_weight(self.qweight, self.qscale, self.qzero, dtype or self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        s = self.scheme
        # the integer and fp8 kernels have no backward: inputs that need gradients take the dequantized path
        fast = x.ndim >= 3 and x.shape[-2] >= DYNAMIC_MIN_TOKENS and not (torch.is_grad_enabled() and x.requires_grad)
        if fast and not self._kernel_failed and (s.dynamic or s.storage == torch.float8_e4m3fn and _fp8_gpu(x)):
            try:
                y = self._low_precision_matmul(x)
            except RuntimeError as e:  # GPU kernels are untested on some GPUs/versions: fall back once, loudly
                if x.device.type == "cpu":
                    raise
                self._kernel_failed = True
                logger.warning("%s matmul failed on %s (%s); this layer dequantizes to %s from now on", s.name,
                               torch.cuda.get_device_name(x.device), e, x.dtype)
                y = None
            if y is not None:
                return y
        # a few rows per sample (adaLN's one vector): scale the output, not the weight, one weight-sized pass less
        # (int8 and fp8 values are exact in bf16 and fp16). Counted per sample, not per batch, so that a sample's
        # path, and so its rounding, does not depend on its batch.
        rows_per_sample = x.shape[-2] if x.ndim >= 3 else 1
        if s.group_size is None and rows_per_sample < DYNAMIC_MIN_TOKENS:
            y = F.linear(x, stored_values(self.qweight).to(x.dtype)) * self.qscale.to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def _low_precision_matmul(self, x: Tensor) -> Tensor | None:
        if not self.scheme.dynamic:
            return fp8_scaled_mm(x, self.qweight, self.qscale, self.bias)
        if x.device.type == "cpu" and CPU_INT8_KERNEL == "fbgemm":
            packed = self._fbgemm_weight()
            if packed is not None:
                return _fbgemm_linear(x, packed)
        return int8_int_mm(x, self.qweight, self.qscale, self.bias)

    def _fbgemm_weight(self):
        """The weights packed for fbgemm, built on first use and cached (re-built when the tensors change, e.g. after
        offload brought a new copy). None when this torch cannot pack them."""
        bias = self.bias
        key = (self.qweight.data_ptr(), self.qscale.data_ptr(), None if bias is None else (bias.data_ptr(), bias.dtype))
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        packed = _fbgemm_pack(self.qweight, self.qscale, None if bias is None else bias.float())
        self._packed = (key, packed)
        return packed

    def _apply(self, fn, recurse=True):
        """Device moves apply to everything; dtype casts only to the placeholder and the bias (the compute dtype):
        the stored data keeps its dtypes (model.to(bf16) must not turn fp8 weights or float32 scales into bf16)."""
        before = {name: self._buffers[name] for name in ("qweight", "qscale", "qzero") if self._buffers.get(name)
                  is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._packed = None
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None  # an fbgemm object: rebuilt on demand, not copied or pickled
        return state


def _fbgemm_pack(qweight: Tensor, qscale: Tensor, bias: Tensor | None):
    try:
        with warnings.catch_warnings():  # PyTorch flags quantized tensors as deprecated; fbgemm still needs one
            warnings.simplefilter("ignore")
            w = torch._make_per_channel_quantized_tensor(qweight, qscale.double(),
                                                         torch.zeros_like(qscale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(w, bias)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        _warn_no_fbgemm(str(e))
        return None


@cache
def _warn_no_fbgemm(reason: str) -> None:
    logger.warning("int8: this torch cannot pack weights for fbgemm (%s); using torch._int_mm, slower", reason)


@cache
def _reduce_range() -> bool:
    """fbgemm without VNNI sums pairs of u8*s8 products in int16, which saturates at full 8-bit activations:
    there, activations use 7 bits (PyTorch's default for x86). VNNI accumulates in int32: all 8 bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return "avx512_vnni" not in flags.split()


def _fbgemm_linear(x: Tensor, packed) -> Tensor:
    xf = x.reshape(-1, *x.shape[-2:]).float().contiguous()
    # one call per sample: the activation scale is per tensor, so a batch would couple its samples' results
    ys = [torch.ops.quantized.linear_dynamic(sample, packed, _reduce_range()) for sample in xf]
    y = ys[0][None] if len(ys) == 1 else torch.stack(ys)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _per_token(x2d: Tensor, qmax: float) -> tuple[Tensor, Tensor]:
    """Symmetric per-row scale and the scaled rows (float32)."""
    xf = x2d.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_TINY)
    return xf / scale, scale


def int8_int_mm(x: Tensor, qweight: Tensor, qscale: Tensor, bias: Tensor | None) -> Tensor | None:
    """Per-token int8 activations x int8 weights with torch._int_mm; None where its shape rules are not met."""
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    if x.device.type == "cuda" and (x2d.shape[0] <= 16 or k % 8 or n % 8):
        return None
    xs, scale = _per_token(x2d, INT8_MAX)
    xq = torch.round(xs).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    y = torch._int_mm(xq, qweight.t()).float().mul_(scale).mul_(qscale)
    if bias is not None:
        y += bias.float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _fp8_gpu(x: Tensor) -> bool:
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 9))


def fp8_scaled_mm(x: Tensor, qweight: Tensor, qscale: Tensor, bias: Tensor | None) -> Tensor:
    """Per-token fp8 activations x fp8 weights with torch._scaled_mm (row-wise scales), output in x's dtype."""
    n, k = qweight.shape
    xs, scale = _per_token(x.reshape(-1, k), FP8_MAX)
    xq = xs.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=scale, scale_b=qscale[None, :], out_dtype=x.dtype,
                         bias=None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], n)
