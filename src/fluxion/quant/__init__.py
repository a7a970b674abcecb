"""Weight quantization of the Flux transformer: `quantize(transformer, scheme)` in place, safetensors save and load.

Schemes (SCHEMES): "int8" (int8 weights with per-channel scales, activations quantized to int8 per call, integer
matmul), "int8-weight" (int8 weights, model-dtype matmul), "fp8" (e4m3 weights with per-channel scales, computed in
the model dtype; fp8 matmul on GPUs that have it), "int4" (4-bit weights in groups of 64 with a scale and minimum
each, model-dtype matmul). Kernels and their measured speeds: fluxion.quant.linear.

Own implementation, not torchao (measured, benchmarks/quantize.py; torchao 0.18, torch 2.13, 2-core AMD EPYC):
on the CPU torchao's int8 dynamic-activation config is 1.6x slower than the fp32 GEMM where fbgemm's dynamic linear,
which fluxion uses, is 6x faster; its int8/fp8 weight-only configs dequantize per call as fluxion does, no faster;
its int4 config cannot run on a CPU (it needs the mslk package or CUDA). Its weights are tensor subclasses, which
safetensors cannot store as plain tensors. The CUDA kernels fluxion calls (torch._int_mm, torch._scaled_mm) are
those torchao's configs dispatch to. So fluxion needs no torchao (`import fluxion` and every scheme work without
it); `pip install fluxion[quant]` adds it for the benchmark's comparison (fluxion.quant._torchao).
"""

from torch import nn

from ..errors import InputError
from .linear import QuantLinear
from .schemes import SCHEME_TABLE, SCHEMES, Scheme, get_scheme
from .storage import QUANT_METADATA_KEY, is_quantized_file, load_quantized, save_quantized

# Left in full precision (measured on the benchmark models, random weights): img_in (64 inputs; BFL control LoRAs
# widen it) and final_layer.linear (64 outputs: the prediction itself), and the conditioning embedders time_in,
# vector_in and guidance_in, whose one vector modulates every block: quantized, these make a third of the 60m
# model's output error at every scheme (int4: 0.24 -> 0.16, fp8: 0.074 -> 0.049). Together 0.3% of FLUX.1's
# weights. The adaLN modulation (a quarter of FLUX.1's weights) is quantized: leaving it out would cost that much
# memory to cut the int4 error only from 0.16 to 0.12.
SKIP = ("img_in", "final_layer.linear")
SKIP_PREFIXES = ("time_in.", "vector_in.", "guidance_in.")


def quantizable(name: str, module: nn.Module) -> bool:
    """The rule: every nn.Linear of the transformer except SKIP and those under SKIP_PREFIXES; the adaLN
    modulation runs weight-only (its input is one vector per sample), the rest as the scheme says."""
    return (isinstance(module, nn.Linear) and not isinstance(module, QuantLinear) and name not in SKIP
            and not name.startswith(SKIP_PREFIXES))


def quantize(transformer: nn.Module, scheme: str) -> nn.Module:
    """Quantize the transformer's Linear layers (the rule: `quantizable`) in place and return it.

    Quantize before loading LoRA adapters, enabling offload or compiling: they hold the layers this replaces, so
    they are refused here. A model already quantized with `scheme` is returned as it is; another scheme is refused
    (quantizing quantized weights again would compound the error: load the full-precision model)."""
    s = get_scheme(scheme)
    current = quantized_scheme(transformer)
    if current == s.name:
        return transformer
    if current is not None:
        raise InputError(f"scheme: the model is quantized as {current} already; load the full-precision model to "
                         f"quantize it as {s.name}")
    lora = getattr(transformer, "_fluxion_lora", None)
    busy = {"LoRA adapters are loaded": lora is not None and (lora.adapters or getattr(lora, "hotswap", None)),
            "offload is enabled": getattr(transformer, "_fluxion_offload", None) is not None,
            "the model is compiled": getattr(transformer, "_fluxion_compiled", None) is not None}
    why = [what for what, yes in busy.items() if yes]
    if why:
        raise InputError(f"cannot quantize: {' and '.join(why)}; quantize first (they hold the layers it replaces)")
    targets = [(name, m) for name, m in transformer.named_modules() if quantizable(name, m)]
    for name, linear in targets:
        owner, _, attr = name.rpartition(".")
        setattr(transformer.get_submodule(owner), attr, QuantLinear.from_linear(linear, s.name))
    return transformer


def quantized_scheme(transformer: nn.Module) -> str | None:
    """The scheme the model's layers are quantized with, or None for a full-precision model."""
    for module in transformer.modules():
        if isinstance(module, QuantLinear):
            return module.scheme.name
    return None


__all__ = ["QUANT_METADATA_KEY", "SCHEMES", "SCHEME_TABLE", "SKIP", "SKIP_PREFIXES", "QuantLinear", "Scheme",
           "get_scheme", "is_quantized_file", "load_quantized", "quantizable", "quantize", "quantized_scheme",
           "save_quantized"]
