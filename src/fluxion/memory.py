"""How much memory and time a generation job needs before it starts, and how much memory the device has."""

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .model.configs import AutoEncoderParams, FluxParams

# Working memory per token of one transformer forward, in units of the hidden size: about 16 activations of the
# model dtype live at once in a single-stream block (x, linear1's 3D + 4D output, q and k, the attention and MLP
# outputs and their concatenation), plus about 8 float32 ones (RMSNorm and RoPE compute in float32); RoPE's
# angles add ~24 bytes per head channel (float64 angles, complex128 then complex64 rotations). Measured on the CPU
# (tiny-schnell, fp32, 512-1024 px, batch 2-4): 16.7-20.8 KB per token, against 20.0 KB from these constants.
TRANSFORMER_DTYPE_UNITS = 16
TRANSFORMER_FP32_UNITS = 8
ROPE_BYTES_PER_HEAD_CHANNEL = 24
# The VAE decoder peaks at full resolution, where about 4.5 activations of the widest full-resolution layer (the
# upsample from level 1) live at once, GroupNorm and conv workspaces included.
VAE_UNITS = 4.5
# Measured on the CPU with tiny-schnell in fp32 (peak RSS growth of jobs in a warmed-up process with freed memory
# trimmed and the peak mark reset, benchmarks/memory_estimate.py): 112, 320, 728 and 1200 MB for whole jobs at
# 256-1024 px (these constants with JOB_BASE_BYTES: 109, 336, 713, 1242), and 120-337 MB for transformer-only runs
# of batch 2-4 at 512-1024 px (117-363). One-time costs of a process's first job are not counted (importing the
# FLOP counter behind --allow-any-size's time estimate: ~80 MB); the headroom below covers them.
# What a job touches beyond its activations, whatever its size: allocator and thread-pool pages (measured as the
# gap on the smallest jobs, 40-50 MB at 256 px; taken lower so that large jobs stay within the fit).
JOB_BASE_BYTES = 32 * 2**20
VAE_TILE = 512  # pixels a side of a tile in the tiled decode (AutoEncoder.decode_tiled's 64 latent pixels)
# A job may take this share of the memory still available: the rest stays for the system and the estimate's error.
MEMORY_HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a job in bytes: the resident weights plus the largest working set of its phases (text
    encoding, transformer forwards, VAE decode run one after another, each freeing its memory) plus a base that
    every job touches."""

    weights: int
    transformer: int
    vae: int
    base: int = JOB_BASE_BYTES

    @property
    def working(self) -> int:
        return max(self.transformer, self.vae) + self.base

    @property
    def total(self) -> int:
        return self.weights + self.working


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def module_bytes(*modules) -> int:
    total = 0
    for m in modules:
        if isinstance(m, nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    return total


def transformer_bytes(params: FluxParams, tokens: int, batch: int, itemsize: int) -> int:
    """Working memory of one forward over `tokens` (image + text) tokens; attention runs in memory-efficient
    kernels (CPU flash, CUDA flash/efficient), so it adds no L x L term."""
    head_dim = params.hidden_size // params.num_heads
    per_token = params.hidden_size * (TRANSFORMER_DTYPE_UNITS * itemsize + TRANSFORMER_FP32_UNITS * 4) \
        + ROPE_BYTES_PER_HEAD_CHANNEL * head_dim
    return batch * tokens * per_token


def vae_bytes(params: AutoEncoderParams, height: int, width: int, batch: int, itemsize: int,
              tiled: bool = False) -> int:
    """Working memory of a decode (the encode of image-to-image needs less: its widest full-resolution layer is
    narrower). Tiled, the peak is one tile's plus the float32 output and blending weights."""
    widest = params.ch * max(params.ch_mult[: 2])  # channels at full resolution: level 0, and level 1 upsampled
    if tiled:
        tile = min(height, VAE_TILE) * min(width, VAE_TILE)
        return int(batch * (VAE_UNITS * widest * itemsize * tile + 2 * 4 * params.out_ch * height * width))
    return int(batch * VAE_UNITS * widest * itemsize * height * width)


def quantized_working_bytes(transformer, device_type: str) -> int:
    """What quantized layers (fluxion.quant) take beyond their stored bytes while they run: int8 on the CPU keeps
    fbgemm's packed copy of its weights (one byte per weight); the dequantizing schemes rebuild one layer's full
    weight per call (through float32: 4 bytes per weight at most)."""
    extra, widest = 0, 0
    for module in transformer.modules():
        if getattr(module, "qweight", None) is None:
            continue
        weights = module.in_features * module.out_features
        if module.scheme.dynamic and device_type == "cpu":
            extra += weights
        else:
            widest = max(widest, 4 * weights)
    return extra + widest


def estimate_memory(transformer, autoencoder, text_encoder=None, *, height: int, width: int, batch: int,
                    text_tokens: int, cfg: bool = False, tiled: bool = False, offload: str | None = None,
                    sliced: bool = False) -> MemoryEstimate:
    """Peak memory of generating `batch` images of height x width with the given (loaded) models, on the device
    they run on. offload ("model" or "sequential", fluxion.offload): only the weights resident at the peak count.
    sliced: the VAE decodes one image at a time (fluxion.slicing)."""
    from .offload import device_weight_bytes
    from .slicing import sliced_vae_bytes

    itemsize = next(transformer.parameters()).element_size()
    factor = autoencoder.downsample_factor * 2  # pixels per token side: VAE down-sampling, then 2x2 packing
    image_tokens = (height // factor) * (width // factor)
    forward_batch = batch * (2 if cfg else 1)  # true CFG runs both halves in one batched forward
    models = {name: m for name, m in (("transformer", transformer), ("autoencoder", autoencoder),
                                      ("text_encoder", text_encoder)) if isinstance(m, nn.Module)}
    vae_itemsize = next(autoencoder.parameters()).element_size()
    vae = (sliced_vae_bytes if sliced and batch > 1 else vae_bytes)(autoencoder.params, height, width, batch,
                                                                     vae_itemsize, tiled)
    return MemoryEstimate(
        weights=(module_bytes(*models.values()) if offload is None else device_weight_bytes(models, offload))
        + quantized_working_bytes(transformer, next(transformer.parameters()).device.type),
        transformer=transformer_bytes(transformer.params, image_tokens + text_tokens, forward_batch, itemsize),
        vae=vae,
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Memory the container's cgroup (v2, then v1) still allows, if it sets a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(Path("/sys/fs/cgroup") / limit_file)
        usage = _read_int(Path("/sys/fs/cgroup") / usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            return max(limit - usage, 0)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes a new job can still take on `device`: free GPU memory (plus what PyTorch caches), or on the CPU the
    kernel's MemAvailable, capped by a container limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    headroom = _cgroup_headroom()
    if headroom is not None:
        found.append(headroom)
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else 2**62  # unknown: do not refuse on a guess


# -- time ---------------------------------------------------------------------------------------------------------
def job_flops(transformer, autoencoder, *, height: int, width: int, batch: int, steps: int, text_tokens: int,
              cfg: bool = False) -> float:
    """FLOPs of a job, counted by running the models on shape-only ("meta") tensors: exact for the matmuls,
    convolutions and attention, free of any computation."""
    from torch.utils.flop_counter import FlopCounterMode

    from . import sampling

    factor = autoencoder.downsample_factor
    with torch.device("meta"):
        flux = type(transformer)(transformer.params)
        vae = type(autoencoder)(autoencoder.params)
        h, w = height // factor, width // factor
        img = torch.empty(1, (h // 2) * (w // 2), transformer.in_channels)
        ids = sampling.image_ids(1, h, w, "meta")
        txt = torch.empty(1, text_tokens, transformer.params.context_in_dim)
        y = torch.empty(1, transformer.params.vec_in_dim)
        guidance = torch.empty(1) if transformer.params.guidance_embed else None
        with FlopCounterMode(display=False) as forward:
            flux(img=img, img_ids=ids, txt=txt, txt_ids=torch.zeros(1, text_tokens, 3), timesteps=torch.empty(1),
                 y=y, guidance=guidance)
        with FlopCounterMode(display=False) as decode:
            vae.decode(torch.empty(1, autoencoder.params.z_channels, h, w))
    forwards = steps * (2 if cfg else 1)
    return batch * (forwards * forward.get_total_flops() + decode.get_total_flops())


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, seconds: float = 0.2) -> float:
    """What this device's matrix multiply reaches at a mid-sized square product: an upper bound on a job's pace."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * runs / (time.perf_counter() - start)
