"""BFL <-> diffusers key maps: exact round trips both ways, key sets equal to diffusers' models, rule semantics."""

import pytest
import torch

from fluxion.checkpoints import convert_state_dict, to_bfl, to_diffusers
from fluxion.checkpoints.keymaps import TRANSFORMER_KEYMAP
from fluxion.errors import CheckpointError
from fluxion.model import AutoEncoder, AutoEncoderParams, Flux, FluxParams

diffusers = pytest.importorskip("diffusers")

FLUX_SIZES = [  # (hidden, heads, depth, single, guidance, in, out, mlp_ratio, qkv_bias)
    (64, 2, 1, 2, True, 16, 16, 4.0, True),
    (96, 3, 2, 1, False, 64, 64, 4.0, True),
    (128, 4, 2, 3, True, 384, 64, 2.0, False),
]
VAE_SIZES = [  # (ch, ch_mult, num_res_blocks, z)
    (32, [1], 1, 4),
    (32, [1, 2], 2, 16),
    (64, [1, 1, 2, 2], 1, 8),
]


def _random_state_dict(module: torch.nn.Module, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(dtype) for k, v in module.state_dict().items()}


def _flux(hidden, heads, depth, single, guidance, cin, cout, mlp_ratio, qkv_bias) -> Flux:
    head_dim = hidden // heads
    axes = [head_dim // 4, head_dim // 4, head_dim // 2]
    return Flux(FluxParams(in_channels=cin, out_channels=cout, vec_in_dim=12, context_in_dim=20, hidden_size=hidden,
                           mlp_ratio=mlp_ratio, num_heads=heads, depth=depth, depth_single_blocks=single,
                           axes_dim=axes, qkv_bias=qkv_bias, guidance_embed=guidance))


def _vae(ch, ch_mult, num_res_blocks, z) -> AutoEncoder:
    return AutoEncoder(AutoEncoderParams(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z))


def _diffusers_flux(hidden, heads, depth, single, guidance, cin, cout, *_):
    head_dim = hidden // heads
    return diffusers.FluxTransformer2DModel(
        in_channels=cin, out_channels=cout, num_layers=depth, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=20, pooled_projection_dim=12,
        guidance_embeds=guidance, axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))


def _diffusers_vae(ch, ch_mult, num_res_blocks, z):
    n = len(ch_mult)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[ch * m for m in ch_mult],
        layers_per_block=num_res_blocks, latent_channels=z, use_quant_conv=False, use_post_quant_conv=False)


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("size", FLUX_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_round_trip_from_bfl(size, dtype):
    ours = _random_state_dict(_flux(*size), seed=0, dtype=dtype)
    theirs = to_diffusers(ours, "transformer")
    _assert_identical(to_bfl(theirs, "transformer"), ours)


@pytest.mark.parametrize("size", [s for s in FLUX_SIZES if s[7] == 4.0 and s[8]])
def test_transformer_matches_diffusers_keys_and_round_trips_from_diffusers(size):
    model = _diffusers_flux(*size)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted = to_diffusers(_flux(*size).state_dict(), "transformer")
    assert {k: v.shape for k, v in converted.items()} == expected

    theirs = _random_state_dict(model, seed=1)
    _assert_identical(to_diffusers(to_bfl(theirs, "transformer"), "transformer"), theirs)


@pytest.mark.parametrize("size", VAE_SIZES)
def test_autoencoder_round_trips_and_matches_diffusers_keys(size):
    ours = _random_state_dict(_vae(*size), seed=2)
    theirs = to_diffusers(ours, "autoencoder")
    model = _diffusers_vae(*size)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in model.state_dict().items()}
    _assert_identical(to_bfl(theirs, "autoencoder"), ours)

    theirs = _random_state_dict(model, seed=3, dtype=torch.bfloat16)
    _assert_identical(to_diffusers(to_bfl(theirs, "autoencoder"), "autoencoder"), theirs)


def test_transformer_rule_semantics():
    ours = _random_state_dict(_flux(*FLUX_SIZES[0]), seed=4)
    h = 64
    theirs = to_diffusers(ours, "transformer")
    q, k, v = ours["double_blocks.0.img_attn.qkv.weight"].chunk(3)
    assert torch.equal(theirs["transformer_blocks.0.attn.to_q.weight"], q)
    assert torch.equal(theirs["transformer_blocks.0.attn.to_v.weight"], v)
    assert torch.equal(theirs["transformer_blocks.0.attn.add_k_proj.bias"],
                       ours["double_blocks.0.txt_attn.qkv.bias"][h:2 * h])
    linear1 = ours["single_blocks.1.linear1.weight"]  # (3h + 4h, h)
    assert torch.equal(theirs["single_transformer_blocks.1.attn.to_k.weight"], linear1[h:2 * h])
    assert torch.equal(theirs["single_transformer_blocks.1.proj_mlp.weight"], linear1[3 * h:])
    assert torch.equal(theirs["single_transformer_blocks.1.proj_mlp.bias"],
                       ours["single_blocks.1.linear1.bias"][3 * h:])
    shift, scale = ours["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(theirs["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert torch.equal(theirs["proj_out.weight"], ours["final_layer.linear.weight"])
    assert torch.equal(theirs["single_transformer_blocks.0.proj_out.weight"], ours["single_blocks.0.linear2.weight"])


def test_autoencoder_rule_semantics():
    ours = _random_state_dict(_vae(32, [1, 2, 2], 1, 4), seed=5)
    theirs = to_diffusers(ours, "autoencoder")
    # BFL up[0] is the full-resolution level, diffusers up_blocks[0] the lowest resolution
    assert torch.equal(theirs["decoder.up_blocks.2.resnets.1.conv2.weight"], ours["decoder.up.0.block.1.conv2.weight"])
    assert torch.equal(theirs["decoder.up_blocks.0.upsamplers.0.conv.bias"], ours["decoder.up.2.upsample.conv.bias"])
    assert "decoder.up_blocks.2.upsamplers.0.conv.weight" not in theirs
    q = ours["encoder.mid.attn_1.q.weight"]
    assert q.shape == (64, 64, 1, 1)
    assert torch.equal(theirs["encoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0])
    assert torch.equal(theirs["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"],
                       ours["encoder.down.1.block.0.nin_shortcut.weight"])
    assert torch.equal(theirs["encoder.conv_norm_out.weight"], ours["encoder.norm_out.weight"])


def test_consume_empties_the_source():
    ours = _random_state_dict(_flux(*FLUX_SIZES[0]), seed=6)
    n = len(ours)
    theirs = convert_state_dict(dict(ours), TRANSFORMER_KEYMAP, "diffusers")
    source = dict(ours)
    consumed = convert_state_dict(source, TRANSFORMER_KEYMAP, "diffusers", consume=True)
    assert source == {} and len(ours) == n
    _assert_identical(consumed, theirs)


def test_unknown_and_incomplete_keys_are_named():
    ours = _random_state_dict(_flux(*FLUX_SIZES[0]), seed=7)
    ours["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) have no diffusers equivalent.*lora_up"):
        to_diffusers(ours, "transformer")

    theirs = to_diffusers(_random_state_dict(_flux(*FLUX_SIZES[0]), seed=7), "transformer")
    del theirs["transformer_blocks.0.attn.to_k.bias"]
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.to_q\.bias.*to_k\.bias"):
        to_bfl(theirs, "transformer")


def test_stable_diffusion_vae_keys_are_rejected():
    theirs = diffusers.AutoencoderKL(block_out_channels=[32], norm_num_groups=32).state_dict()
    with pytest.raises(CheckpointError, match=r"quant_conv"):
        to_bfl(theirs, "autoencoder")


def test_direction_is_validated():
    with pytest.raises(ValueError, match="to must be"):
        convert_state_dict({}, TRANSFORMER_KEYMAP, "kohya")
