"""The models shipped in the package: present, small, BFL layout, bf16, and drawing what they are asked for."""

import json
from pathlib import Path

import pytest

from fluxion import Pipeline, load_transformer
from fluxion.checkpoints.io import read_checkpoint_info
from fluxion.eval import evaluate
from fluxion.eval.score import load_spec
from fluxion.registry import BUILTIN_MODELS, DEFAULT_MODEL

SHIPPED = {"tiny-pro": "pro", "tiny-dev": "dev", "tiny-schnell": "schnell"}
MAX_BYTES = 25_000_000  # the budget per model (transformer + its VAE)
SPEC = load_spec(Path(__file__).parents[1] / "evals" / "shapes.jsonl")
EVERY = 8  # a slice of the standard spec: every 8th entry (16 prompts, all tags), its first 2 eval seeds


@pytest.mark.parametrize("name,variant", SHIPPED.items())
def test_shipped_model_folder(name, variant):
    folder = BUILTIN_MODELS / name
    manifest = json.loads((folder / "fluxion.json").read_text())
    assert manifest["variant"] == variant and manifest["text_encoder"] == "minilm"
    files = sorted(folder.glob("*.safetensors"))
    assert {f.name for f in files} == {"transformer.safetensors", "ae.safetensors"}
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    for f in files:
        assert set(read_checkpoint_info(f).dtype_counts()) == {"BF16"}, f
    model = load_transformer(folder / "transformer.safetensors")  # BFL keys, size and variant from the shapes
    assert model.params.guidance_embed == (variant == "dev")
    assert model.params.context_in_dim == model.params.vec_in_dim == 384  # MiniLM states and pooled vector


def test_default_model_is_shipped():
    assert DEFAULT_MODEL in SHIPPED and (BUILTIN_MODELS / DEFAULT_MODEL).is_dir()


# Floors well under each model's score on this slice (tiny-pro 0.83, tiny-dev 0.75, tiny-schnell 0.79, from the
# README's full-eval results.json; 32 images make a noisy slice): they catch a broken model or pipeline (an
# untrained model scores ~0), not a small regression.
@pytest.mark.parametrize("name,steps,floor", [("tiny-pro", 20, 0.35), ("tiny-dev", 20, 0.3), ("tiny-schnell", 4, 0.25)])
def test_shipped_model_draws_the_prompt(name, steps, floor):
    pipe = Pipeline.from_pretrained(name, device="cpu", dtype="fp32")
    indices = range(0, len(SPEC), EVERY)
    # the seeds of `fluxion eval` (entry i, image j -> 4 i + j), so these images are among the README's
    images = [pipe([SPEC[i]["prompt"]] * 2, num_inference_steps=steps, seed=[4 * i, 4 * i + 1]) for i in indices]
    results = evaluate([SPEC[i] for i in indices], images)
    assert results["overall"] >= floor, (name, results["per_tag"])
