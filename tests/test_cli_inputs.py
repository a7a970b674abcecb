"""The CLI as a user (or a script) drives it with bad input: one line, the flag named, exit 2 for bad usage and 1
for other failures, nothing half-written; output folders; `fluxion models` and `--version`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image

from fluxion import __version__, cli
from fluxion.metadata import PNG_KEY, read_settings
from fluxion.pipeline import Pipeline
from pipeline_fixtures import make_pipeline


def fluxion(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fluxion.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def one_line_error(r, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], ["num_inference_steps (--steps): expected an integer from 1 to 1000, got 0"]),
    (["--steps", "-2"], ["--steps", "got -2"]),
    (["--num-images", "0"], ["num_images_per_prompt (--num-images)", "got 0"]),
    (["--strength", "0"], ["strength (--strength): expected a number in (0, 1]"]),
    (["--guidance", "nan"], ["guidance_scale (--guidance)", "got nan"]),
    (["--true-cfg", "-1"], ["true_cfg_scale (--true-cfg)"]),
    (["--sigmas", "0.2", "0.5", "1.0"], ["sigmas (--sigmas): expected strictly descending"]),
    (["--sigmas", "1.5", "0.5"], ["sigmas[0] (--sigmas): expected a number in (0, 1], got 1.5"]),
    (["--seed", "-1"], ["seed (--seed): expected an integer from 0"]),
    (["--width", "0"], ["width (--width)"]),
    (["--width", "16384", "--height", "16384"], ["tiny-schnell supports 64 to 128 px a side", "--allow-any-size"]),
    (["--width", "50"], ["width (--width): expected a positive multiple of 16", "try 48 or 64"]),
    (["--max-memory", "lots"], ["max_memory (--max-memory)"]),
    (["--device", "cuda"], ["device (--device): 'cuda' is not available on this machine"]),
    (["--device", "gpu9"], ["device (--device): expected one of"]),
    (["--steps", "abc"], ["argument --steps: invalid int value: 'abc'"]),
    (["--out", "picture.jpg"], ["--out: expected a .png file or a folder"]),
    (["--model", "no-such-model"], ["model 'no-such-model' not found; looked in"]),
    (["--seed", "1", "2", "--num-images", "3"], ["--num-images", "conflicts with the 2 seeds"]),
])
def test_bad_generate_options_give_one_line_and_exit_2(tmp_path, args, words):
    out = [] if "--out" in args else ["--out", tmp_path / "x.png"]
    one_line_error(fluxion("generate", "a red circle", *args, *out), 2, *words)
    assert not list(tmp_path.iterdir())  # nothing written


def test_debug_shows_the_traceback():
    r = fluxion("--debug", "generate", "x", "--steps", "0")
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputError" in r.stderr


def test_init_image_that_is_not_an_image(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    r = fluxion("generate", "x", "--init-image", notes, "--out", tmp_path / "o.png")
    one_line_error(r, 2, "image (--init-image):", "notes.txt is not an image PIL can read")


def test_edited_settings_in_a_png(tmp_path):
    out = tmp_path / "a.png"
    assert fluxion("generate", "a red circle", "--model", "tiny-schnell", "--seed", 2, "--out", out).returncode == 0
    record = json.loads(Image.open(out).info[PNG_KEY])
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps({**record, "num_inference_steps": "abc"}))
    Image.open(out).save(tmp_path / "edited.png", pnginfo=info)
    r = fluxion("generate", "--from-image", tmp_path / "edited.png", "--out", tmp_path / "b.png")
    one_line_error(r, 2, "edited.png", "num_inference_steps (--steps): expected an integer from 1 to 1000, got 'abc'")


def test_broken_manifest_names_its_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "fluxion.json").write_text("{ not json")
    r = fluxion("generate", "x", "--model", folder, "--out", tmp_path / "o.png")
    one_line_error(r, 1, f"{folder / 'fluxion.json'} is not valid JSON")
    (folder / "fluxion.json").write_text(json.dumps({"transformer": "t.safetensors"}))
    one_line_error(fluxion("generate", "x", "--model", folder), 1, "fluxion.json: the key 'autoencoder' is missing")
    (folder / "fluxion.json").write_text(json.dumps({"transformer": "t", "autoencoder": "a", "sizes": [1]}))
    one_line_error(fluxion("generate", "x", "--model", folder), 1, "fluxion.json: 'sizes' must be an object")


def test_out_folder_never_overwrites(tmp_path):
    folder = tmp_path / "outputs"
    for _ in range(2):
        r = fluxion("generate", "A red circle, left!", "--seed", 4, 5, "--out", f"{folder}/")
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["a-red-circle-left-4-1.png", "a-red-circle-left-4.png",
                                                        "a-red-circle-left-5-1.png", "a-red-circle-left-5.png"]
    assert read_settings(folder / "a-red-circle-left-5-1.png").seed == 5
    # an existing folder without the trailing slash, and a new path without a suffix, are folders too
    assert fluxion("generate", "x", "--seed", 1, "--out", folder).returncode == 0
    assert fluxion("generate", "x", "--seed", 1, "--out", tmp_path / "new").returncode == 0
    assert (folder / "x-1.png").is_file() and (tmp_path / "new" / "x-1.png").is_file()


def test_models_and_version(tmp_path):
    home = tmp_path / "home"
    (home / "broken").mkdir(parents=True)
    r = fluxion("models", "--json", env={"FLUXION_HOME": str(home)})
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert {"tiny-pro", "tiny-dev", "tiny-schnell", "broken"} <= rows.keys()
    assert rows["tiny-dev"]["variant"] == "dev" and rows["tiny-dev"]["source"] == "built-in"
    assert 7e6 < rows["tiny-dev"]["parameters"] < 8e6 and rows["tiny-dev"]["bytes"] > 10e6
    assert rows["broken"]["source"] == "$FLUXION_HOME" and "error" in rows["broken"]
    table = fluxion("models", env={"FLUXION_HOME": str(home)}).stdout
    assert "tiny-schnell" in table and "schnell" in table
    assert fluxion("--version").stdout.strip() == f"fluxion {__version__}"


def _wait_for(path_glob, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout and proc.poll() is None:
        if path_glob():
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_during_generate_leaves_only_whole_images(tmp_path):
    """SIGINT while a batch is being written: the files there are whole PNGs, and no temp file is left."""
    out = tmp_path / "imgs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # batches of one (the memory budget), each saved as it finishes
    proc = subprocess.Popen([sys.executable, "-m", "fluxion.cli", "generate", "a blue square", "--num-images", "40",
                             "--width", "256", "--height", "256", "--allow-any-size", "--seed", "0",
                             "--max-memory", "300MB", "--out", f"{out}/"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a shell's background job starts with SIGINT ignored, which Python would keep
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait_for(lambda: out.is_dir() and any(out.glob("*.png")), proc), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    names = os.listdir(out)
    assert names and all(n.endswith(".png") and not n.startswith(".") for n in names)
    for n in names:
        with Image.open(out / n) as im:
            im.load()  # a whole PNG, readable to the end


def test_interrupted_convert_leaves_no_folder(tmp_path, monkeypatch):
    from fluxion.checkpoints import io, save_state_dict
    from fluxion.model import TRANSFORMER_PRESETS, Flux

    bfl = save_state_dict(Flux(TRANSFORMER_PRESETS["debug"]).state_dict(), tmp_path / "flux1-dev.safetensors")
    real_save = io.save_file

    def interrupted(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise KeyboardInterrupt  # the weights are written, config.json is not

    monkeypatch.setattr(io, "save_file", interrupted)
    assert cli.main(["convert", str(bfl), str(tmp_path / "out"), "--to", "diffusers"]) == cli.INTERRUPTED
    assert sorted(os.listdir(tmp_path)) == ["flux1-dev.safetensors"]


# -- property-based: random command lines either write images (exit 0) or are refused with exit 2 ---------------
@pytest.fixture(scope="module")
def toy_pipe():
    return make_pipeline("dev")


_values = st.one_of(st.integers(-3, 70).map(str), st.sampled_from(["0", "nan", "inf", "-inf", "1e9", "", "abc",
                                                                   "0.5", "1", "16", "32", "48", "4GB", "é"]))
_options = st.lists(st.tuples(st.sampled_from(["--steps", "--guidance", "--true-cfg", "--seed", "--num-images",
                                               "--width", "--height", "--strength", "--sigmas", "--max-memory",
                                               "--negative-prompt", "--init-image", "--mask", "--device"]),
                              st.lists(_values, min_size=1, max_size=2)), max_size=4)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(prompt=st.one_of(st.text(max_size=30), st.just("x" * 10_050)), options=_options,
       out_kind=st.sampled_from(["file", "folder"]))
def test_any_command_line_writes_images_or_exits_2(tmp_path_factory, monkeypatch, toy_pipe, capsys, prompt, options,
                                                   out_kind):
    work = tmp_path_factory.mktemp("cli")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(work / "in.png")
    Image.new("L", (32, 32), 255).save(work / "mask.png")
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, name, device=None, dtype=None, **options: (
        cli_device_check(device), toy_pipe)[1]))
    argv = ["generate", prompt, "--out", str(work / "out" / ("a.png" if out_kind == "file" else ""))]
    for flag, values in options:
        if flag in ("--init-image", "--mask"):
            values = [str(work / ("in.png" if flag == "--init-image" else "mask.png"))]
        argv += [flag, *values] if flag in ("--seed", "--sigmas") else [flag, values[0]]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals (a value that is not a number, a missing value)
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    written = list((work / "out").rglob("*")) if (work / "out").exists() else []
    if code == 0:
        assert written and all(p.suffix == ".png" for p in written if p.is_file())
    else:
        assert not written and len([line for line in err.splitlines() if "error:" in line]) == 1, (argv, err)


def cli_device_check(device):
    from fluxion.devices import resolve_device

    resolve_device(device)


@pytest.mark.parametrize("args, words", [
    (["eval", "--model", "tiny-schnell", "--images-per-prompt", "0"], "images_per_prompt (--images-per-prompt)"),
    (["eval", "--model", "tiny-schnell", "--steps", "0"], "num_inference_steps (--steps)"),
    (["eval", "--model", "tiny-schnell", "--seed", "-1"], "seed (--seed)"),
    (["eval", "--model", "tiny-schnell", "--spec", "no-such.jsonl"], "--spec: no such file no-such.jsonl"),
    (["train", "recipes/tiny-vae.toml", "--max-steps", "0"], "max_steps (--max-steps)"),
    (["train", "no-such.toml"], "no such recipe no-such.toml"),
])
def test_eval_and_train_refuse_bad_numbers_before_loading(args, words):
    one_line_error(fluxion(*args), 2, words)
