"""Pick the device and dtype: CUDA, then Apple MPS, then CPU, unless the user names one."""

import torch

from .errors import InputError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None and str(device) != "auto":
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"device (--device): expected one of {', '.join(available_devices())} or 'auto', "
                             f"got {device!r}") from None
        usable = {"cpu": True, "cuda": torch.cuda.is_available(),
                  "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not usable.get(chosen.type, False) or (
                chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count()):
            raise InputError(f"device (--device): {str(device)!r} is not available on this machine; available: "
                             f"{', '.join(available_devices())}")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on accelerators, fp32 on the CPU (where bf16 matmuls are rarely faster), unless asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype (--dtype): expected one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
