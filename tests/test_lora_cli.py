"""LoRA from the command line and in the image record: --lora on generate and eval, the built-in star adapter,
`fluxion lora info/convert`, and --from-image reapplying the adapters an image was made with."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fluxion import cli
from fluxion.checkpoints import load_transformer
from fluxion.errors import InputError
from fluxion.files import sha256_file
from fluxion.lora import load_lora, unload_loras
from fluxion.metadata import GenerationSettings, read_settings, save_png
from fluxion.registry import BUILTIN_LORAS, BUILTIN_MODELS, find_lora

STAR = BUILTIN_LORAS / "star.safetensors"
FAST = ["--model", "tiny-dev", "--steps", "2", "--seed", "3"]


def generate(tmp_path, name: str, *args) -> tuple[Image.Image, GenerationSettings]:
    out = tmp_path / f"{name}.png"
    assert cli.main(["generate", "two yellow stars", *FAST, "--out", str(out), *args]) == 0
    return Image.open(out), read_settings(out)


def test_lora_flag_applies_the_built_in_star_and_the_image_records_it(tmp_path):
    plain, plain_record = generate(tmp_path, "plain")
    star, record = generate(tmp_path, "star", "--lora", "star")
    half, half_record = generate(tmp_path, "half", "--lora", f"{STAR}:0.5")
    assert plain_record.loras is None
    assert record.loras == [{"name": "star", "file": "star.safetensors", "sha256": sha256_file(STAR), "scale": 1.0}]
    assert half_record.loras[0]["scale"] == 0.5
    pixels = [torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in (plain, half, star)]
    assert (pixels[0] - pixels[2]).abs().mean() > (pixels[0] - pixels[1]).abs().mean() > 0


def test_from_image_reapplies_the_recorded_adapters_or_names_the_missing_one(tmp_path, monkeypatch, capsys):
    star, _ = generate(tmp_path, "star", "--lora", "star:0.8")
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-image", str(tmp_path / "star.png"), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(star))
    assert read_settings(again).loras[0]["scale"] == 0.8

    record = read_settings(tmp_path / "star.png")
    record.loras[0]["sha256"] = "0" * 64  # the file it was made with is gone (a retrained star has other bytes)
    save_png(star, tmp_path / "edited.png", record)
    capsys.readouterr()
    code = cli.main(["generate", "--from-image", str(tmp_path / "edited.png"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "made with LoRA 'star' (scale 0.8), which is missing" in err and "--lora" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("raw, parsed", [("star", ("star", 1.0)), ("star:0.7", ("star", 0.7)),
                                         ("a:b/c.safetensors:-1", ("a:b/c.safetensors", -1.0)),
                                         ("dir:with/colon.safetensors", ("dir:with/colon.safetensors", 1.0))])
def test_lora_flag_syntax(raw, parsed):
    assert cli.parse_lora(raw) == parsed


def test_bad_lora_flags_fail_before_the_model_loads(tmp_path, capsys):
    for args, words in ((["--lora", "no-such-adapter"], "LoRA 'no-such-adapter' not found"),
                        (["--lora", "star:50"], "expected a number in [-10, 10], got 50")):
        assert cli.main(["generate", "a star", *FAST, "--out", str(tmp_path / "x.png"), *args]) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(InputError):
        cli.parse_lora(":0.5")
    assert not list(tmp_path.iterdir())


def test_lora_info_and_convert(tmp_path, capsys):
    assert cli.main(["lora", "info", "star", "--model", "tiny-dev"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "peft" and info["modules"] > 0 and info["mapping"]
    base = load_transformer(BUILTIN_MODELS / "tiny-dev" / "transformer.safetensors", dtype=torch.float32)
    inputs = dict(img=torch.randn(1, 16, 64), img_ids=torch.zeros(1, 16, 3), txt=torch.randn(1, 24, 384),
                  txt_ids=torch.zeros(1, 24, 3), timesteps=torch.tensor([0.7]), y=torch.randn(1, 384),
                  guidance=torch.tensor([3.5]))
    outputs = []
    for layout in ("peft", "kohya", "comfy"):
        out = tmp_path / f"star-{layout}.safetensors"
        assert cli.main(["lora", "convert", "star", str(out), "--to", layout]) == 0  # base model from the header
        with torch.no_grad():
            load_lora(base, out, name="star")
            outputs.append(base(**inputs))
            unload_loras(base)
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], atol=1e-5, rtol=1e-5)


def test_eval_takes_the_lora_flag(tmp_path, capsys):
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"tag": "single_object", "include": [{"class": "star", "count": 1}],
                                "prompt": "a star"}) + "\n")
    assert cli.main(["eval", "--model", "tiny-dev", "--spec", str(spec), "--images-per-prompt", "1", "--steps", "2",
                     "--lora", "star", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["images"] == 1


def test_find_lora_prefers_paths_then_home_then_built_in(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXION_HOME", str(tmp_path))
    assert find_lora("star") == STAR
    (tmp_path / "loras").mkdir()
    mine = tmp_path / "loras" / "star.safetensors"
    mine.write_bytes(STAR.read_bytes())
    assert find_lora("star") == mine
    assert find_lora("star", sha256=sha256_file(STAR)) == mine  # same bytes
