"""The `fluxion` command, run as a user runs it: generate, reproduce from metadata, info, convert, errors."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from fluxion.metadata import read_settings
from pipeline_fixtures import save_diffusers_flux
from text_fixtures import tiny_text_encoders  # noqa: F401  (session fixture)


def fluxion(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "fluxion.cli", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"fluxion {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text_encoders):  # noqa: F811
    root = tmp_path_factory.mktemp("flux-dev-tiny")
    save_diffusers_flux(root, tiny_text_encoders, guidance_embed=True, dynamic_shift=True)
    return root


def test_generate_then_reproduce_from_metadata(model_dir, tmp_path):
    out = tmp_path / "a.png"
    r = fluxion("generate", "a red circle", "--model", model_dir, "--steps", 2, "--seed", 7, "--width", 48,
                "--height", 32, "--guidance", 2.5, "--allow-any-size", "--out", out)
    assert "seed=7" in r.stdout
    settings = read_settings(out)
    assert (settings.prompt, settings.seed, settings.width, settings.height) == ("a red circle", 7, 48, 32)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.model) == (2, 2.5, str(model_dir))

    again = tmp_path / "again.png"
    fluxion("generate", "--from-image", out, "--out", again)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert read_settings(again) == settings


def test_several_seeds_and_prompt_file(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\na green triangle\n")
    fluxion("generate", "--prompt-file", prompts, "--model", model_dir, "--steps", 1, "--seed", 1, 2,
            "--width", 32, "--height", 32, "--allow-any-size", "--out", tmp_path / "b.png")
    written = sorted(p.name for p in tmp_path.glob("b-*.png"))
    assert written == ["b-0.png", "b-1.png", "b-2.png", "b-3.png"]
    records = [read_settings(tmp_path / n) for n in written]
    assert [(r.prompt, r.seed) for r in records] == [("a blue square", 1), ("a blue square", 2),
                                                      ("a green triangle", 1), ("a green triangle", 2)]


def test_img2img_records_its_source(model_dir, tmp_path):
    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    out = tmp_path / "i2i.png"
    fluxion("generate", "a red square", "--model", model_dir, "--steps", 4, "--seed", 0, "--init-image", src,
            "--strength", 0.5, "--allow-any-size", "--out", out)
    s = read_settings(out)
    assert (s.init_image, s.strength, s.width) == (str(src), 0.5, 32)


def test_info_and_convert_round_trip(model_dir, tmp_path):
    info = json.loads(fluxion("info", model_dir / "transformer").stdout)
    assert info["component"] == "transformer" and info["layout"] == "diffusers"
    assert info["variant"].startswith("dev") and info["params"]["hidden_size"] == 64
    bfl = tmp_path / "flux1-dev.safetensors"
    fluxion("convert", model_dir / "transformer", bfl, "--to", "bfl")
    info_bfl = json.loads(fluxion("info", bfl).stdout)
    assert info_bfl["layout"] == "bfl" and info_bfl["num_parameters"] == info["num_parameters"]
    assert "double_blocks" in info_bfl["keys"]["by_prefix"]
    back = tmp_path / "transformer"
    fluxion("convert", bfl, back, "--to", "diffusers")
    from safetensors.torch import load_file

    a = load_file(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(back / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--model", "no-such-model"], "model 'no-such-model' not found; looked in"),
    (["generate", "x", "--width", "50"], "width (--width): expected a positive multiple of 16"),
    (["generate"], "give a PROMPT"),
    (["generate", "--from-image", "missing.png"], "no such file"),
    (["info", "missing.safetensors"], "does not exist"),
])
def test_errors_are_specific(model_dir, args, message):
    if "--width" in args:
        args = [*args, "--model", str(model_dir)]
    r = fluxion(*args, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_pickles_are_refused(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04K\x01.")
    r = fluxion("info", bad, check=False)
    assert r.returncode == 1 and "pickle" in r.stderr  # a file that cannot be used: a failure, not bad usage


@pytest.fixture(scope="module")
def minilm_model_dir(tmp_path_factory):
    """A random in-house-style model: manifest, BFL files, MiniLM text (384-d)."""

    from fluxion.checkpoints import params_metadata, save_state_dict
    from fluxion.model import AUTOENCODER_PRESETS, AutoEncoder, Flux, FluxParams
    from pipeline_fixtures import random_weights

    root = tmp_path_factory.mktemp("tiny-random")
    params = FluxParams(vec_in_dim=384, context_in_dim=384, hidden_size=64, num_heads=2, depth=1,
                        depth_single_blocks=1, axes_dim=[4, 14, 14], guidance_embed=False)
    save_state_dict(random_weights(Flux(params), seed=3).state_dict(), root / "transformer.safetensors",
                    metadata=params_metadata(params))
    save_state_dict(random_weights(AutoEncoder(AUTOENCODER_PRESETS["debug"]), seed=4).state_dict(),
                    root / "ae.safetensors")
    (root / "fluxion.json").write_text(json.dumps({
        "name": "tiny-random", "variant": "schnell", "transformer": "transformer.safetensors",
        "autoencoder": "ae.safetensors", "text_encoder": "minilm",
        "defaults": {"num_inference_steps": 2, "size": 64}}))
    return root


def test_eval_writes_results_and_contact_sheets(minilm_model_dir, tmp_path):
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n".join(json.dumps(e) for e in [
        {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
        {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a red square"},
    ]) + "\n")
    out = tmp_path / "eval"
    r = fluxion("eval", "--model", minilm_model_dir, "--spec", spec, "--images-per-prompt", 2, "--steps", 1,
                "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_tag"]) == {"single_object", "colors"} and results["images"] == 4
    assert 0.0 <= results["overall"] <= 1.0 and "overall" in r.stdout
    assert list(out.glob("contact*.png"))
    # the settings the images were made with (the model's defaults filled in), and the time they took
    assert results["settings"]["num_inference_steps"] == 1 and results["settings"]["model"] == "tiny-random"
    assert "prompt" not in results["settings"] and results["seconds_per_image"] > 0
    assert (results["settings"]["width"], results["settings"]["height"]) == (64, 64)  # the model's size

    # --width/--height: every score can be taken at any size, and the report records it
    r = fluxion("eval", "--model", minilm_model_dir, "--spec", spec, "--images-per-prompt", 1, "--steps", 1,
                "--width", 96, "--height", 48, "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert (results["settings"]["width"], results["settings"]["height"]) == (96, 48) and "96x48" in r.stdout
    r = fluxion("eval", "--model", minilm_model_dir, "--spec", spec, "--width", 100, "--out", out, check=False)
    assert r.returncode != 0 and "width" in r.stderr and "100" in r.stderr


def test_random_stand_in_is_labelled_and_deterministic(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    r = fluxion("generate", "a red circle", "--model", "random-tiny", "--seed", 1, "--out", a)
    assert "UNTRAINED" in r.stderr.upper() or "untrained" in r.stderr
    fluxion("generate", "a red circle", "--model", "random-tiny", "--seed", 1, "--out", b)
    assert Image.open(a).size == (64, 64)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
