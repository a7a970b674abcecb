"""Weight quantization (fluxion.quant): each scheme stays close to the full-precision model (fp32 and bf16), saves
and loads bit for bit without re-quantizing, carries LoRA adapters, keeps the model's other code paths working, and
needs no torchao. Tolerances: about twice the largest relative error measured over five random debug models."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import fluxion.quant as fq
from fluxion.errors import InputError
from fluxion.lora import Adapter, LowRank, add_adapter, fuse_loras, set_loras, unfuse_loras, unload_loras
from fluxion.model import TRANSFORMER_PRESETS, Flux
from fluxion.quant import (
    QUANT_METADATA_KEY,
    SCHEMES,
    QuantLinear,
    is_quantized_file,
    load_quantized,
    quantize,
    quantized_scheme,
    save_quantized,
)
from fluxion.quant import linear as qlinear

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from transformer_step import random_flux as benchmark_random_flux  # noqa: E402

PARAMS = TRANSFORMER_PRESETS["debug"]
# measured max over 5 seeds (fp32 / bf16 against the plain model of the same dtype): int8 0.014 / 0.017,
# int8-weight 0.009 / 0.012, fp8 0.034 / 0.036, int4 0.13 / 0.13
TOLERANCE = {"int8": 0.03, "int8-weight": 0.025, "fp8": 0.07, "int4": 0.25}


def random_flux(seed: int = 0, dtype=torch.float32) -> Flux:
    """Random weights as the benchmarks': std 1/sqrt(fan_in), norm scales around 1."""
    return benchmark_random_flux(PARAMS, seed).to(dtype)


def inputs(dtype=torch.float32, batch=2, side=6, txt=20, seed=0) -> dict:
    """More than DYNAMIC_MIN_TOKENS image and text tokens, so int8 takes its integer kernel."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    return dict(img=torch.randn(batch, side * side, PARAMS.in_channels, generator=g).to(dtype),
                img_ids=ids.reshape(1, -1, 3).expand(batch, -1, -1), txt_ids=torch.zeros(batch, txt, 3),
                txt=torch.randn(batch, txt, PARAMS.context_in_dim, generator=g).to(dtype),
                timesteps=torch.tensor([0.3, 0.8][:batch]).to(dtype), y=torch.randn(batch, PARAMS.vec_in_dim,
                                                                                   generator=g).to(dtype),
                guidance=torch.tensor([3.5, 2.0][:batch]).to(dtype))


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def plain():
    return random_flux()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_stays_close_to_the_plain_model(plain, scheme, dtype):
    base = copy.deepcopy(plain).to(dtype)
    model = quantize(copy.deepcopy(base), scheme)
    x = inputs(dtype)
    y, yq = run(base, x), run(model, x)
    assert yq.dtype == dtype and not torch.equal(y, yq)
    assert rel(yq, y) < TOLERANCE[scheme]


def test_the_rule_and_what_a_quantized_layer_is(plain):
    model = quantize(copy.deepcopy(plain), "int4")
    assert quantized_scheme(model) == "int4" and quantized_scheme(plain) is None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            skipped = name in fq.SKIP or name.startswith(fq.SKIP_PREFIXES)
            assert isinstance(m, QuantLinear) != skipped, name
    q = model.double_blocks[0].img_attn.qkv
    assert isinstance(q, nn.Linear)  # LoRA hooks and offload treat it as any Linear
    assert q.weight.numel() == 0 and q.weight.dtype == torch.float32  # placeholder: the compute dtype
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (q.out_features, q.in_features // 2)
    assert torch.allclose(q.dequantize(), plain.double_blocks[0].img_attn.qkv.weight, atol=0.1)
    fp8 = quantize(copy.deepcopy(plain), "fp8").single_blocks[0].linear1.qweight
    assert torch.equal(fq.schemes.stored_values(fp8), fp8.float())  # the CPU's lookup table is the cast
    sizes = {s: sum(t.nbytes for t in quantize(copy.deepcopy(plain), s).state_dict().values()) for s in SCHEMES}
    full = sum(t.nbytes for t in plain.state_dict().values())
    assert sizes["int4"] < sizes["fp8"] == sizes["int8"] == sizes["int8-weight"] < 0.4 * full


def test_bad_scheme_and_requantizing_are_refused(plain):
    with pytest.raises(InputError, match="scheme: expected one of int8, int8-weight, fp8, int4, got 'int3'"):
        quantize(copy.deepcopy(plain), "int3")
    model = quantize(copy.deepcopy(plain), "int8")
    assert quantize(model, "int8") is model  # same scheme: nothing to do
    with pytest.raises(InputError, match="quantized as int8 already"):
        quantize(model, "fp8")
    with_lora = copy.deepcopy(plain)
    add_adapter(with_lora, _adapter(with_lora), 1.0)
    with pytest.raises(InputError, match="LoRA adapters are loaded"):
        quantize(with_lora, "int8")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_are_bit_exact_without_requantizing(plain, scheme, tmp_path, monkeypatch):
    model = quantize(copy.deepcopy(plain), scheme)
    x = inputs()
    expected = run(model, x)
    path = save_quantized(model, tmp_path / "q.safetensors", metadata={"note": "test"})

    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized re-quantized a weight")

    monkeypatch.setattr(fq.schemes, "quantize_weight", refuse)
    monkeypatch.setattr(qlinear, "quantize_weight", refuse)
    loaded = load_quantized(path)
    assert quantized_scheme(loaded) == scheme and not loaded.training
    assert torch.equal(run(loaded, x), expected)
    assert is_quantized_file(path)
    info = fq.storage.read_checkpoint_info(path)
    meta = info.metadata
    assert meta[QUANT_METADATA_KEY] == scheme and meta["note"] == "test" and meta[fq.storage.DTYPE_KEY] == "fp32"
    assert json.loads(meta[fq.storage.PARAMS_KEY])["hidden_size"] == PARAMS.hidden_size
    assert {k for k in info.tensors if k.startswith("double_blocks.0.img_attn.qkv.")} >= {
        "double_blocks.0.img_attn.qkv.qweight", "double_blocks.0.img_attn.qkv.qscale"}
    assert not any(k.endswith("qkv.weight") for k in info.tensors)


def test_load_in_another_dtype_equals_casting_the_model(plain, tmp_path):
    model = quantize(copy.deepcopy(plain), "fp8")
    path = save_quantized(model, tmp_path / "q.safetensors")
    model.to(torch.bfloat16)
    q = model.single_blocks[0].linear1
    assert q.qweight.dtype == torch.float8_e4m3fn and q.qscale.dtype == torch.float32  # stored data keeps its dtypes
    loaded = load_quantized(path, device="cpu", dtype=torch.bfloat16)
    x = inputs(torch.bfloat16)
    assert torch.equal(run(loaded, x), run(model, x))


def test_files_that_are_not_quantized(plain, tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    assert not is_quantized_file(tmp_path / "plain.safetensors") and not is_quantized_file(tmp_path)
    with pytest.raises(fq.storage.CheckpointError, match="not a quantized fluxion file"):
        load_quantized(tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match="not quantized"):
        save_quantized(copy.deepcopy(plain), tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="written by save_quantized"):
        save_quantized(quantize(copy.deepcopy(plain), "int8"), tmp_path / "x.safetensors",
                       metadata={QUANT_METADATA_KEY: "fp8"})


def _adapter(model, seed=1, rank=4, name="style"):
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for path in ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear2",
                 "double_blocks.0.img_mod.lin"):
        lin = model.get_submodule(path)
        updates[path] = LowRank(torch.randn(rank, lin.in_features, generator=g) * 0.1,
                                torch.randn(lin.out_features, rank, generator=g) * 0.1)
    return Adapter(name, updates)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lora_on_a_quantized_base(plain, scheme):
    x = inputs()
    base = copy.deepcopy(plain)
    add_adapter(base, _adapter(base), 1.0)
    model = quantize(copy.deepcopy(plain), scheme)
    without = run(model, x)
    add_adapter(model, _adapter(model), 1.0)
    with_lora = run(model, x)
    assert rel(with_lora, run(base, x)) < TOLERANCE[scheme]
    assert rel(with_lora, without) > 0.05  # the adapter is in effect
    set_loras(model, {"style": 0.0})
    assert torch.equal(run(model, x), without)
    set_loras(model, {"style": 1.0})
    assert torch.equal(run(model, x), with_lora)
    unload_loras(model)
    assert torch.equal(run(model, x), without)


def test_fusing_into_quantized_weights_is_refused(plain):
    model = quantize(copy.deepcopy(plain), "int8")
    add_adapter(model, _adapter(model), 1.0)
    with pytest.raises(InputError, match="quantized"):
        fuse_loras(model)


def test_a_failed_fuse_leaves_the_model_as_it_was(plain):
    model = quantize(copy.deepcopy(plain), "int8")
    add_adapter(model, _adapter(model), 1.0)
    x = inputs()
    before = run(model, x)
    with pytest.raises(InputError, match="quantized"):
        fuse_loras(model)
    unfuse_loras(model)
    assert torch.equal(run(model, x), before)
    q = model.double_blocks[0].img_attn.qkv
    assert q.weight.numel() == 0 and q.qweight.dtype == torch.int8


def test_the_model_s_other_code_paths(plain):
    model = quantize(copy.deepcopy(plain), "int8").to("cpu").eval()
    x = inputs()
    expected = run(model, x)
    with torch.no_grad():  # the stages fluxion.cache runs one by one
        img, txt, vec, pe = model.embed(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                        x["guidance"])
        for block in model.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        staged = model.final_layer(model.single_stream(img, txt, vec, pe), vec)
    assert torch.equal(staged, expected)
    assert torch.equal(run(copy.deepcopy(model), x), expected)
    # a sample's result does not depend on its batch: round-off only, as the plain model (an activation scale
    # shared by the batch would differ by about 1e-2)
    one = {k: v[:1] for k, v in x.items()}
    assert rel(run(model, one), expected[:1]) < 1e-5


def test_int8_kernels_and_the_gpu_fp8_kernel_agree_with_dequantization(plain, monkeypatch):
    x = inputs()
    model = quantize(copy.deepcopy(plain), "int8")
    fbgemm = run(model, x)
    monkeypatch.setattr(qlinear, "CPU_INT8_KERNEL", "int_mm")  # the CUDA path's math, on the CPU
    int_mm = run(model, x)
    assert not torch.equal(fbgemm, int_mm) and rel(int_mm, run(plain, x)) < TOLERANCE["int8"]
    q = quantize(copy.deepcopy(plain), "fp8").single_blocks[0].linear1
    h = torch.randn(2, 40, q.in_features)
    got = qlinear.fp8_scaled_mm(h, q.qweight, q.qscale, q.bias)  # runs on CPUs too, slowly
    assert rel(got, torch.nn.functional.linear(h, q.dequantize(), q.bias)) < 0.05


def test_gradients_flow_through_quantized_layers(plain):
    model = quantize(copy.deepcopy(plain), "int8")
    x = inputs()
    x["img"].requires_grad_(True)
    model(**x).square().mean().backward()
    assert x["img"].grad is not None and x["img"].grad.abs().sum() > 0


def test_fluxion_needs_no_torchao():
    code = """
import sys
sys.modules["torchao"] = None  # as if not installed
import fluxion, torch
from fluxion.model import TRANSFORMER_PRESETS, Flux
from fluxion.quant import SCHEMES, quantize
from fluxion.quant._torchao import import_torchao
from fluxion.errors import InputError
for s in SCHEMES:
    m = quantize(Flux(TRANSFORMER_PRESETS["debug"]).eval(), s)
try:
    import_torchao()
except InputError as e:
    print("refused:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'torchao>=0.18'" in out.stdout


def test_torchao_imports_quietly():
    pytest.importorskip("torchao")  # only where it is installed
    code = "from fluxion.quant._torchao import import_torchao; import_torchao()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Failed to load" not in out.stderr and "Enum subclass" not in out.stderr


# -- the shipped tiny models -------------------------------------------------------------------------------------
# Sampling amplifies small changes chaotically, sample by sample: measured relative latent differences after 4 steps
# (2 samples; tiny-dev t2i / tiny-pro true CFG 4 / tiny-schnell i2i) on the models shipped since issue #27: int8
# 0.09 / 0.15 / 0.03, int8-weight 0.05 / 0.02 / 0.01, fp8 0.07 / 0.52 / 0.01, int4 0.15 / 0.96 / 0.32. tiny-pro's fp8
# is 0.03 at its 20 steps, and two seeds of its prompts differ by 1.43. GenEval-shapes (benchmarks/quantize.py
# quality) is the quality measure; these catch breakage.
PIPE_TOLERANCE = {"int8": 0.3, "int8-weight": 0.35, "fp8": 0.65, "int4": 1.2}


@pytest.fixture(scope="module")
def pipes():
    from fluxion.pipeline import Pipeline

    return {name: Pipeline.from_pretrained(name, device="cpu") for name in ("tiny-dev", "tiny-pro", "tiny-schnell")}


CASES = {
    "tiny-dev": {},
    "tiny-pro": {"negative_prompt": "blurry", "true_cfg_scale": 4.0},
    "tiny-schnell": {"image": Image.new("RGB", (64, 64), (200, 30, 30)), "strength": 0.6},
}


_EXPECTED: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(CASES))
def test_tiny_models_generate_close_to_unquantized(pipes, name, scheme):
    pipe = pipes[name]
    kwargs = dict(height=64, width=64, num_inference_steps=4, seed=[0, 1], output_type="latent", progress=False,
                  **CASES[name])
    prompts = ["a red circle left of a blue square", "two green triangles"]
    plain_transformer = pipe.transformer
    if name not in _EXPECTED:
        _EXPECTED[name] = pipe(prompts, **kwargs)
    expected = _EXPECTED[name]
    try:
        pipe.transformer = quantize(copy.deepcopy(plain_transformer), scheme)
        got = pipe(prompts, **kwargs)
    finally:
        pipe.transformer = plain_transformer
    print(f"{name} {scheme}: relative latent difference {rel(got, expected):.4f}")
    assert rel(got, expected) < PIPE_TOLERANCE[scheme]
