"""Experiment (issue #27): a 64x64 model at larger sizes with its RoPE image positions interpolated (scaled by
sqrt(16 / tokens), so any canvas spans the 4x4 token grid it was trained on) instead of extrapolated. Runs
evals/family_sizes.py with `fluxion.sampling.image_ids` patched; same arguments. The model folder's fluxion.json must
allow the sizes. Result in docs/tiny-family-notes.md: worse than plain positions, so not adopted."""

import math
import runpy
import sys
from pathlib import Path

import fluxion.sampling as sampling

BASE_TOKENS = 16  # 64x64: 4x4 packed tokens
_plain = sampling.image_ids


def interpolated_ids(batch: int, latent_height: int, latent_width: int, device=None):
    ids = _plain(batch, latent_height, latent_width, device).clone()
    ids[..., 1:] *= math.sqrt(BASE_TOKENS / ((latent_height // 2) * (latent_width // 2)))
    return ids


if __name__ == "__main__":
    sampling.image_ids = interpolated_ids
    sys.argv = ["family_sizes.py"] + sys.argv[1:]
    runpy.run_path(str(Path(__file__).with_name("family_sizes.py")), run_name="__main__")
