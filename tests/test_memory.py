"""The memory estimate against measured peak RSS, the memory available, and jobs refused or split to fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxion.memory import available_memory, estimate_memory, transformer_bytes, vae_bytes
from fluxion.model import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "memory_estimate.py"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
@pytest.mark.parametrize("size, batch, output", [
    (512, 1, "pil"), (768, 1, "pil"), (1024, 1, "pil"),  # the VAE decode is the peak (256 px: too small to measure)
    (768, 4, "latent"), (1024, 2, "latent"), (1024, 4, "latent"),  # the transformer is the peak
])
def test_estimate_is_within_30_percent_of_measured_peak_rss(size, batch, output):
    """One job in a fresh process (benchmarks/memory_estimate.py --job): peak RSS growth against the estimate."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(BENCHMARK), "--job", str(size), str(batch), output], capture_output=True,
                       text=True, env=env, timeout=300, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.7 <= m["ratio"] <= 1.3, m


def test_estimate_scales_with_batch_tokens_dtype_and_cfg():
    params = TRANSFORMER_PRESETS["tiny-dev"]
    one = transformer_bytes(params, tokens=1000, batch=1, itemsize=4)
    assert transformer_bytes(params, 2000, 1, 4) == 2 * one == transformer_bytes(params, 1000, 2, 4)
    assert transformer_bytes(params, 1000, 1, 2) < one  # bf16 halves the model-dtype part
    vae = AUTOENCODER_PRESETS["tiny"]
    assert vae_bytes(vae, 2048, 2048, 1, 4, tiled=True) < vae_bytes(vae, 2048, 2048, 1, 4) / 4
    with torch.device("meta"):
        from fluxion.model import AutoEncoder, Flux

        flux, ae = Flux(params), AutoEncoder(vae)
    plain = estimate_memory(flux, ae, height=512, width=512, batch=1, text_tokens=24)
    cfg = estimate_memory(flux, ae, height=512, width=512, batch=1, text_tokens=24, cfg=True)
    assert cfg.transformer == 2 * plain.transformer and cfg.vae == plain.vae
    assert plain.weights == sum(p.numel() * 4 for p in (*flux.parameters(), *ae.parameters()))


def test_available_memory_is_positive_and_below_physical():
    free = available_memory(torch.device("cpu"))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total
