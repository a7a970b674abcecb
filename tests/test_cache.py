"""Step caching (fluxion.cache): threshold 0 is the plain sampler bit for bit (text-to-image, true CFG,
image-to-image); a threshold skips steps and reuses the residual; the setting is checked, recorded and reapplied."""

import pytest
import torch
from PIL import Image

from fluxion import cli
from fluxion.cache import CacheSpec, FirstBlockCache
from fluxion.errors import InputError
from fluxion.metadata import read_settings
from pipeline_fixtures import make_pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("variant, extra", [
    ("dev", {}),
    ("pro", {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),  # both CFG halves in one cached batch
    ("schnell", {"image": Image.new("RGB", (32, 32), (200, 30, 30)), "strength": 0.6}),
])
def test_threshold_zero_is_the_plain_sampler_bit_for_bit(variant, extra):
    pipe = make_pipeline(variant)
    kwargs = dict(seed=[3, 4], height=32, width=32, num_inference_steps=6, output_type="latent", **extra)
    plain = pipe(PROMPTS, **kwargs)
    cached = pipe(PROMPTS, cache="fbcache:0", **kwargs)
    assert torch.equal(plain, cached)


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


@pytest.mark.parametrize("text, expected", [("fbcache", CacheSpec("fbcache", 0.15)),
                                            ("fbcache:0.05", CacheSpec("fbcache", 0.05))])
def test_cache_settings_parse(text, expected):
    assert CacheSpec.parse(text) == expected and CacheSpec.parse(str(expected)) == expected


@pytest.mark.parametrize("text, words", [("teacache", "one of fbcache"), ("fbcache:abc", "with a number"),
                                         ("fbcache:2", "in [0, 1], got 2"), (3, "a string")])
def test_bad_cache_settings_name_the_flag(text, words):
    with pytest.raises(InputError, match="--cache") as e:
        make_pipeline("dev")("a red circle", height=32, width=32, cache=text)
    assert words in str(e.value)


def test_the_image_records_the_cache_and_from_image_reapplies_it(tmp_path):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    assert cli.main(["generate", "two yellow stars", "--model", "tiny-dev", "--steps", "6", "--seed", "1",
                     "--cache", "fbcache:0.2", "--out", str(out)]) == 0
    assert read_settings(out).cache == "fbcache:0.2"
    assert cli.main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert read_settings(again).cache == "fbcache:0.2"
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
