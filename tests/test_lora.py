"""LoRA adapters: diffusers/PEFT files give the same outputs as diffusers + PEFT with the adapter live on
diffusers' own model; stacking, switching, fuse/unfuse and unload."""

import json

import pytest
import torch

from fluxion.checkpoints import export_diffusers, save_state_dict
from fluxion.errors import CheckpointError, InputError
from fluxion.lora import (
    fuse_loras,
    load_lora,
    loaded_adapters,
    set_loras,
    unfuse_loras,
    unload_loras,
)
from fluxion.model import Flux, FluxParams

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
           "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
           "context_embedder"]


def _random(module, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _inputs(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, h, w, L = 2, 3, 4, 5
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {"img": torch.randn(B, h * w, params.in_channels, generator=g), "img_ids": img_ids.reshape(1, h * w, 3),
            "txt": torch.randn(B, L, params.context_in_dim, generator=g), "txt_ids": torch.zeros(1, L, 3),
            "timesteps": torch.tensor([0.3, 0.8]), "y": torch.randn(B, params.vec_in_dim, generator=g),
            "guidance": torch.tensor([3.5, 2.0])}


def _ours(model, x):
    B = x["img"].shape[0]
    with torch.no_grad():
        return model(x["img"], x["img_ids"].expand(B, -1, -1), x["txt"], x["txt_ids"].expand(B, -1, -1),
                     x["timesteps"], x["y"], guidance=x["guidance"])


def _theirs(model, x):
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"], return_dict=False)[0]


@pytest.fixture()
def models(tmp_path):
    params = FluxParams(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=20, hidden_size=64,
                        num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14], guidance_embed=True)
    ours = _random(Flux(params), seed=1).eval()
    export_diffusers(ours.state_dict(), params, tmp_path / "transformer", component="transformer")
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    return ours, theirs, params


def _peft_file(theirs, tmp_path, name, rank, alpha, seed, prefix="transformer."):
    """An adapter made by PEFT on diffusers' model, saved as diffusers does (alpha in the header)."""
    torch.manual_seed(seed)
    theirs.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False),
                       adapter_name=name)
    state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
    path = tmp_path / f"{name}.safetensors"
    save_state_dict({prefix + k: v.contiguous() for k, v in state.items()}, path,
                    metadata={"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha})})
    return path


def test_peft_file_matches_diffusers_with_peft(models, tmp_path):
    ours, theirs, params = models
    x = _inputs(params)
    base = _ours(ours, x)
    path = _peft_file(theirs, tmp_path, "style", rank=4, alpha=8, seed=3)
    theirs.set_adapters(["style"], weights=[0.7])
    assert load_lora(ours, path, scale=0.7) == "style"
    got, expected = _ours(ours, x), _theirs(theirs, x)
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    assert (got - expected).abs().max().item() <= 1e-4


def test_two_adapters_stack_switch_fuse_unfuse_unload(models, tmp_path):
    ours, theirs, params = models
    x = _inputs(params)
    base = _ours(ours, x)
    weights_before = {k: v.clone() for k, v in ours.state_dict().items()}
    a = _peft_file(theirs, tmp_path, "a", rank=4, alpha=4, seed=5)
    b = _peft_file(theirs, tmp_path, "b", rank=2, alpha=8, seed=6, prefix="")
    theirs.set_adapters(["a", "b"], weights=[1.0, 0.5])
    load_lora(ours, a)
    load_lora(ours, b, scale=0.5)
    both = _ours(ours, x)
    assert (both - _theirs(theirs, x)).abs().max().item() <= 1e-4
    set_loras(ours, {"a": 1.0})
    theirs.set_adapters(["a"], weights=[1.0])
    assert (_ours(ours, x) - _theirs(theirs, x)).abs().max().item() <= 1e-4
    assert loaded_adapters(ours) == {"a": 1.0, "b": 0.0}

    set_loras(ours, {"a": 1.0, "b": 0.5})
    fuse_loras(ours)
    torch.testing.assert_close(_ours(ours, x), both, rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="unfuse them"):
        set_loras(ours, {"a": 1.0})
    unfuse_loras(ours)
    assert all(torch.equal(v, weights_before[k]) for k, v in ours.state_dict().items())  # bit for bit
    torch.testing.assert_close(_ours(ours, x), both, rtol=0, atol=1e-6)
    unload_loras(ours)
    assert torch.equal(_ours(ours, x), base) and not hasattr(ours, "_fluxion_lora")
    assert not any(m._forward_hooks for m in ours.modules())


def test_errors_name_the_key_and_the_shapes(models, tmp_path):
    ours, _, _ = models
    stray = save_state_dict({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
                             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2),
                             "unknown_block.lora_A.weight": torch.zeros(2, 64),
                             "unknown_block.lora_B.weight": torch.zeros(64, 2)}, tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match=r"stray.safetensors: 2 key\(s\) map to no module.*unknown_block"):
        load_lora(ours, stray)
    assert load_lora(ours, stray, strict=False, name="lenient") == "lenient"
    wrong = save_state_dict({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
                             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 2)},
                            tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=r"to_q.lora_B.weight has shape \(48, 2\).*img_attn.qkv rows 0:64"):
        load_lora(ours, wrong)
    nothing = save_state_dict({"foo.lora_A.weight": torch.zeros(2, 4), "foo.lora_B.weight": torch.zeros(4, 2)},
                              tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="no LoRA update applies"):
        load_lora(ours, nothing, strict=False)
    with pytest.raises(InputError, match="already loaded"):
        load_lora(ours, stray, strict=False, name="lenient")


def test_pipeline_applies_switches_and_unloads_adapters(tmp_path):
    from pipeline_fixtures import make_pipeline

    pipe = make_pipeline("dev")
    d = pipe.transformer.params.hidden_size
    g = torch.Generator().manual_seed(0)
    path = save_state_dict({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, d, generator=g),
                            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(d, 4, generator=g),
                            "single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(4, d, generator=g),
                            "single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(4 * d, 4, generator=g)},
                           tmp_path / "tiny.safetensors")
    base = pipe("x", seed=0, num_inference_steps=2, output_type="latent")
    assert pipe.load_lora(path, scale=0.5) == "tiny"
    with_lora = pipe("x", seed=0, num_inference_steps=2, output_type="latent")
    pipe.set_loras({})
    assert torch.equal(pipe("x", seed=0, num_inference_steps=2, output_type="latent"), base)
    pipe.set_loras({"tiny": 0.5})
    pipe.fuse_loras()
    torch.testing.assert_close(pipe("x", seed=0, num_inference_steps=2, output_type="latent"), with_lora,
                               rtol=0, atol=1e-4)
    pipe.unfuse_loras()
    pipe.unload_loras()
    assert not torch.allclose(with_lora, base) and torch.equal(pipe("x", seed=0, num_inference_steps=2,
                                                                    output_type="latent"), base)
