"""Compilation (fluxion.compile): the compiled transformer equals the eager one; each input shape compiles once
(three regions: the double block, the single block and the final layer) and is reused by every step and call;
LoRA hot-swap (fluxion.lora.enable_hotswap) loads, switches, scales, fuses and deletes adapters without a recompile;
the step caches run the compiled blocks. Compilations are counted by a backend that wraps inductor (one test) or
runs the captured graph as it is (the others, for speed)."""

import copy

import pytest
import torch

from fluxion.cache import FirstBlockCache
from fluxion.compile import compile_transformer, is_compiled, uncompile
from fluxion.errors import InputError
from fluxion.lora import (Adapter, Kronecker, LowRank, add_adapter, delete_adapter, fuse_loras, set_loras,
                          unfuse_loras, unload_loras)
from fluxion.model import TRANSFORMER_PRESETS, Flux
from fluxion.offload import disable_offload, enable_offload
from pipeline_fixtures import make_pipeline, random_weights

REGIONS = 3
LORA_PATHS = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.0.linear1",
              "final_layer.linear"]


class Counting:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self, inductor: bool = False):
        self.graphs, self.inductor = 0, inductor

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # dynamo's caches are per code object and process-wide: start each test empty
    yield
    torch._dynamo.reset()


def _model(seed: int = 1) -> Flux:
    return random_weights(Flux(TRANSFORMER_PRESETS["debug"]), seed=seed).eval()


def _inputs(tokens: int = 16, t: float = 0.7, guidance: float = 3.5, batch: int = 2):
    p = TRANSFORMER_PRESETS["debug"]
    g = torch.Generator().manual_seed(tokens)
    return dict(img=torch.randn(batch, tokens, p.in_channels, generator=g),
                img_ids=torch.randint(0, 8, (batch, tokens, 3), generator=g).float(),
                txt=torch.randn(batch, 8, p.context_in_dim, generator=g), txt_ids=torch.zeros(batch, 8, 3),
                timesteps=torch.full((batch,), t), y=torch.randn(batch, p.vec_in_dim, generator=g),
                guidance=torch.full((batch,), guidance))


def _adapter(model: Flux, name: str, rank: int, seed: int, paths=LORA_PATHS) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for path in paths:
        linear = model.get_submodule(path)
        updates[path] = LowRank(torch.randn(rank, linear.in_features, generator=g) * 0.2,
                                torch.randn(linear.out_features, rank, generator=g) * 0.2, scale=4.0 / rank)
    return Adapter(name, updates)


def test_inductor_output_equals_eager_without_recompiling_across_steps_and_hotswaps():
    eager, model = _model(), _model()
    backend = Counting(inductor=True)
    compile_transformer(model, lora_rank=8, backend=backend)
    with torch.inference_mode():
        for t, guidance in ((0.9, 3.5), (0.4, 5.0)):  # new steps and guidance scales: same code
            torch.testing.assert_close(model(**_inputs(t=t, guidance=guidance)),
                                       eager(**_inputs(t=t, guidance=guidance)), rtol=0, atol=1e-5)
        assert backend.graphs == REGIONS
        for name, rank, seed, scale in (("a", 4, 1, 0.7), ("b", 8, 2, 1.3)):  # b replaces a
            for m in (model, eager):
                if name == "b":
                    delete_adapter(m, "a")
                add_adapter(m, _adapter(m, name, rank, seed), scale)
            out, expected = model(**_inputs()), eager(**_inputs())
            assert (expected - _model()(**_inputs())).abs().max() > 1e-2  # the adapter does something
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        cached = [FirstBlockCache(m, threshold=0.05) for m in (model, eager)]
        for step in range(3):  # the input barely changes: the first step computes, the others are skipped
            x = _inputs()
            x["img"] = x["img"] * (1 + step * 1e-3)
            torch.testing.assert_close(cached[0](**x), cached[1](**x), rtol=0, atol=1e-5)
        assert (cached[0].computed, cached[0].skipped) == (cached[1].computed, cached[1].skipped) == (1, 2)
    assert backend.graphs == REGIONS  # nothing above recompiled


def test_each_shape_compiles_once_and_pipelines_reuse_it():
    pipe = make_pipeline("dev")
    eager = copy.deepcopy(pipe.transformer)
    backend = Counting()
    compile_transformer(pipe.transformer, backend=backend)
    kwargs = dict(seed=[1, 2], height=32, width=32, num_inference_steps=4, output_type="latent")
    first = pipe(["a", "b"], **kwargs)
    assert backend.graphs == REGIONS
    pipe(["c", "d"], guidance_scale=2.0, **kwargs)
    pipe(["a", "b"], cache="fbcache", **kwargs)  # the step cache calls the compiled regions one by one
    assert backend.graphs == REGIONS
    pipe(["a"], **{**kwargs, "seed": 1})  # a new batch size: a new shape, compiled once
    pipe(["b"], **{**kwargs, "seed": 2})
    assert backend.graphs == 2 * REGIONS
    for mode in ("sequential", "model"):  # the offload hooks run outside the compiled regions
        enable_offload(mode, {"transformer": pipe.transformer}, "cpu")
        assert torch.equal(pipe(["a", "b"], **kwargs), first)
        disable_offload(pipe.transformer)
    assert backend.graphs == 2 * REGIONS
    pipe.transformer = eager
    assert torch.equal(pipe(["a", "b"], **kwargs), first)  # the "eager" backend runs the same ops: bit for bit


def test_hotswap_changes_never_recompile_and_refusals_say_why():
    model, eager = _model(), _model()
    backend = Counting()
    compile_transformer(model, lora_rank=8, backend=backend)
    with torch.inference_mode():
        def check():
            torch.testing.assert_close(model(**_inputs()), eager(**_inputs()), rtol=0, atol=1e-5)

        check()
        for m in (model, eager):
            add_adapter(m, _adapter(m, "a", 4, 1), 0.5)
            add_adapter(m, _adapter(m, "b", 4, 2, paths=LORA_PATHS[:2]), 1.0)  # stacked: 4 + 4 columns
        check()
        for m in (model, eager):
            set_loras(m, {"b": -0.6})
        check()
        for m in (model, eager):
            fuse_loras(m)
        check()
        for m in (model, eager):
            unfuse_loras(m)
            delete_adapter(m, "b")
            set_loras(m, {"a": 0.5})
        check()
        assert backend.graphs == REGIONS

        with pytest.raises(InputError, match="rank 16, over the hot-swap rank 8"):
            add_adapter(model, _adapter(model, "big", 16, 3), 1.0)
        with pytest.raises(InputError, match="need rank 12 on double_blocks.0.img_attn.qkv"):
            add_adapter(model, _adapter(model, "c", 8, 4), 1.0)  # a (rank 4) is active too
        lin = model.get_submodule("final_layer.linear")
        kron = Adapter("kron", {"final_layer.linear": Kronecker(torch.randn(lin.out_features // 2, 2),
                                                                torch.randn(2, lin.in_features // 2))})
        with pytest.raises(InputError, match="is a Kronecker; hot-swap slots hold plain low-rank"):
            add_adapter(model, kron)
        check()  # refusals changed nothing
    unload_loras(model)
    assert not any(m._forward_hooks for m in model.modules())
    assert not any("slot" in name for name, _ in model.named_buffers())


def test_plain_adapters_on_a_compiled_model_recompile_but_stay_correct():
    """Without hot-swap, the adapters' hooks are part of the compiled code: each change is a (counted) recompile."""
    model, eager = _model(), _model()
    backend = Counting()
    compile_transformer(model, backend=backend)
    with torch.inference_mode():
        model(**_inputs())
        for m in (model, eager):
            add_adapter(m, _adapter(m, "a", 4, 1), 0.5)
        torch.testing.assert_close(model(**_inputs()), eager(**_inputs()), rtol=0, atol=1e-5)
        assert backend.graphs > REGIONS
        for m in (model, eager):
            set_loras(m, {"a": -1.0})
        torch.testing.assert_close(model(**_inputs()), eager(**_inputs()), rtol=0, atol=1e-5)
        unload_loras(model)
        torch.testing.assert_close(model(**_inputs()), _model()(**_inputs()), rtol=0, atol=1e-5)


def test_freezing_refuses_in_place_weight_changes_and_uncompile_restores_eager():
    model = _model()
    add_adapter(model, _adapter(model, "a", 4, 1))
    with pytest.raises(InputError, match="compile without freezing to use LoRA"):
        compile_transformer(model, freezing=True)
    unload_loras(model)
    compile_transformer(model, freezing=True)
    add_adapter(model, _adapter(model, "a", 4, 1))  # new hooks: a recompile, which freezes the new code
    with pytest.raises(InputError, match="cannot fuse adapters: the model was compiled with freezing"):
        fuse_loras(model)
    with pytest.raises(InputError, match="compiled already"):
        compile_transformer(model)
    uncompile(model)
    assert not is_compiled(model) and "forward" not in model.double_blocks[0].__dict__
    fuse_loras(model)
