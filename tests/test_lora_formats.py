"""LoRA formats: each community format gives the outputs of its own tool (diffusers' load_lora_weights where diffusers
reads the format, else the BFL model with the update merged into its weights by hand); our writers round-trip and
their PEFT/kohya files load in diffusers; BFL control LoRAs (bias, norm scales, widened img_in) unload bit for bit."""

import copy
import json
import logging

import pytest
import torch
from test_lora import _inputs, _ours, _random, _theirs

from fluxion.checkpoints import diffusers_config, save_state_dict, to_diffusers
from fluxion.errors import CheckpointError, InputError
from fluxion.lora import (
    Adapter,
    LowRank,
    add_adapter,
    apply_text_encoder_lora,
    convert_lora,
    describe_lora,
    detect_lora_format,
    fuse_loras,
    load_lora,
    read_lora,
    save_lora,
    unfuse_loras,
    unload_loras,
)
from fluxion.lora.names import dotted_text_module
from fluxion.model import Flux, FluxParams

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PARAMS = FluxParams(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=20, hidden_size=64, num_heads=2,
                    depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14], guidance_embed=True)
H = PARAMS.hidden_size
TOL = 1e-4


@pytest.fixture()
def ours():
    return _random(Flux(PARAMS), seed=1).eval()


def _diffusers_pipe(model: Flux):
    """diffusers' own FluxPipeline around a FluxTransformer2DModel with our weights (only the LoRA loader is used)."""
    config = {k: v for k, v in diffusers_config(model.params).items() if not k.startswith("_")}
    theirs = diffusers.FluxTransformer2DModel(**config)
    theirs.load_state_dict(to_diffusers(model.state_dict(), "transformer"))
    return diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=theirs.eval())


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _randn(g, *shape, std=0.2):
    return torch.randn(*shape, generator=g) * std


def _merged(model, deltas, *, biases=None, scale=1.0):
    """The BFL model with W + scale * delta merged by hand (the reference for formats diffusers does not read)."""
    assert not hasattr(model, "_fluxion_lora"), "merge into the base model, before loading adapters"
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for path, delta in deltas.items():
            merged.get_submodule(path).weight += scale * delta
        for path, bias in (biases or {}).items():
            merged.get_submodule(path).bias += scale * bias
    return merged


def _close(got, expected, base):
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    assert (got - expected).abs().max().item() <= TOL


def _kohya_lora(model, g, modules, rank=4, alpha=2.0, split=False):
    """kohya keys lora_unet_<bfl name with _> for `modules`, and the delta (alpha / rank) * up @ down of each. With
    split=True, fused modules are stored as sd-scripts' split_qkv saves them: stacked, block-diagonal up."""
    sd, deltas = {}, {}
    for path in modules:
        linear = model.get_submodule(path)
        name = "lora_unet_" + path.replace(".", "_")
        a = rank if "final_layer" in path else alpha  # diffusers ignores final_layer alphas: keep them neutral
        if split and path.endswith(("qkv", "linear1")):
            sizes = [H] * 3 if path.endswith("qkv") else [H] * 3 + [linear.out_features - 3 * H]
            downs = [_randn(g, rank, linear.in_features) for _ in sizes]
            ups = [_randn(g, n, rank) for n in sizes]
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.cat(downs), torch.block_diag(*ups)
            deltas[path] = torch.cat([u @ d for u, d in zip(ups, downs)]) * (a / rank)  # sd-scripts' forward
        else:
            down, up = _randn(g, rank, linear.in_features), _randn(g, linear.out_features, rank)
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            deltas[path] = up @ down * (a / rank)
        sd[f"{name}.alpha"] = torch.tensor(float(a))
    return sd, deltas


def _clip():
    config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1)
    return transformers.CLIPTextModel(config).eval()


def test_kohya_matches_diffusers(ours, tmp_path):
    g = torch.Generator().manual_seed(3)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    # diffusers' kohya converter reads the blocks only (its img_in/txt_in/time_in/final_layer keys miss the
    # "transformer." prefix it filters on) and linear1 only at FLUX.1 size (3072...): those are checked by hand below
    modules = [p for p in _linears(ours) if "blocks" in p and not p.endswith("linear1")]
    sd, _ = _kohya_lora(ours, g, modules)
    path = save_state_dict(sd, tmp_path / "kohya.safetensors")
    assert detect_lora_format(path) == "kohya"
    pipe = _diffusers_pipe(ours)
    pipe.load_lora_weights(str(path), adapter_name="k")
    pipe.set_adapters(["k"], adapter_weights=[0.7])
    assert load_lora(ours, path, scale=0.7) == "kohya"
    _close(_ours(ours, x), _theirs(pipe.transformer, x), base)


def test_kohya_text_encoder_keys_apply_by_name_or_are_named_in_the_error(ours, tmp_path):
    g = torch.Generator().manual_seed(14)
    clip, (sd, _) = _clip(), _kohya_lora(ours, g, ["double_blocks.0.img_attn.proj"])
    reference = copy.deepcopy(clip)
    for te in ["text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_0_mlp_fc1"]:
        module = dotted_text_module(te).removeprefix("text_model.")  # transformers 5's CLIPTextModel: no text_model
        linear = clip.get_submodule(module)
        sd[f"lora_te1_{te}.lora_down.weight"] = down = _randn(g, 2, linear.in_features)
        sd[f"lora_te1_{te}.lora_up.weight"] = up = _randn(g, linear.out_features, 2)
        sd[f"lora_te1_{te}.alpha"] = torch.tensor(1.0)
        with torch.no_grad():
            reference.get_submodule(module).weight += 0.7 * 0.5 * up @ down
    path = save_state_dict(sd, tmp_path / "kohya_te.safetensors")
    with pytest.raises(CheckpointError, match=r"2 clip_l text-encoder update\(s\) \(text_model_encoder_layers_0_mlp"):
        load_lora(ours, path)  # strict, and no text encoder given
    assert not hasattr(ours, "_fluxion_lora")  # nothing applied
    load_lora(ours, path, scale=0.7, text_encoders={"clip_l": clip})
    tokens = torch.tensor([[0, 5, 7, 1]])
    with torch.no_grad():
        got, expected = clip(tokens).last_hidden_state, reference(tokens).last_hidden_state
    assert (got - expected).abs().max().item() <= TOL and len(clip._fluxion_lora.hooks) == 2
    assert describe_lora(path)["text_encoder"] == {"clip_l": {"modules": 2, "keys": 6}}


def test_kohya_named_diffusers_modules_match_diffusers(ours, tmp_path):
    """lora_transformer_<diffusers name with _> (kohya-style keys of diffusers' model, "mixture" in diffusers, whose
    converter knows attention and top-level modules only)."""
    g = torch.Generator().manual_seed(15)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    modules = {"transformer_blocks_0_attn_to_q": (H, H), "transformer_blocks_1_attn_add_v_proj": (H, H),
               "single_transformer_blocks_0_attn_to_v": (H, H), "single_transformer_blocks_1_attn_to_k": (H, H),
               "norm_out_linear": (2 * H, H), "x_embedder": (H, PARAMS.in_channels)}
    sd = {}
    for name, (out, inp) in modules.items():
        sd[f"lora_transformer_{name}.lora_down.weight"] = _randn(g, 4, inp)
        sd[f"lora_transformer_{name}.lora_up.weight"] = _randn(g, out, 4)
        sd[f"lora_transformer_{name}.alpha"] = torch.tensor(2.0)
    path = save_state_dict(sd, tmp_path / "mixture.safetensors")
    pipe = _diffusers_pipe(ours)
    pipe.load_lora_weights(str(path), adapter_name="m")
    load_lora(ours, path)
    _close(_ours(ours, x), _theirs(pipe.transformer, x), base)
    rows = {r["file"]: r["rows"] for r in describe_lora(path, ours)["mapping"]}
    assert rows["lora_transformer_single_transformer_blocks_0_attn_to_v"] == [2 * H, 3 * H]


@pytest.mark.parametrize("split", [False, True])
def test_kohya_linear1_embedders_and_split_qkv_alpha(ours, tmp_path, split):
    """sd-scripts split_qkv files (header ss_network_args) scale by alpha / per-split rank (sd-scripts#2204)."""
    g = torch.Generator().manual_seed(4)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    modules = ["single_blocks.0.linear1", "single_blocks.1.linear1", "double_blocks.0.img_attn.qkv", "img_in",
               "txt_in", "time_in.out_layer", "guidance_in.in_layer", "vector_in.out_layer", "final_layer.linear",
               "final_layer.adaLN_modulation.1"]
    sd, deltas = _kohya_lora(ours, g, modules, rank=2, alpha=3.0, split=split)
    expected = _ours(_merged(ours, deltas, scale=0.5), x)
    metadata = {"ss_network_args": json.dumps({"split_qkv": "True"})} if split else {}
    path = save_state_dict(sd, tmp_path / "kohya_split.safetensors", metadata=metadata)
    load_lora(ours, path, scale=0.5)
    _close(_ours(ours, x), expected, base)
    info = describe_lora(path, ours)
    assert info["split_qkv"] is split and info["ranks"] == [2] and info["alphas"] == [2.0, 3.0]
    if split:  # sd-scripts' in-memory names, lora_down.N / lora_up.N, read the same
        unload_loras(ours)
        qkv = "lora_unet_double_blocks_0_img_attn_qkv"
        down, up = sd[f"{qkv}.lora_down.weight"].chunk(3), sd[f"{qkv}.lora_up.weight"]
        parts = {f"{qkv}.alpha": sd[f"{qkv}.alpha"]}
        for j in range(3):
            parts[f"{qkv}.lora_down.{j}.weight"] = down[j]
            parts[f"{qkv}.lora_up.{j}.weight"] = up[j * H:(j + 1) * H, j * 2:j * 2 + 2]
        expected = _ours(_merged(ours, {"double_blocks.0.img_attn.qkv": deltas["double_blocks.0.img_attn.qkv"]}), x)
        load_lora(ours, save_state_dict(parts, tmp_path / "kohya_parts.safetensors"))
        assert (_ours(ours, x) - expected).abs().max().item() <= TOL


def test_comfy_and_bfl_names_match_hand_merge(ours, tmp_path):
    g = torch.Generator().manual_seed(5)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    modules = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1", "img_in",
               "double_blocks.1.txt_mlp.2"]
    biases = {"double_blocks.1.img_mlp.0": _randn(g, 4 * H)}  # ComfyUI's full diffs
    sd = {"diffusion_model.double_blocks.1.img_mlp.0.diff": _randn(g, 4 * H, H, std=0.02),
          "diffusion_model.double_blocks.1.img_mlp.0.diff_b": biases["double_blocks.1.img_mlp.0"]}
    deltas = {"double_blocks.1.img_mlp.0": sd["diffusion_model.double_blocks.1.img_mlp.0.diff"]}
    for i, path in enumerate(modules):
        linear = ours.get_submodule(path)
        down, up = _randn(g, 3, linear.in_features), _randn(g, linear.out_features, 3)
        if i % 2:  # bare BFL names, kohya roles, no alpha (scale 1)
            sd[f"{path}.lora_down.weight"], sd[f"{path}.lora_up.weight"] = down, up
            deltas[path] = up @ down
        else:
            sd[f"diffusion_model.{path}.lora_A.weight"], sd[f"diffusion_model.{path}.lora_B.weight"] = down, up
            sd[f"diffusion_model.{path}.alpha"] = torch.tensor(1.5)
            deltas[path] = up @ down * 0.5
    path = save_state_dict(sd, tmp_path / "comfy.safetensors")
    assert detect_lora_format(path) == "comfy"
    expected = _ours(_merged(ours, deltas, biases=biases, scale=0.8), x)
    load_lora(ours, path, scale=0.8)
    _close(_ours(ours, x), expected, base)


def test_xlabs_matches_diffusers(ours, tmp_path):
    """x-flux's processors: qkv_lora1/proj_lora1 image stream, qkv_lora2/proj_lora2 text stream, single-block
    qkv_lora on linear1's q, k, v rows and proj_lora on linear2; no alpha."""
    g = torch.Generator().manual_seed(6)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    sd = {}
    shapes = {"qkv_lora1": (H, 3 * H), "proj_lora1": (H, H), "qkv_lora2": (H, 3 * H), "proj_lora2": (H, H)}
    for i in range(2):
        for name, (inp, out) in shapes.items():
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = _randn(g, 4, inp)
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = _randn(g, out, 4)
        sd[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = _randn(g, 4, H)
        sd[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = _randn(g, 3 * H, 4)
        sd[f"single_blocks.{i}.processor.proj_lora.down.weight"] = _randn(g, 4, 5 * H)
        sd[f"single_blocks.{i}.processor.proj_lora.up.weight"] = _randn(g, H, 4)
    path = save_state_dict(sd, tmp_path / "xlabs.safetensors")
    assert detect_lora_format(path) == "xlabs"
    pipe = _diffusers_pipe(ours)
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.6])
    load_lora(ours, path, scale=0.6)
    _close(_ours(ours, x), _theirs(pipe.transformer, x), base)
    rows = {r["file"]: r["rows"] for r in describe_lora(path, ours)["mapping"]}
    assert rows["single_blocks.0.processor.qkv_lora"] == [0, 3 * H]


def _lokr_case(g, out, inp, w1_shape, rank, mode):
    a1, b1 = w1_shape
    a2, b2 = out // a1, inp // b1
    t, alpha = {}, 3.0
    if mode == "full":
        t["lokr_w1"], t["lokr_w2"] = _randn(g, a1, b1), _randn(g, a2, b2)
        return t, torch.kron(t["lokr_w1"], t["lokr_w2"])  # both whole: no alpha scaling
    t["lokr_w1"] = _randn(g, a1, b1)
    if mode == "tucker":
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = _randn(g, rank, rank), _randn(g, rank, a2), _randn(g, rank, b2)
        w2 = torch.einsum("ij,ip,jr->pr", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        if mode == "both":
            del t["lokr_w1"]
            t["lokr_w1_a"], t["lokr_w1_b"] = _randn(g, a1, rank), _randn(g, rank, b1)
        t["lokr_w2_a"], t["lokr_w2_b"] = _randn(g, a2, rank), _randn(g, rank, b2)
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    t["alpha"] = torch.tensor(alpha)
    return t, torch.kron(w1, w2) * alpha / rank


def test_lycoris_lokr_and_loha_match_hand_merge(ours, tmp_path):
    g = torch.Generator().manual_seed(7)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    sd, deltas = {}, {}
    cases = [("double_blocks.0.img_attn.qkv", (4, 8), "w2"), ("single_blocks.0.linear1", (8, 4), "both"),
             ("double_blocks.1.img_mlp.0", (4, 4), "full"), ("single_blocks.1.linear2", (2, 8), "tucker")]
    for path, w1_shape, mode in cases:
        linear = ours.get_submodule(path)
        t, deltas[path] = _lokr_case(g, linear.out_features, linear.in_features, w1_shape, 2, mode)
        sd.update({f"lora_unet_{path.replace('.', '_')}.{k}": v for k, v in t.items()})
    for path in ["double_blocks.0.txt_attn.proj", "vector_in.in_layer"]:
        linear, name = ours.get_submodule(path), "lora_unet_" + path.replace(".", "_")
        w = {f"hada_w{i}_a": _randn(g, linear.out_features, 2) for i in (1, 2)}
        w.update({f"hada_w{i}_b": _randn(g, 2, linear.in_features) for i in (1, 2)})
        sd.update({f"{name}.{k}": v for k, v in w.items()} | {f"{name}.alpha": torch.tensor(1.0)})
        deltas[path] = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * 0.5
    # LyCORIS on diffusers' model: to_k is the middle third of our fused qkv
    to_k, qkv = "lycoris_transformer_blocks_1_attn_to_k", "double_blocks.1.img_attn.qkv"
    t, k_delta = _lokr_case(g, H, H, (4, 8), 2, "both")
    sd.update({f"{to_k}.{k}": v for k, v in t.items()})
    deltas[qkv] = torch.cat([torch.zeros(H, H), k_delta, torch.zeros(H, H)])
    path = save_state_dict(sd, tmp_path / "lycoris.safetensors")
    assert detect_lora_format(path) == "lycoris"
    expected = _ours(_merged(ours, deltas, scale=0.9), x)
    load_lora(ours, path, scale=0.9)
    _close(_ours(ours, x), expected, base)
    fuse_loras(ours)
    assert (_ours(ours, x) - expected).abs().max().item() <= TOL
    unfuse_loras(ours)
    info = describe_lora(path, ours)
    assert {r["kind"] for r in info["mapping"]} == {"lokr", "loha"} and info["targets"] == 7
    kohya = save_lora(read_lora(path, ours), tmp_path / "lycoris_kohya.safetensors", layout="kohya", model=ours)
    unload_loras(ours)
    load_lora(ours, kohya, scale=0.9)  # LyCORIS keys written back (to_k's row block as a full-size dense delta)
    assert (_ours(ours, x) - expected).abs().max().item() <= TOL


def test_lokr_with_diffusers_names_matches_diffusers_peft(ours, tmp_path):
    """diffusers reads LoKr (alpha baked in) on its own module names through PEFT's LoKr layers."""
    from peft.tuners.lokr.layer import factorization

    g = torch.Generator().manual_seed(16)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    sd = {}
    modules = [("transformer_blocks.0.attn.to_out.0", H, H), ("single_transformer_blocks.1.proj_out", H, 5 * H),
               ("transformer_blocks.1.attn.to_k", H, H)]  # to_k: the middle rows of our fused qkv
    for name, out, inp in modules:
        (a1, a2), (b1, b2) = factorization(out), factorization(inp)
        sd[f"transformer.{name}.lokr_w1"] = _randn(g, a1, b1)
        sd[f"transformer.{name}.lokr_w2_a"], sd[f"transformer.{name}.lokr_w2_b"] = _randn(g, a2, 2), _randn(g, 2, b2)
    path = save_state_dict(sd, tmp_path / "lokr_diffusers.safetensors")
    pipe = _diffusers_pipe(ours)
    pipe.transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name="k")
    load_lora(ours, path)
    _close(_ours(ours, x), _theirs(pipe.transformer, x), base)


def test_bfl_control_lora_bias_norms_widened_img_in_and_bit_exact_unload(ours, tmp_path):
    g = torch.Generator().manual_seed(8)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    own_img_in = ours.img_in.weight
    wide = 2 * PARAMS.in_channels  # noise tokens + control-image tokens
    sd, deltas, biases = {}, {}, {}
    for path, inp in [("img_in", wide), ("double_blocks.0.img_attn.qkv", H), ("single_blocks.1.linear2", 5 * H)]:
        out = ours.get_submodule(path).out_features
        sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"] = _randn(g, 4, inp), _randn(g, out, 4)
        sd[f"{path}.lora_B.bias"] = _randn(g, out)
        deltas[path] = sd[f"{path}.lora_B.weight"] @ sd[f"{path}.lora_A.weight"]
        biases[path] = sd[f"{path}.lora_B.bias"]
    norms = {"double_blocks.0.img_attn.norm.query_norm.scale": _randn(g, 32) + 1,
             "single_blocks.0.norm.key_norm.scale": _randn(g, 32) + 1}
    path = save_state_dict(sd | norms, tmp_path / "canny.safetensors")
    assert detect_lora_format(path) == "bfl-control"

    # BFL: a flux-dev-canny-lora model (in_channels 128 there) has img_in's base weight expanded with zero columns
    reference = Flux(FluxParams(**{**vars(PARAMS), "in_channels": wide})).eval()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["img_in.weight"] = torch.cat([state["img_in.weight"], torch.zeros(H, wide - PARAMS.in_channels)], dim=1)
    reference.load_state_dict(state | norms)
    reference = _merged(reference, deltas, biases=biases, scale=0.7)

    x = _inputs(PARAMS)
    x["img"] = torch.cat([x["img"], torch.randn(x["img"].shape, generator=g)], dim=-1)  # (B, L, 16) -> (B, L, 32)
    load_lora(ours, path, scale=0.7)
    assert ours.img_in.in_features == wide and torch.equal(ours.double_blocks[0].img_attn.norm.query_norm.scale,
                                                           norms["double_blocks.0.img_attn.norm.query_norm.scale"])
    expected = _ours(reference, x)
    assert (_ours(ours, x) - expected).abs().max().item() <= TOL
    fuse_loras(ours)
    assert (_ours(ours, x) - expected).abs().max().item() <= TOL
    unfuse_loras(ours)
    unload_loras(ours)
    assert ours.img_in.weight is own_img_in and ours.img_in.in_features == PARAMS.in_channels
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())


def test_fused_bias_on_a_linear_without_bias_is_removed_again(tmp_path):
    model = _random(Flux(FluxParams(**{**vars(PARAMS), "qkv_bias": False})), seed=2).eval()
    g = torch.Generator().manual_seed(9)
    path = save_state_dict({"double_blocks.0.img_attn.qkv.lora_A.weight": _randn(g, 2, H),
                            "double_blocks.0.img_attn.qkv.lora_B.weight": _randn(g, 3 * H, 2),
                            "double_blocks.0.img_attn.qkv.lora_B.bias": _randn(g, 3 * H)}, tmp_path / "b.safetensors")
    x = _inputs(PARAMS)
    load_lora(model, path)
    hooked = _ours(model, x)
    fuse_loras(model)
    assert model.double_blocks[0].img_attn.qkv.bias is not None
    assert (_ours(model, x) - hooked).abs().max().item() <= TOL
    unfuse_loras(model)
    assert model.double_blocks[0].img_attn.qkv.bias is None


def _trained(model, g, rank=4, alpha=8.0, skip=()):
    """An adapter as the training code builds it: LowRank(down, up, scale=alpha/rank) per Linear."""
    return Adapter("trained", {p: LowRank(_randn(g, rank, m.in_features), _randn(g, m.out_features, rank),
                                          alpha / rank)
                               for p, m in _linears(model).items() if not p.endswith(skip)})


@pytest.mark.parametrize("layout", ["peft", "kohya", "comfy"])
def test_written_files_round_trip_and_load_in_diffusers(ours, tmp_path, layout):
    g = torch.Generator().manual_seed(10)
    x = _inputs(PARAMS)
    base = _ours(ours, x)
    adapter = _trained(ours, g)
    add_adapter(ours, adapter, 0.5)
    expected = _ours(ours, x)
    unload_loras(ours)
    path = save_lora(adapter, tmp_path / f"{layout}.safetensors", layout=layout, model=ours)
    assert detect_lora_format(path) == layout
    load_lora(ours, path, scale=0.5)
    _close(_ours(ours, x), expected, base)
    info = describe_lora(path, ours)
    assert info["ranks"] == [4] and info["alphas"] == [8.0] and info["targets"] == len(adapter.updates)
    if layout == "comfy":
        return  # diffusers reads ComfyUI's lora_A/lora_B keys as nothing it knows
    if layout == "kohya":  # diffusers reads kohya blocks only, linear1 only at FLUX.1 size (see above)
        unload_loras(ours)
        adapter = Adapter("blocks", {p: u for p, u in adapter.updates.items()
                                     if "blocks" in p and not p.endswith("linear1")})
        add_adapter(ours, adapter, 0.5)
        expected = _ours(ours, x)
        path = save_lora(adapter, tmp_path / "blocks.safetensors", layout=layout, model=ours)
    pipe = _diffusers_pipe(ours)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    pipe.set_adapters(["ours"], adapter_weights=[0.5])
    assert (_theirs(pipe.transformer, x) - expected).abs().max().item() <= TOL
    if layout == "peft":
        header = json.loads(read_header(path)["lora_adapter_metadata"])
        assert header["transformer.r"] == 4 and header["transformer.lora_alpha"] == 8.0


def read_header(path):
    from fluxion.checkpoints import read_checkpoint_info

    return read_checkpoint_info(path).metadata


def test_convert_peft_built_by_peft_to_kohya_and_comfy(ours, tmp_path):
    """A file PEFT made (parts to_q/to_k/to_v stacked on our qkv) converts and keeps its outputs and its rank."""
    from test_lora import _peft_file

    pipe = _diffusers_pipe(ours)
    src = _peft_file(pipe.transformer, tmp_path, "style", rank=4, alpha=8, seed=11)
    x = _inputs(PARAMS)
    load_lora(ours, src)
    expected = _ours(ours, x)
    unload_loras(ours)
    with torch.device("meta"):  # as `fluxion lora convert`: only the module shapes matter
        shapes_only = Flux(PARAMS)
    for layout in ("kohya", "comfy", "peft"):
        dst = convert_lora(src, tmp_path / f"converted_{layout}.safetensors", to=layout, model=shapes_only)
        load_lora(ours, dst, name=layout)
        assert (_ours(ours, x) - expected).abs().max().item() <= TOL, layout
        unload_loras(ours)
    header = json.loads(read_header(tmp_path / "converted_peft.safetensors")["lora_adapter_metadata"])
    assert header["transformer.r"] == 4 and header["transformer.lora_alpha"] == 8.0  # to_q keeps its own rank


def test_errors_name_keys_modules_and_shapes(ours, tmp_path, caplog):
    g = torch.Generator().manual_seed(12)
    good = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": _randn(g, 2, H),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": _randn(g, H, 2)}
    stray = save_state_dict(good | {"lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": _randn(g, 2, H),
                                    "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": _randn(g, H, 2)},
                            tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match=r"stray.safetensors: 2 key\(s\) map to no module.*blocks_7_img_attn"):
        load_lora(ours, stray)
    with caplog.at_level(logging.WARNING, logger="fluxion.lora.formats"):
        assert load_lora(ours, stray, strict=False) == "stray"
    assert "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight" in caplog.text
    wrong = save_state_dict({**good, "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": _randn(g, 48, 2)},
                            tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match=r"img_attn_proj.lora_up.weight has shape \(48, 2\), an update of "
                                              r"48x64, but double_blocks.0.img_attn.proj takes 64x64"):
        load_lora(ours, wrong)
    lokr = save_state_dict({"lora_unet_img_in.lokr_w1": _randn(g, 4, 4),
                            "lora_unet_img_in.lokr_w2": _randn(g, 16, 3)}, tmp_path / "lokr.safetensors")
    with pytest.raises(CheckpointError, match=r"lora_unet_img_in.lokr_w1 has shape \(4, 4\), an update of 64x12, but "
                                              r"img_in takes 64x16"):
        load_lora(ours, lokr)
    nothing = save_state_dict({"foo.lora_A.weight": torch.zeros(2, 4), "foo.lora_B.weight": torch.zeros(4, 2)},
                              tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="no LoRA update applies"):
        load_lora(ours, nothing, strict=False)
    dora = save_state_dict(good | {"lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, H)},
                           tmp_path / "dora.safetensors")
    with pytest.raises(CheckpointError, match=r"img_attn_proj.dora_scale is a DoRA magnitude"):
        load_lora(ours, dora)
    half = save_state_dict({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 16)}, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match=r"lora_unet_img_in.lora_down.weight has no lora_up.weight beside it"):
        load_lora(ours, half)
    with pytest.raises(InputError, match="not low rank; the PEFT layout holds LoRA only"):
        save_lora(read_lora(lokr, _random(Flux(FluxParams(**{**vars(PARAMS), "in_channels": 12})), 0)),
                  tmp_path / "x.safetensors", layout="peft", model=ours)


def test_text_encoder_updates_apply_to_a_wrapped_encoder():
    clip = _clip()
    wrapper = torch.nn.ModuleDict({"model": clip})
    g = torch.Generator().manual_seed(13)
    down, up = _randn(g, 2, 16), _randn(g, 16, 2)
    adapter = Adapter("te", {}, text_encoders={"clip_l": {"text_model_encoder_layers_0_self_attn_v_proj":
                                                          LowRank(down, up, 0.5)}})
    reference = copy.deepcopy(clip)
    with torch.no_grad():
        reference.encoder.layers[0].self_attn.v_proj.weight += 0.5 * up @ down
    apply_text_encoder_lora(wrapper, adapter, "clip_l")
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (clip(tokens).last_hidden_state - reference(tokens).last_hidden_state).abs().max() <= TOL
    assert "model.encoder.layers.0.self_attn.v_proj" in wrapper._fluxion_lora.hooks
