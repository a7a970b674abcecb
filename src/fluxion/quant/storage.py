"""Quantized transformers as one safetensors file of plain tensors, loaded back without re-quantizing.

Keys: the model's state dict, where a quantized Linear `<path>` holds `<path>.qweight`, `<path>.qscale` (float32),
for int4 `<path>.qzero`, and its bias. Header metadata: `fluxion.quantization` (the scheme), the format version,
the whole FluxParams as JSON and the compute dtype, so the file alone rebuilds the model.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..checkpoints.detect import params_metadata
from ..checkpoints.io import CheckpointError, load_into, read_checkpoint_info, save_state_dict
from ..errors import InputError
from ..model import Flux, FluxParams
from .linear import QuantLinear
from .schemes import SCHEME_TABLE

QUANT_METADATA_KEY = "fluxion.quantization"
VERSION_KEY = "fluxion.quantization.version"
PARAMS_KEY = "fluxion.quantization.params"
DTYPE_KEY = "fluxion.quantization.dtype"
FORMAT_VERSION = "1"
_QUANT_SUFFIXES = (".qweight", ".qscale", ".qzero")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            return module.weight.dtype
    raise InputError("save_quantized: the model is not quantized; call fluxion.quant.quantize(model, scheme) first")


def save_quantized(transformer: Flux, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the quantized transformer to one .safetensors file, atomically; `metadata` (str -> str) is added to
    the header. Loaded adapters must be unloaded first if they replaced or widened weights (the file is the base)."""
    from . import quantized_scheme

    scheme = quantized_scheme(transformer)
    dtype = _compute_dtype(transformer)
    params = getattr(transformer, "params", None)
    if not isinstance(params, FluxParams):
        raise InputError(f"save_quantized: expected a Flux transformer, got {type(transformer).__name__}")
    lora = getattr(transformer, "_fluxion_lora", None)
    if lora is not None and (lora.replaced or lora.widened or lora.fused):
        raise InputError("save_quantized: loaded LoRA adapters change the model's weights; unload them first")
    ours = {"format": "pt", QUANT_METADATA_KEY: scheme, VERSION_KEY: FORMAT_VERSION, DTYPE_KEY: _DTYPE_NAMES[dtype],
            PARAMS_KEY: json.dumps(dataclasses.asdict(params)), **params_metadata(params)}
    extra = dict(metadata or {})
    bad = {k: v for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise InputError(f"metadata: expected a dict of str to str, got {bad!r:.200}")
    clash = sorted(extra.keys() & ours.keys())
    if clash:
        raise InputError(f"metadata: keys {clash} are written by save_quantized itself")
    tensors = {k: v.detach().cpu() for k, v in transformer.state_dict().items()}
    return save_state_dict(tensors, path, metadata={**ours, **extra})


def is_quantized_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file written by save_quantized (reads the header only). Not a file: False; a file that
    is not valid safetensors raises CheckpointError, as any loader would."""
    path = Path(path)
    return path.is_file() and QUANT_METADATA_KEY in read_checkpoint_info(path).metadata


def load_quantized(path: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> Flux:
    """The quantized transformer stored at `path`, in eval mode, its quantized data exactly as saved (nothing is
    re-quantized). `dtype` (default: the saved one) is the compute dtype: the full-precision parameters and the
    biases are cast to it; quantized data and scales keep their stored dtypes."""
    info = read_checkpoint_info(path)
    meta = info.metadata
    scheme = meta.get(QUANT_METADATA_KEY)
    if scheme is None:
        raise CheckpointError(f"{info.path} has no {QUANT_METADATA_KEY!r} metadata: not a quantized fluxion file "
                              "(load it with fluxion.load_transformer)")
    if scheme not in SCHEME_TABLE or meta.get(VERSION_KEY) != FORMAT_VERSION:
        raise CheckpointError(f"{info.path}: quantization {scheme!r} format {meta.get(VERSION_KEY)!r} is not one this "
                              f"fluxion reads (schemes {', '.join(SCHEME_TABLE)}, format {FORMAT_VERSION})")
    try:
        params = FluxParams(**json.loads(meta[PARAMS_KEY]))
        stored = next(d for d, name in _DTYPE_NAMES.items() if name == meta[DTYPE_KEY])
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise CheckpointError(f"{info.path}: unreadable {PARAMS_KEY!r}/{DTYPE_KEY!r} metadata ({e})") from e
    dtype = dtype or stored
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Flux(params)
        for key in info.tensors:
            if key.endswith(".qweight"):
                _swap_in(model, key.removesuffix(".qweight"), scheme, info)
    state = _read(info.path, device, dtype)
    load_into(model, state, source=str(info.path))
    for module in model.modules():
        if isinstance(module, QuantLinear):  # the placeholder was on meta: now the compute dtype on `device`
            module.weight = torch.empty(0, device=device, dtype=dtype)
            if module.bias is not None:
                module.bias.requires_grad_(False)
    return model.eval()


def _swap_in(model: Flux, path: str, scheme: str, info) -> None:
    try:
        linear = model.get_submodule(path)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{info.path}: {path}.qweight names no Linear layer of the model its metadata describes")
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner), attr, QuantLinear(linear.in_features, linear.out_features,
                                                          linear.bias is not None, scheme, device="meta"))


def _read(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    out = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                t = f.get_tensor(key)
                quantized = key.endswith(_QUANT_SUFFIXES)
                t = t if quantized or not t.is_floating_point() else t.to(dtype)
                # a fresh, aligned copy: a view into the file's buffer can sit at any offset, and the CPU GEMM's
                # rounding depends on alignment (the kept int8 copy then differed from a fresh quantization by 4/255)
                out[key] = t.clone() if t.data_ptr() % 64 else t
    except SafetensorError as e:
        raise CheckpointError(f"{path}: safetensors could not read the file: {e}") from e
    return out
