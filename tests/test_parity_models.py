"""Numerical parity of fluxion's Flux and AutoEncoder with diffusers' classes, through the checkpoint converters."""

import pytest
import torch

from fluxion.checkpoints import export_diffusers, load_autoencoder, load_transformer, save_state_dict, to_diffusers
from fluxion.model import AutoEncoder, AutoEncoderParams, Flux, FluxParams

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (a fresh adaLN-Zero model would hide modulation bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _tiny_flux(guidance: bool, in_channels: int = 16, out_channels: int = 16) -> FluxParams:
    return FluxParams(in_channels=in_channels, out_channels=out_channels, vec_in_dim=24, context_in_dim=20,
                      hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14],
                      guidance_embed=guidance)


def _ids(batch: int, h: int, w: int, txt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3)
    txt_ids = torch.zeros(txt_len, 3)
    return img_ids, txt_ids


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("channels", [(16, 16), (40, 16)], ids=["normal", "fill-width"])
def test_flux_matches_diffusers(tmp_path, guidance, channels):
    params = _tiny_flux(guidance, *channels)
    ours = _randomize(Flux(params), seed=1).eval()
    export_diffusers(ours.state_dict(), params, tmp_path / "transformer", component="transformer")
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()

    g = torch.Generator().manual_seed(0)
    B, h, w, L = 2, 3, 4, 5
    img = torch.randn(B, h * w, params.in_channels, generator=g)
    txt = torch.randn(B, L, params.context_in_dim, generator=g)
    y = torch.randn(B, params.vec_in_dim, generator=g)
    t = torch.tensor([0.25, 0.9])
    gs = torch.tensor([3.5, 1.5]) if guidance else None
    img_ids, txt_ids = _ids(B, h, w, L)
    with torch.no_grad():
        expected = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=img_ids, txt_ids=txt_ids, guidance=gs, return_dict=False)[0]
        got = ours(img, img_ids.expand(B, -1, -1), txt, txt_ids.expand(B, -1, -1), t, y, guidance=gs)
    assert got.shape == expected.shape == (B, h * w, params.out_channels)
    assert (got - expected).abs().max().item() <= TOL

    # and back: the BFL file written from diffusers' weights loads into an identical Flux
    save_state_dict(ours.state_dict(), tmp_path / "flux.safetensors")
    reloaded = load_transformer(tmp_path / "flux.safetensors", params)
    folder_loaded = load_transformer(tmp_path / "transformer")
    with torch.no_grad():
        for model in (reloaded, folder_loaded):
            again = model(img, img_ids.expand(B, -1, -1), txt, txt_ids.expand(B, -1, -1), t, y, guidance=gs)
            assert torch.equal(again, got)


def _tiny_vae() -> AutoEncoderParams:
    return AutoEncoderParams(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
                             scale_factor=0.5, shift_factor=0.2)


def test_autoencoder_matches_diffusers(tmp_path):
    params = _tiny_vae()
    ours = _randomize(AutoEncoder(params), seed=2).eval()
    # GroupNorm weights near 1 keep activations in a sane range through the random network
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    export_diffusers(ours.state_dict(), params, tmp_path / "vae", component="vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == params.scale_factor and theirs.config.shift_factor == params.shift_factor

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale, shift = params.scale_factor, params.shift_factor
    with torch.no_grad():
        z = ours.encode(x)
        z_ref = (theirs.encode(x).latent_dist.mean - shift) * scale
        assert z.shape == (1, 4, 8, 8)
        assert (z - z_ref).abs().max().item() <= TOL
        decoded = ours.decode(z)
        decoded_ref = theirs.decode(z / scale + shift).sample
        assert decoded.shape == x.shape
        assert (decoded - decoded_ref).abs().max().item() <= TOL

        # the diffusers folder loads back with the same scale/shift and the same outputs
        loaded = load_autoencoder(tmp_path / "vae")
        assert (loaded.scale_factor, loaded.shift_factor) == (scale, shift)
        assert torch.equal(loaded.encode(x), z)


def test_converted_state_dict_loads_strictly_into_diffusers():
    params = _tiny_flux(guidance=True)
    sd = to_diffusers(Flux(params).state_dict(), "transformer")
    model = diffusers.FluxTransformer2DModel(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                                             num_attention_heads=2, joint_attention_dim=20, pooled_projection_dim=24,
                                             guidance_embeds=True, axes_dims_rope=(4, 14, 14))
    model.load_state_dict(sd, strict=True)
