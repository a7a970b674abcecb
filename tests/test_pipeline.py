"""Pipeline behaviour: seeds, batching, guidance modes, img2img, inpainting, metadata, input errors."""

import pytest
import torch
from PIL import Image

from fluxion.errors import InputError
from fluxion.metadata import PNG_KEY, GenerationSettings, read_settings, save_png
from pipeline_fixtures import make_pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline("dev")


def test_returns_images_of_the_asked_size(pipe):
    images = pipe("a red circle", height=48, width=80, seed=0)
    assert len(images) == 1 and images[0].size == (80, 48)


def test_same_seed_same_image_in_any_batch_position(pipe):
    alone = pipe("a red circle", seed=5, output_type="latent")
    batch = pipe(["a blue square", "a red circle"], seed=[1, 5], output_type="latent")
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-5)
    again = pipe("a red circle", seed=5, output_type="latent")
    assert torch.equal(alone, again)


def test_num_images_per_prompt_and_seeds(pipe):
    images = pipe(["a", "b"], seed=10, num_images_per_prompt=2)
    seeds = [GenerationSettings.from_json(im.info[PNG_KEY]).seed for im in images]
    prompts = [GenerationSettings.from_json(im.info[PNG_KEY]).prompt for im in images]
    assert seeds == [10, 11, 12, 13] and prompts == ["a", "a", "b", "b"]


def test_guidance_changes_dev_output(pipe):
    a = pipe("x", seed=0, guidance_scale=1.0, output_type="latent")
    b = pipe("x", seed=0, guidance_scale=5.0, output_type="latent")
    assert not torch.allclose(a, b)


def test_true_cfg_uses_negative_prompt():
    pipe = make_pipeline("pro")
    plain = pipe("x", seed=0, true_cfg_scale=1.0, output_type="latent")
    cfg = pipe("x", seed=0, true_cfg_scale=4.0, output_type="latent")
    neg = pipe("x", negative_prompt="y", seed=0, true_cfg_scale=4.0, output_type="latent")
    assert not torch.allclose(plain, cfg) and not torch.allclose(cfg, neg)
    # scale 1 with a negative prompt is exactly the conditional prediction
    same = pipe("x", negative_prompt="y", seed=0, true_cfg_scale=1.0, output_type="latent")
    assert torch.equal(plain, same)


def test_custom_sigmas_override_steps(pipe):
    seen = []
    pipe("x", seed=0, sigmas=[1.0, 0.6, 0.2], callback=lambda i, n, t, lat: seen.append((i, n, round(t, 6))))
    assert seen == [(0, 3, 0.6), (1, 3, 0.2), (2, 3, 0.0)]


def test_img2img_strength_runs_fewer_steps_and_stays_close(pipe):
    source = Image.new("RGB", (64, 64), (255, 0, 0))
    seen = []
    pipe("x", image=source, strength=0.5, num_inference_steps=4, seed=0, callback=lambda *a: seen.append(a[0]))
    assert seen == [0, 1]
    with pytest.raises(InputError, match="strength"):
        pipe("x", image=source, strength=0.0)
    with pytest.raises(InputError, match=r"strength \(--strength\): 0.5 needs image"):
        pipe("x", strength=0.5)


def test_inpainting_keeps_unmasked_latents(pipe):
    source = Image.new("RGB", (64, 64), (0, 0, 255))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # regenerate the left half
    out = pipe("x", image=source, mask_image=mask, seed=0, output_type="latent")
    src_latent = pipe.encode_image(source, 64, 64)
    right = (slice(None), slice(None), slice(None), slice(4, 8))
    torch.testing.assert_close(out[right], src_latent[right].float(), atol=1e-5, rtol=0)
    assert not torch.allclose(out[..., :4], src_latent[..., :4].float(), atol=1e-3)
    with pytest.raises(InputError, match=r"mask_image \(--mask\): inpainting needs image"):
        pipe("x", mask_image=mask)


@pytest.mark.parametrize("h,w,words", [(50, 64, "multiple of 16"), (64, 0, "from 1"), (64, 72, "multiple of 16")])
def test_sizes_not_multiple_of_16_are_refused(pipe, h, w, words):
    with pytest.raises(InputError, match=words):
        pipe("x", height=h, width=w)


def test_other_bad_inputs(pipe):
    with pytest.raises(InputError, match="prompt"):
        pipe([])
    with pytest.raises(InputError, match="seed"):
        pipe(["a", "b"], seed=[1])
    with pytest.raises(InputError, match="num_images_per_prompt"):
        pipe("a", num_images_per_prompt=0)
    with pytest.raises(InputError, match=r"latents: expected shape \(1, 16, 8, 8\)"):
        pipe("a", latents=torch.zeros(1, 16, 4, 4))


def test_metadata_round_trip(pipe, tmp_path):
    image = pipe("a red circle", negative_prompt=None, seed=3)[0]
    settings = GenerationSettings.from_json(image.info[PNG_KEY])
    path = save_png(image, tmp_path / "a.png", settings)
    back = read_settings(path)
    assert back == settings
    assert (back.prompt, back.seed, back.height, back.model, back.variant) == ("a red circle", 3, 64, "debug-dev", "dev")
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_metadata_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="carries no fluxion settings"):
        read_settings(tmp_path / "plain.png")
    with pytest.raises(InputError, match="no such file"):
        read_settings(tmp_path / "missing.png")
