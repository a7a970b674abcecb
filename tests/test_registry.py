"""Model resolution from local folders: diffusers, BFL files beside T5/CLIP, fluxion manifests; clear errors."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fluxion import sampling
from fluxion.checkpoints import params_metadata, save_state_dict
from fluxion.errors import ModelFolderError, ModelNotFoundError
from fluxion.model import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoder, Flux
from fluxion.pipeline import Pipeline
from fluxion.registry import resolve
from fluxion.settings import ShiftSchedule
from pipeline_fixtures import random_weights, save_diffusers_flux
from text_fixtures import tiny_text_encoders  # noqa: F401  (session fixture)


def make_bfl_folder(root, encoders, name="flux1-dev.safetensors"):
    params = TRANSFORMER_PRESETS["debug"]
    transformer = random_weights(Flux(params), seed=11)
    autoencoder = random_weights(AutoEncoder(AUTOENCODER_PRESETS["debug"]), seed=12, std=0.02)
    root.mkdir(parents=True, exist_ok=True)
    save_state_dict(transformer.state_dict(), root / name, metadata=params_metadata(params))
    save_state_dict(autoencoder.state_dict(), root / "ae.safetensors")
    for model, tokenizer, target in (("text_encoder_2", "tokenizer_2", "t5"), ("text_encoder", "tokenizer", "clip")):
        shutil.copytree(encoders[model], root / target)
        shutil.copytree(encoders[tokenizer], root / target, dirs_exist_ok=True)
    return root


def test_bfl_folder_gives_the_same_images_as_the_diffusers_folder(tmp_path, tiny_text_encoders):  # noqa: F811
    save_diffusers_flux(tmp_path / "diffusers", tiny_text_encoders, guidance_embed=True, dynamic_shift=True)
    make_bfl_folder(tmp_path / "bfl", tiny_text_encoders)
    a = Pipeline.from_pretrained(str(tmp_path / "diffusers"), device="cpu")
    b = Pipeline.from_pretrained(str(tmp_path / "bfl"), device="cpu")
    assert (a.variant, b.variant) == ("dev", "dev")
    noise = sampling.get_noise([0], 32, 32)
    la = a("a red circle", height=32, width=32, num_inference_steps=2, latents=noise, output_type="latent",
           allow_any_size=True)
    lb = b("a red circle", height=32, width=32, num_inference_steps=2, latents=noise, output_type="latent",
           allow_any_size=True)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)


def test_names_resolve_under_fluxion_home(tmp_path, monkeypatch, tiny_text_encoders):  # noqa: F811
    make_bfl_folder(tmp_path / "home" / "my-flux", tiny_text_encoders, name="flux1-schnell.safetensors")
    monkeypatch.setenv("FLUXION_HOME", str(tmp_path / "home"))
    files = resolve("my-flux")
    assert files.layout == "bfl" and files.variant == "schnell" and files.t5 == tmp_path / "home" / "my-flux" / "t5"


def test_manifest_folder(tmp_path):
    (tmp_path / "transformer.safetensors").write_bytes(b"")
    (tmp_path / "ae.safetensors").write_bytes(b"")
    (tmp_path / "fluxion.json").write_text(json.dumps({
        "name": "tiny-x", "variant": "pro", "transformer": "transformer.safetensors",
        "autoencoder": "ae.safetensors", "text_encoder": "minilm", "defaults": {"num_inference_steps": 20}}))
    files = resolve(str(tmp_path))
    assert (files.name, files.variant, files.text_encoder, files.defaults) == (
        "tiny-x", "pro", "minilm", {"num_inference_steps": 20})
    assert files.text_length is None  # manifests before text_length: MiniLM's default of 32 tokens
    manifest = json.loads((tmp_path / "fluxion.json").read_text()) | {"text_length": 24}
    (tmp_path / "fluxion.json").write_text(json.dumps(manifest))
    assert resolve(str(tmp_path)).text_length == 24
    assert not files.text_positions  # manifests before text_positions: FLUX's text ids, all at 0
    (tmp_path / "fluxion.json").write_text(json.dumps(manifest | {"text_positions": True}))
    assert resolve(str(tmp_path)).text_positions
    # the resolution shift's token range: FLUX.1's unless the manifest gives the model's own
    assert files.shift_schedule == ShiftSchedule(256, 4096)
    (tmp_path / "fluxion.json").write_text(json.dumps(manifest | {"schedule": {"base_seq_len": 16,
                                                                                 "max_seq_len": 64}}))
    assert resolve(str(tmp_path)).shift_schedule == ShiftSchedule(16, 64, 0.5, 1.15)
    for bad in ({"base_seq_len": 64, "max_seq_len": 16}, {"base_len": 16}):
        (tmp_path / "fluxion.json").write_text(json.dumps(manifest | {"schedule": bad}))
        with pytest.raises(ModelFolderError, match="'schedule'"):
            resolve(str(tmp_path))


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXION_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=f"looked in: nope, {tmp_path}/nope"):
        resolve("nope")


def test_missing_components_name_the_expected_file(tmp_path, tiny_text_encoders):  # noqa: F811
    root = make_bfl_folder(tmp_path / "m", tiny_text_encoders)
    (root / "ae.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="autoencoder weights: expected .*ae.safetensors"):
        resolve(str(root))
    shutil.rmtree(root / "t5")
    (root / "ae.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="T5 text encoder: expected one of the folders .*text_encoder_2"):
        resolve(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="flux1-<variant>.safetensors"):
        resolve(str(empty))
