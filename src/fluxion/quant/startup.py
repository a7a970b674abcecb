"""Loading a model's transformer quantized, without re-quantizing at every start: the first start quantizes and keeps
the result under $FLUXION_HOME/quantized (one safetensors file per source file, scheme and dtype); later starts
load that file. A source file changed since (size or modification time) gets a new one."""

import hashlib
import logging
from pathlib import Path

import torch

from ..errors import InputError
from ..model import Flux
from .schemes import get_scheme
from .storage import FORMAT_VERSION, is_quantized_file, load_quantized, save_quantized

log = logging.getLogger(__name__)


def _fingerprint(path: Path) -> str:
    """Identifies the source weights by path, sizes and modification times (hashing gigabytes would cost more
    than quantizing them)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    text = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def quantized_copy_path(source: Path, scheme: str, dtype: torch.dtype) -> Path:
    from ..devices import dtype_name
    from ..registry import fluxion_home

    name = f"{source.stem}-{_fingerprint(source)}-{scheme}-{dtype_name(dtype)}-v{FORMAT_VERSION}.safetensors"
    return fluxion_home() / "quantized" / name


def load_transformer_quantized(source: Path, scheme: str | None, *, dtype: torch.dtype,
                               device: str | torch.device) -> Flux:
    """The transformer at `source`: as stored if it is a quantized file (it must then match `scheme`, if given);
    else quantized with `scheme` (None: full precision), from the kept copy when there is one."""
    from ..checkpoints import load_transformer
    from . import quantize, quantized_scheme

    source = Path(source)
    if is_quantized_file(source):
        model = load_quantized(source, device=device, dtype=dtype)
        stored = quantized_scheme(model)
        if scheme is not None and get_scheme(scheme).name != stored:
            raise InputError(f"quantize: {source} is quantized as {stored}; it cannot become {scheme} (load the "
                             "full-precision model to quantize it otherwise)")
        return model
    if scheme is None:
        return load_transformer(source, dtype=dtype, device=device)
    scheme = get_scheme(scheme).name
    kept = quantized_copy_path(source, scheme, dtype)
    if kept.is_file():
        log.info("loading the %s transformer kept at %s", scheme, kept)
        return load_quantized(kept, device=device, dtype=dtype)
    model = quantize(load_transformer(source, dtype=dtype, device=device), scheme)
    try:
        save_quantized(model, kept, metadata={"fluxion.quantized_from": str(source.resolve())})
        log.info("kept the %s transformer at %s: later starts load it", scheme, kept)
    except OSError as e:  # a read-only home must not stop generation
        log.warning("could not keep the quantized transformer at %s (%s): it is quantized again at each start",
                    kept, e)
    return model
