"""Step caching (fluxion.cache): fbcache and teacache at threshold 0 and taylorseer at interval 1 are the plain
sampler bit for bit (text-to-image, true CFG, image-to-image); otherwise steps are skipped and the residual reused or
extrapolated; TeaCache's polynomial is fitted, stored per model and used; the setting is checked, recorded and
reapplied."""

import json
import shutil

import pytest
import torch
from PIL import Image

from fluxion import cli
from fluxion import sampling
from fluxion.cache import CacheSpec, FirstBlockCache, TaylorSeerCache, TeaCache, fit_teacache
from fluxion.errors import InputError
from pipeline_fixtures import assert_from_image_reapplies, make_pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("variant, extra", [
    ("dev", {}),
    ("pro", {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),  # both CFG halves in one cached batch
    ("schnell", {"image": Image.new("RGB", (32, 32), (200, 30, 30)), "strength": 0.6}),
])
def test_caches_that_compute_every_step_are_the_plain_sampler_bit_for_bit(variant, extra):
    pipe = make_pipeline(variant)
    kwargs = dict(seed=[3, 4], height=32, width=32, num_inference_steps=6, output_type="latent", **extra)
    plain = pipe(PROMPTS, **kwargs)
    for cache in ("fbcache:0", "teacache:0", "taylorseer:1"):
        assert torch.equal(plain, pipe(PROMPTS, cache=cache, **kwargs))


def test_a_threshold_skips_steps_and_reuses_the_last_residual():
    pipe = make_pipeline("dev")
    model = pipe.transformer
    x = torch.randn(1, 4, model.in_channels)
    inputs = dict(img_ids=torch.zeros(1, 4, 3), txt=torch.randn(1, 8, model.params.context_in_dim),
                  txt_ids=torch.zeros(1, 8, 3), y=torch.randn(1, model.params.vec_in_dim), guidance=torch.tensor([3.5]))
    everything = FirstBlockCache(model, threshold=1.0)  # any change below 100%: skip after the first step
    with torch.no_grad():
        first = everything(x, timesteps=torch.tensor([0.9]), **inputs)
        assert torch.equal(first, model(x, timesteps=torch.tensor([0.9]), **inputs))
        again = everything(x, timesteps=torch.tensor([0.9]), **inputs)  # same input: the cached path is exact
        everything(x * 1.01, timesteps=torch.tensor([0.85]), **inputs)
    assert (everything.computed, everything.skipped) == (1, 2)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)
    latents = pipe(PROMPTS, seed=[3, 4], height=32, width=32, num_inference_steps=8, output_type="latent")
    cached = pipe(PROMPTS, seed=[3, 4], height=32, width=32, num_inference_steps=8, output_type="latent",
                  cache="fbcache:0.5")
    assert not torch.equal(latents, cached) and torch.isfinite(cached).all()


def test_taylorseer_computes_every_nth_step_and_extrapolates_in_between():
    pipe = make_pipeline("dev")
    cond = pipe.encode_prompt(PROMPTS[:1])
    img, ids = torch.randn(1, 4, pipe.transformer.in_channels), sampling.image_ids(1, 4, 4, "cpu")
    cache = TaylorSeerCache(pipe.transformer, interval=3)
    sampling.denoise(cache, img, ids, cond, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])  # 7 steps
    assert (cache.computed, cache.skipped) == (3, 4)  # steps 0, 3, 6 in full
    cache.history = [(0.6, torch.zeros(2)), (0.4, torch.ones(2))]  # a rest growing by 1 per -0.2 of t
    torch.testing.assert_close(cache.predicted_rest(0.3), torch.full((2,), 1.5))


def test_teacache_sums_the_rescaled_input_change_and_reuses_the_residual_of_all_blocks():
    pipe = make_pipeline("dev")
    model = pipe.transformer
    x = torch.randn(1, 4, model.in_channels)
    inputs = dict(img_ids=torch.zeros(1, 4, 3), txt=torch.randn(1, 8, model.params.context_in_dim),
                  txt_ids=torch.zeros(1, 8, 3), y=torch.randn(1, model.params.vec_in_dim), guidance=torch.tensor([3.5]))
    cache = TeaCache(model, threshold=0.5, polynomial=(2.0, 0.0))  # rescaled = twice the relative change
    with torch.no_grad():
        first = cache(x, timesteps=torch.tensor([0.9]), **inputs)
        assert torch.equal(first, model(x, timesteps=torch.tensor([0.9]), **inputs))
        again = cache(x, timesteps=torch.tensor([0.9]), **inputs)  # no change: skipped, and the reuse is exact
        torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)
        assert (cache.computed, cache.skipped, cache.accumulated) == (1, 1, 0.0)
        cache(x + 0.01 * torch.randn_like(x), timesteps=torch.tensor([0.9]), **inputs)  # adds 2 x its change...
        assert cache.skipped == 2 and 0 < cache.accumulated < 0.5
        cache(torch.randn_like(x), timesteps=torch.tensor([0.9]), **inputs)  # ...until the sum reaches 0.5
        assert (cache.computed, cache.accumulated) == (2, 0.0)
    assert TeaCache(model, 0.1, polynomial=(1.0, -0.5)).rescale(0.2) == 0.0  # never negative


def test_teacache_polynomial_is_fitted_stored_per_model_and_used(tmp_path, monkeypatch):
    pipe = make_pipeline("dev")
    fit = fit_teacache(pipe, PROMPTS, steps=6, degree=2)
    assert len(fit.polynomial) == 3 and fit.pairs == 2 * 5  # two prompts of 6 steps: 5 consecutive pairs each
    assert 0 <= fit.r_squared <= 1 and fit.input_range[0] <= fit.input_range[1]

    from fluxion.registry import BUILTIN_MODELS

    folder = tmp_path / "my-dev"
    shutil.copytree(BUILTIN_MODELS / "tiny-dev", folder)
    manifest = json.loads((folder / "fluxion.json").read_text())
    del manifest["teacache"]
    (folder / "fluxion.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])  # the default --spec is evals/shapes.jsonl
    assert cli.main(["fit-teacache", str(folder), "--prompts", "2", "--steps", "6", "--write"]) == 0
    written = json.loads((folder / "fluxion.json").read_text())["teacache"]
    assert len(written) == 2 and written[0] > 0  # a larger input change means a larger output change
    from fluxion import Pipeline

    loaded = Pipeline.from_pretrained(str(folder), device="cpu")
    assert loaded.teacache_polynomial == tuple(written)
    loaded("a red circle", seed=0, num_inference_steps=12, output_type="latent", cache="teacache:0.1")  # 6: 0-3 skips
    assert loaded.last_cache.polynomial == tuple(written) and loaded.last_cache.skipped > 0

    manifest["teacache"] = ["1", 2]
    (folder / "fluxion.json").write_text(json.dumps(manifest))
    from fluxion.errors import ModelFolderError

    with pytest.raises(ModelFolderError, match="'teacache' must be a list of numbers"):
        Pipeline.from_pretrained(str(folder), device="cpu")


@pytest.mark.parametrize("text, expected", [("fbcache", CacheSpec("fbcache", 0.2)),
                                            ("fbcache:0.05", CacheSpec("fbcache", 0.05)),
                                            ("taylorseer", CacheSpec("taylorseer", 3)),
                                            ("teacache", CacheSpec("teacache", 0.1)),
                                            ("teacache:0.15", CacheSpec("teacache", 0.15)),
                                            ("taylorseer:3", CacheSpec("taylorseer", 3))])
def test_cache_settings_parse(text, expected):
    assert CacheSpec.parse(text) == expected and CacheSpec.parse(str(expected)) == expected


@pytest.mark.parametrize("text, words", [("tea", "one of fbcache, teacache, taylorseer"),
                                         ("fbcache:abc", "with a number"), ("fbcache:2", "in [0, 1], got 2"),
                                         (3, "a string"),
                                         ("taylorseer:0", "from 1 to 100, got 0"), ("taylorseer:1.5", "got 1.5")])
def test_bad_cache_settings_name_the_flag(text, words):
    with pytest.raises(InputError, match="--cache") as e:
        make_pipeline("dev")("a red circle", height=32, width=32, cache=text)
    assert words in str(e.value)


def test_the_image_records_the_cache_and_from_image_reapplies_it(tmp_path):
    assert_from_image_reapplies(tmp_path, "--cache", "fbcache:0.2", steps=6)


def test_caches_run_with_lora_adapters():
    from fluxion.lora import Adapter, LowRank, add_adapter

    pipe = make_pipeline("dev")
    linear = pipe.transformer.double_blocks[0].img_attn.qkv
    g = torch.Generator().manual_seed(0)
    update = LowRank(torch.randn(2, linear.in_features, generator=g), torch.randn(linear.out_features, 2, generator=g))
    add_adapter(pipe.transformer, Adapter("x", {"double_blocks.0.img_attn.qkv": update}), 0.5)
    kwargs = dict(seed=[3, 4], height=32, width=32, num_inference_steps=6, output_type="latent")
    with_lora = pipe(PROMPTS, **kwargs)
    assert torch.equal(with_lora, pipe(PROMPTS, cache="fbcache:0", **kwargs))
    pipe.set_loras({})
    assert not torch.equal(with_lora, pipe(PROMPTS, cache="fbcache:0", **kwargs))  # the adapter was in effect
