"""Safe weights I/O: safetensors only, validated headers, lazy per-tensor reads with dtype casts, atomic saves."""

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..files import atomic_write
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

# Files that are (or may be) Python pickles: unpickling runs arbitrary code, so we never open them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_PICKLE_ADVICE = ("pickle-based weights can run arbitrary code when loaded, so fluxion only reads .safetensors; "
                  "convert the file to safetensors with a tool you trust (e.g. `safetensors.torch.save_file` on a "
                  "state dict loaded in an isolated environment)")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Compute dtype for stored fp8 when the caller asks for none: fp8 matmuls are not generally available.
FP8_DEFAULT_DTYPE = torch.bfloat16
# Per-tensor scales of "scaled fp8" community files (ComfyUI): old names, then new names.
_FP8_SCALE_SUFFIXES = (("scale_weight", "scale_input"), ("weight_scale", "input_scale"))
_FP8_MARKERS = ("scaled_fp8",)
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference rejects larger headers too


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    """What a safetensors file holds, read from its header alone (no tensor data touched)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return counts


def _refuse_pickle(path: Path, head: bytes) -> None:
    looks_zip = head.startswith(b"PK\x03\x04")  # torch.save's default (zip of pickles)
    looks_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # pickle protocol 2..5 opcode
    if path.suffix.lower() in PICKLE_SUFFIXES:
        why = f"its suffix {path.suffix!r} is a pickle format"
    elif looks_zip:
        why = "its bytes are a zip archive (torch.save format, which contains pickles)"
    elif looks_pickle:
        why = "its bytes are a Python pickle"
    else:
        return
    raise CheckpointError(f"refusing to load {path}: {why}; {_PICKLE_ADVICE}")


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Validate a safetensors file's header against its size and return its metadata and tensor table."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_pickle(path, head)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too short to be safetensors (8-byte header length first)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} bytes is larger than the file ({size} bytes); "
                                  "the file is truncated or not safetensors")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} bytes exceeds the {_MAX_HEADER_BYTES}-byte limit; "
                                  "the file is corrupt or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the {n}-byte header is not valid UTF-8 JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
    tensors = {key: _tensor_info(path, key, entry) for key, entry in header.items()}
    _check_data_section(path, header, size - 8 - n)
    return CheckpointInfo(path=path, metadata=dict(metadata), tensors=tensors)


def _tensor_info(path: Path, key: str, entry) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: header entry for {key!r} needs dtype, shape and data_offsets, "
                              f"got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype!r}, which fluxion cannot read "
                              f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{path}: tensor {key!r} ({dtype}, shape {tuple(shape)}) needs {nbytes} bytes but its "
                              f"data_offsets {offsets} span {offsets[1] - offsets[0]}; the header is corrupt")
    return TensorInfo(dtype=dtype, shape=tuple(shape), nbytes=nbytes)


def _check_data_section(path: Path, header: dict, data_len: int) -> None:
    if not header:
        return
    last_key = max(header, key=lambda k: header[k]["data_offsets"][1])
    end = header[last_key]["data_offsets"][1]
    if end > data_len:
        raise CheckpointError(f"{path}: data section is {data_len} bytes but the header says tensors need {end} "
                              f"(tensor {last_key!r} ends at byte {end}); the file is truncated")
    if end < data_len:
        raise CheckpointError(f"{path}: {data_len - end} unexpected bytes after the last tensor ({last_key!r}); "
                              "the file is corrupt")


def _open(path: Path, device: str):
    # "pread" copies each tensor into memory it owns; the default mmap backend would keep the file's pages mapped
    # (and counted in RSS) next to the converted copies, up to ~2x the model size while loading.
    try:
        return safe_open(path, framework="pt", device=device, backend="pread")
    except TypeError:  # safetensors without the backend switch
        return safe_open(path, framework="pt", device=device)


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    if not t.is_floating_point():
        return t
    if dtype is None:
        dtype = FP8_DEFAULT_DTYPE if t.dtype in _FP8 else t.dtype
    return t.to(dtype)


def _fp8_scales(info: CheckpointInfo) -> tuple[dict[str, str], set[str]]:
    """Map fp8 weight keys to their per-tensor scale key, and list the keys consumed by dequantisation."""
    scale_of: dict[str, str] = {}
    drop: set[str] = {k for k in info.tensors if k.rsplit(".", 1)[-1] in _FP8_MARKERS}
    for key in info.tensors:
        prefix, _, name = key.rpartition(".")
        for weight_scale, input_scale in _FP8_SCALE_SUFFIXES:
            if name == weight_scale and f"{prefix}.weight" in info.tensors:
                if math.prod(info.tensors[key].shape) != 1:
                    raise CheckpointError(f"{info.path}: {key!r} has shape {info.tensors[key].shape}; only per-tensor "
                                          "(scalar) fp8 scales are supported")
                scale_of[f"{prefix}.weight"] = key
                drop.add(key)
            elif name == input_scale:
                drop.add(key)  # activation scales only matter to fp8 matmul kernels
    return scale_of, drop


def load_state_dict(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", prefix: str = "") -> dict[str, Tensor]:
    """Read a .safetensors file one tensor at a time, casting floating tensors to `dtype` as they arrive.

    dtype=None keeps stored dtypes, except fp8, which is upcast to bfloat16. Scaled-fp8 files (per-tensor
    `*.scale_weight` / `*.weight_scale` next to an fp8 `*.weight`) are dequantised and their scale keys dropped.
    A `prefix` reads only the keys under it (e.g. "model.diffusion_model." of an all-in-one file), keys unchanged.
    """
    info = read_checkpoint_info(path)
    scale_of, drop = _fp8_scales(info)
    drop |= {k for k in info.tensors if not k.startswith(prefix)}
    if scale_of:
        logger.info("%s: dequantising %d scaled-fp8 weights", info.path, len(scale_of))
    out: dict[str, Tensor] = {}
    try:
        with _open(info.path, str(device)) as f:
            for key in info.tensors:
                if key in drop:
                    continue
                t = f.get_tensor(key)
                if key in scale_of:
                    scale = f.get_tensor(scale_of[key]).float().reshape(())
                    t = t.float() * scale  # dequantise in fp32, then one rounding to the requested dtype
                    t = t.to(dtype or FP8_DEFAULT_DTYPE)
                else:
                    t = _cast(t, dtype)
                out[key] = t
    except SafetensorError as e:
        raise CheckpointError(f"{info.path}: safetensors could not read the file: {e}") from e
    return out


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share storage (views from splits, tied weights): copy the repeats."""
    seen: set[tuple[str, int]] = set()
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"cannot save {key!r}: expected a torch.Tensor, got {type(t).__name__}")
        storage = (str(t.device), t.untyped_storage().data_ptr())
        full = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == t.untyped_storage().nbytes()
        if storage in seen or not full:
            t = t.contiguous().clone() if t.is_contiguous() else t.contiguous()
        seen.add(storage)
        out[key] = t
    return out


def save_state_dict(tensors: dict[str, Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a .safetensors file atomically: temp file in the same folder, fsync, then rename."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"refusing to write {path}: fluxion writes only .safetensors files")
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise CheckpointError(f"metadata for {path} must map strings to strings; bad entries: {bad!r:.200}")
    return atomic_write(path, lambda tmp: save_file(_unshare(tensors), tmp, metadata=metadata))


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_state_dict(module: nn.Module, state_dict: dict[str, Tensor], *, source: str) -> None:
    """Raise CheckpointError naming `source` if keys are missing or unexpected, or shapes differ."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched, 3)}")
    if problems:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))


def load_into(module: nn.Module, state_dict: dict[str, Tensor], *, source: str) -> nn.Module:
    """Check, then assign the tensors as the module's parameters (no copy: their dtype and device are kept)."""
    check_state_dict(module, state_dict, source=source)
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module
