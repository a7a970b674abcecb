"""Batch invariance: a request's images must not depend on which other requests shared its forward passes.

Noise comes from each image's seed (sampling.get_noise), so what is left is floating point: a matrix multiply may
take a different kernel, and so round differently, depending on how many rows it is given. Measured on this
project's CPU (MKL sgemm, AVX-512), a row of a GEMM is bit-identical for any row count of 12 or more (and any
multiple of 4) but differs at 1-3, 5-7 and 9-11 rows; convolutions (oneDNN) pick their algorithm by batch size. FLUX
feeds its token GEMMs batch x tokens rows (16 or more per image, so batching does not change them) but its
timestep/vector embedders and every block's modulation GEMM get one row per image, and the VAE convolves the
whole batch at once.

`batch_invariant()` therefore computes, per sample, exactly those operations whose kernel choice depends on the
batch: GEMMs with fewer than MIN_SHARED_ROWS rows per sample, and convolutions. Everything else (token GEMMs,
attention, norms, elementwise ops) runs batched. One sample's work is then the very same kernel calls as a batch of
one, so a batched image equals, bit for bit, the image the pipeline makes for that prompt and seed alone
(`Pipeline(prompt, seed=s)`), which tests/test_server_batching.py checks on tiny-schnell, tiny-dev with a LoRA
adapter, and int8-quantized tiny-schnell. The server (fluxion.server.batching) runs every batch group under it.

On other devices (CUDA's GEMMs may split their reduction by problem size) every GEMM and convolution runs per
sample: still exact, but batching then saves only the per-operation overhead."""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# rows per sample from which this CPU's GEMM gives a row the same bits whatever the batch (measured: 12)
MIN_SHARED_ROWS = 16

_GEMMS = frozenset({F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm})
_CONVOLUTIONS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d})


class _PerSample(TorchFunctionMode):
    def __init__(self, all_gemms: bool):
        super().__init__()
        self.all_gemms = all_gemms

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _GEMMS or func in _CONVOLUTIONS) and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if x.dim() >= 2 and x.shape[0] > 1 and self._split(func, x):
                return torch.cat([func(sample, *args[1:], **kwargs) for sample in x.split(1)])
        return func(*args, **kwargs)

    def _split(self, func, x: torch.Tensor) -> bool:
        if func in _CONVOLUTIONS or self.all_gemms:
            return True
        rows_per_sample = math.prod(x.shape[1:-1])  # (B, K): 1 row; (B, L, K): L rows
        return rows_per_sample < MIN_SHARED_ROWS


@contextlib.contextmanager
def batch_invariant(device: torch.device | str = "cpu"):
    """Within this block (on this thread), batch-dependent operations run per sample (see the module docstring)."""
    with _PerSample(all_gemms=torch.device(device).type != "cpu"):
        yield
