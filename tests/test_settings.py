"""One validation layer: GenerationRequest refuses every bad setting with its name, its flag and what is accepted;
the image-metadata reader uses the same checks; property-based tests prove nothing else escapes."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image, PngImagePlugin

from fluxion.errors import InputError
from fluxion.metadata import PNG_KEY, GenerationSettings, read_settings, save_png
from fluxion.settings import FLUX1_SIZES, GenerationRequest, SizeRange, memory_budget
from pipeline_fixtures import make_pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline("dev")


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_inference_steps=0), "num_inference_steps (--steps): expected an integer from 1 to 1000, got 0"),
    (dict(num_inference_steps=-3), "num_inference_steps (--steps)"),
    (dict(num_inference_steps=2.5), "num_inference_steps (--steps): expected an integer"),
    (dict(num_inference_steps="abc"), "got 'abc'"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt (--num-images): expected an integer from 1"),
    (dict(strength=0), "strength (--strength): expected a number in (0, 1]"),
    (dict(strength=1.5), "strength (--strength)"),
    (dict(guidance_scale=math.nan), "guidance_scale (--guidance): expected a number in [0, 100], got nan"),
    (dict(guidance_scale=math.inf), "guidance_scale (--guidance)"),
    (dict(guidance_scale=-1.0), "guidance_scale (--guidance)"),
    (dict(true_cfg_scale=math.nan), "true_cfg_scale (--true-cfg)"),
    (dict(sigmas=[0.2, 0.5, 1.0]), "sigmas (--sigmas): expected strictly descending times"),
    (dict(sigmas=[1.5, 0.5]), "sigmas[0] (--sigmas): expected a number in (0, 1], got 1.5"),
    (dict(sigmas=[1.0, 0.0]), "sigmas[1] (--sigmas)"),
    (dict(sigmas=[]), "sigmas (--sigmas): expected a non-empty list"),
    (dict(sigmas=[1.0, 0.5], num_inference_steps=4), "conflicts with the 2 sigmas"),
    (dict(seed=-1), "seed (--seed): expected an integer from 0"),
    (dict(seed=True), "seed (--seed)"),
    (dict(seed=[1, 2, 3]), "seed (--seed): expected one seed per image (1 prompts x 1 = 1), got 3"),
    (dict(seed=2**63 - 1, num_images_per_prompt=2), "consecutive seeds"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt (--negative-prompt): expected one entry per prompt (1)"),
    (dict(height=0), "height (--height): expected an integer from 1"),
    (dict(width="64"), "width (--width): expected an integer"),
    (dict(output_type="png"), "output_type: expected one of 'pil', 'latent', 'pt', got 'png'"),
    (dict(mask_image=Image.new("L", (8, 8))), "mask_image (--mask): inpainting needs image (--init-image)"),
    (dict(strength=0.5), "strength (--strength): 0.5 needs image (--init-image)"),
    (dict(image=42), "image (--init-image): expected a PIL image or the path of an image file, got 42"),
    (dict(image="/no/such/file.png"), "image (--init-image): no such file /no/such/file.png"),
    (dict(max_memory="lots"), "max_memory (--max-memory): expected a positive size such as 8GB"),
    (dict(max_memory=0), "max_memory (--max-memory)"),
    (dict(allow_any_size="yes"), "allow_any_size: expected True or False"),
])
def test_request_refuses_with_name_flag_and_accepted_range(kwargs, words):
    with pytest.raises(InputError) as e:
        GenerationRequest(prompt="a red circle", **kwargs)
    assert words in str(e.value)


@pytest.mark.parametrize("prompt, words", [
    ([], "prompt (PROMPT): expected at least one string"),
    (None, "prompt (PROMPT): expected a string or a list of strings, got None"),
    (["ok", 3], "prompt[1] (PROMPT): expected a string, got 3"),
    ("x" * 10_001, "expected at most 10000 characters, got 10001"),
    ("bad \ud800 surrogate", "lone surrogate"),
    (b"bytes", "expected a string or a list of strings"),
])
def test_request_refuses_bad_prompts(prompt, words):
    with pytest.raises(InputError) as e:
        GenerationRequest(prompt=prompt)
    assert words in str(e.value)


def test_request_normalises_what_it_accepts():
    r = GenerationRequest(prompt="é ✓ 日本", negative_prompt="blurry", num_inference_steps=2, guidance_scale=2,
                          seed=[4, 5], num_images_per_prompt=2, sigmas=[1, 0.5], max_memory="1.5GiB")
    assert r.prompt == ["é ✓ 日本"] and r.negative_prompt == ["blurry"] and r.guidance_scale == 2.0
    assert r.seed == [4, 5] and r.sigmas == [1.0, 0.5] and r.max_memory == int(1.5 * 2**30)
    assert GenerationRequest(prompt="").prompt == [""]  # the empty prompt is FLUX's unconditional input


def test_init_image_that_is_not_an_image(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(InputError, match=r"image \(--init-image\): .*notes.txt is not an image PIL can read"):
        GenerationRequest(prompt="x", image=notes)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(InputError, match="cut.png is not an image PIL can read"):
        GenerationRequest(prompt="x", image=truncated)


def test_memory_budget_units():
    assert memory_budget("m", "8GB") == 8 * 10**9 and memory_budget("m", "512MiB") == 512 * 2**20
    assert memory_budget("m", "2.5g") == 2_500_000_000 and memory_budget("m", 1024) == 1024
    for bad in ("-1GB", "nan", "inf", "GB", "8XB", 0, -5, 1.5, True):
        with pytest.raises(InputError, match="max_memory"):
            memory_budget("max_memory", bad)


def test_size_range():
    assert FLUX1_SIZES.contains(1024, 1024) and FLUX1_SIZES.contains(1024, 2048)
    assert not FLUX1_SIZES.contains(2048, 2048) and not FLUX1_SIZES.contains(128, 1024)
    r = SizeRange.from_manifest({"min_side": 48, "max_side": 80, "max_pixels": 4096}, "m.json")
    assert r.contains(64, 64) and r.contains(48, 80) and not r.contains(80, 80) and not r.contains(32, 64)
    with pytest.raises(InputError, match="m.json: 'sizes' must be an object"):
        SizeRange.from_manifest([48, 80], "m.json")


# -- the pipeline: model-dependent checks -----------------------------------------------------------------------
def test_pipeline_refuses_sizes_outside_the_models_range(pipe):
    pipe.sizes = SizeRange(32, 64, 64 * 64)
    try:
        with pytest.raises(InputError, match=r"supports 32 to 64 px a side .* got 128x64; pass allow_any_size=True"):
            pipe("x", height=64, width=128, num_inference_steps=1)
        out = pipe("x", height=64, width=128, num_inference_steps=1, allow_any_size=True, output_type="latent")
        assert out.shape[-2:] == (8, 16)
    finally:
        pipe.sizes = None


def test_pipeline_refuses_non_multiples_with_nearest_sizes(pipe):
    with pytest.raises(InputError, match=r"width \(--width\): expected a positive multiple of 16 .* got 50; try 48 "
                                         r"or 64"):
        pipe("x", height=32, width=50)


def test_the_smallest_strength_still_runs_one_step(pipe):
    seen = []
    pipe("x", image=Image.new("RGB", (32, 32)), strength=1e-6, num_inference_steps=2,
         callback=lambda *a: seen.append(a[0]))
    assert seen == [0]


def test_zero_true_cfg_is_honoured_not_read_as_unset():
    pipe = make_pipeline("pro")
    zero = pipe("x", negative_prompt="y", seed=0, true_cfg_scale=0.0, num_inference_steps=2, output_type="latent")
    negative_only = pipe("y", seed=0, true_cfg_scale=1.0, num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(zero, negative_only, rtol=0, atol=1e-5)  # 0 * (pos - neg) + neg = the negative


def test_memory_refusal_names_need_budget_and_remedies(pipe):
    with pytest.raises(InputError) as e:
        pipe("x", height=256, width=256, max_memory=2**20)
    message = str(e.value)
    for words in ("one 256x256 image needs about", "in all (weights", "max_memory (--max-memory) budget of 1 MiB",
                  "a larger max_memory"):
        assert words in message


def test_large_batch_runs_in_chunks_with_the_same_images(pipe):
    whole = pipe("x", seed=3, num_images_per_prompt=4, num_inference_steps=2, output_type="latent")
    size = pipe.defaults.size
    one_image = pipe.estimate_memory(size, size, 1).total
    chunked = pipe("x", seed=3, num_images_per_prompt=4, num_inference_steps=2, output_type="latent",
                   max_memory=one_image + 1)
    plan = pipe.plan(GenerationRequest(prompt="x", num_images_per_prompt=4, max_memory=one_image + 1))
    assert plan.batch_size == 1 and plan.num_images == 4
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


# -- the metadata reader ----------------------------------------------------------------------------------------
def _png_with(tmp_path, record) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, record if isinstance(record, str) else json.dumps(record))
    path = tmp_path / "edited.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


@pytest.fixture()
def record(pipe):
    return json.loads(pipe("a red circle", seed=1, num_inference_steps=1)[0].info[PNG_KEY])


@pytest.mark.parametrize("edit, words", [
    ({"num_inference_steps": "abc"}, "num_inference_steps (--steps): expected an integer from 1 to 1000, got 'abc'"),
    ({"seed": -4}, "seed (--seed)"),
    ({"strength": 0}, "strength (--strength)"),
    ({"sigmas": [0.2, 0.9]}, "sigmas (--sigmas): expected strictly descending"),
    ({"variant": "turbo"}, "variant: expected one of 'pro', 'dev', 'schnell'"),
    ({"guidance_scale": "high"}, "guidance_scale (--guidance)"),
    ({"colour": "red"}, "unknown settings keys ['colour']"),
])
def test_edited_metadata_is_refused_with_the_field(tmp_path, record, edit, words):
    path = _png_with(tmp_path, {**record, **edit})
    with pytest.raises(InputError) as e:
        read_settings(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_broken_metadata(tmp_path, record):
    with pytest.raises(InputError, match="not valid JSON"):
        read_settings(_png_with(tmp_path, "{not json"))
    with pytest.raises(InputError, match="must be a JSON object"):
        read_settings(_png_with(tmp_path, "[1, 2]"))
    with pytest.raises(InputError, match=r"settings keys \['prompt'\] are missing"):
        read_settings(_png_with(tmp_path, {k: v for k, v in record.items() if k != "prompt"}))
    notes = tmp_path / "notes.png"
    notes.write_text("text")
    with pytest.raises(InputError, match="is not an image PIL can read"):
        read_settings(notes)
    good = GenerationSettings.from_json(json.dumps(record))
    assert read_settings(save_png(Image.new("RGB", (8, 8)), tmp_path / "ok.png", good)) == good


# -- property-based: every combination either gives images or raises InputError ---------------------------------
def _anything():
    return st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20), st.lists(st.integers(-3, 3), max_size=3))


_prompts = st.one_of(st.text(max_size=40), st.lists(st.text(max_size=12), max_size=3), st.just("x" * 10_050),
                     st.integers(), st.none())
_sizes = st.one_of(st.none(), st.sampled_from([16, 32, 48, 50, 0, -16, 64]), _anything())


@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
@given(prompt=_prompts,
       negative_prompt=st.one_of(st.none(), st.text(max_size=10), st.lists(st.text(max_size=5), max_size=3)),
       height=_sizes, width=_sizes,
       steps=st.one_of(st.none(), st.integers(-2, 3), _anything()),
       guidance=st.one_of(st.none(), st.floats(-5, 10), st.just(math.nan), st.just(math.inf), _anything()),
       true_cfg=st.one_of(st.none(), st.floats(-1, 5), st.just(math.nan)),
       seed=st.one_of(st.none(), st.integers(-5, 2**64), st.lists(st.integers(-1, 9), max_size=4), _anything()),
       per_prompt=st.one_of(st.integers(-1, 3), _anything()),
       strength=st.one_of(st.floats(-0.5, 1.5), st.just(math.nan), st.just(1.0)),
       with_image=st.booleans(), with_mask=st.booleans(),
       sigmas=st.one_of(st.none(), st.lists(st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)), max_size=3),
                        _anything()),
       output_type=st.sampled_from(["latent", "pil", "pt", "jpeg"]))
def test_any_call_gives_images_or_input_error(pipe, prompt, negative_prompt, height, width, steps, guidance,
                                              true_cfg, seed, per_prompt, strength, with_image, with_mask, sigmas,
                                              output_type):
    image = Image.new("RGB", (40, 24), (200, 10, 10)) if with_image else None
    mask = Image.new("L", (40, 24), 255) if with_mask else None
    try:
        out = pipe(prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, true_cfg_scale=true_cfg, seed=seed, num_images_per_prompt=per_prompt,
                   image=image, strength=strength, mask_image=mask, sigmas=sigmas, output_type=output_type)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    n = (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
    assert len(out) == n
    if output_type == "pil":
        assert all(isinstance(im, Image.Image) and PNG_KEY in im.info for im in out)
    else:
        assert torch.isfinite(out).all()
