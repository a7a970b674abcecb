"""Whole text-to-image runs against diffusers' FluxPipeline: tiny random T5/CLIP/transformer/VAE, same latents."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fluxion import sampling
from fluxion.pipeline import Pipeline
from pipeline_fixtures import save_diffusers_flux
from text_fixtures import tiny_text_encoders  # noqa: F401  (session fixture)

HEIGHT, WIDTH = 64, 96


@pytest.mark.parametrize("case", ["dev", "schnell", "pro-true-cfg"])
def test_text_to_image_matches_flux_pipeline(tmp_path, tiny_text_encoders, case):  # noqa: F811
    guidance_embed = case == "dev"
    theirs = save_diffusers_flux(tmp_path, tiny_text_encoders, guidance_embed, dynamic_shift=case != "schnell")
    ours = Pipeline.from_pretrained(str(tmp_path), device="cpu", dtype="fp32")
    assert ours.variant == case.split("-")[0]

    prompts = ["a small red circle left of a blue square", "two yellow triangles"]
    noise = sampling.get_noise([3, 4], HEIGHT, WIDTH)
    steps = 4
    kwargs = dict(guidance_scale=3.5) if guidance_embed else {}
    # the reference gives schnell 256 T5 tokens (diffusers defaults to 512 for every variant)
    kwargs["max_sequence_length"] = 256 if case == "schnell" else 512
    cfg = dict(negative_prompt=["a green square", "blurry"], true_cfg_scale=3.0) if case == "pro-true-cfg" else {}

    with torch.no_grad():
        ref = theirs(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                     latents=sampling.pack(noise), output_type="latent", **kwargs, **cfg).images
        ref_pixels = theirs(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                            latents=sampling.pack(noise), output_type="pt", **kwargs, **cfg).images
    kwargs.pop("max_sequence_length")
    got = ours(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=steps, latents=noise,
               output_type="latent", allow_any_size=True, **kwargs, **cfg)
    got_pixels = ours(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=steps, latents=noise,
                      output_type="pt", allow_any_size=True, **kwargs, **cfg)

    ref_latents = sampling.unpack(ref, HEIGHT // 8, WIDTH // 8)
    assert got.abs().max() > 0.1  # a real run, not zeros
    assert (got - ref_latents).abs().max() <= 1e-4
    # diffusers post-processes decoded pixels from [-1, 1] to [0, 1]
    assert ((got_pixels.clamp(-1, 1) + 1) / 2 - ref_pixels).abs().max() <= 1e-4
