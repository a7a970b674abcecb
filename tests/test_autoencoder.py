"""Autoencoder: latent normalisation, tiled encode/decode blending with no seams."""

import torch
import torch.nn.functional as F

from fluxion.model import AUTOENCODER_PRESETS, AutoEncoder
from fluxion.model.autoencoder import blend_tiles
from pipeline_fixtures import random_weights


def make_ae() -> AutoEncoder:
    return random_weights(AutoEncoder(AUTOENCODER_PRESETS["debug"]), seed=2, std=0.02).eval()


def smooth_image(h: int, w: int) -> torch.Tensor:
    torch.manual_seed(0)
    return F.interpolate(torch.randn(1, 3, 8, 8), size=(h, w), mode="bilinear", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def test_encode_decode_apply_scale_and_shift():
    ae = make_ae()
    x = smooth_image(32, 48)
    mean, _ = ae.encoder(x).chunk(2, dim=1)
    z = ae.encode(x)
    torch.testing.assert_close(z, ae.scale_factor * (mean - ae.shift_factor))
    torch.testing.assert_close(ae.decode(z), ae.decoder(z / ae.scale_factor + ae.shift_factor))
    assert z.shape == (1, 16, 4, 6)


def test_blending_is_exact_for_a_pointwise_function():
    # for a function that acts per pixel, overlapping tiles must reassemble the full result exactly
    x = torch.randn(2, 4, 37, 53)
    up = lambda t: F.interpolate(t * 2 + 1, scale_factor=2, mode="nearest")  # noqa: E731
    tiled = blend_tiles(x, up, tile=16, overlap=6, scale=2, out_channels=4)
    torch.testing.assert_close(tiled, up(x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_one_tile_equals_full_pass():
    ae = make_ae()
    z = ae.encode(smooth_image(64, 64))
    torch.testing.assert_close(ae.decode_tiled(z, tile=64, overlap=16), ae.decode(z))


@torch.no_grad()
def test_tiled_decode_has_no_seams_and_stays_close():
    ae = make_ae()
    x = smooth_image(128, 192)
    z = ae.encode(x)
    full, tiled = ae.decode(z), ae.decode_tiled(z, tile=8, overlap=4)  # tiles of 64 px, 32 px overlap
    # tiles see less context (group norms, mid-block attention), so they differ a little, not in kind
    assert F.cosine_similarity(full.flatten(), tiled.flatten(), dim=0) > 0.9
    # seams would show as jumps between neighbouring columns where tiles meet
    col_jump = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    boundaries = torch.tensor([31, 32, 63, 64, 95, 96, 127, 128])
    assert col_jump[boundaries].max() <= 2 * col_jump.mean()
    zt = ae.encode_tiled(x, tile=64, overlap=32)
    assert F.cosine_similarity(zt.flatten(), z.flatten(), dim=0) > 0.99
