"""Sampling pieces: schedule vs diffusers' scheduler, packing vs diffusers, position ids, seeded noise."""

import numpy as np
import pytest
import torch

from fluxion import sampling
from fluxion.model import TRANSFORMER_PRESETS, Flux
from pipeline_fixtures import random_weights


@pytest.mark.parametrize("steps,seq_len", [(1, 16), (4, 256), (20, 1024), (28, 4096), (50, 6000)])
def test_schedule_matches_diffusers_dynamic_shift(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sampling.get_schedule(steps, seq_len, shift=True)
    assert len(ours) == steps + 1
    np.testing.assert_allclose(ours, scheduler.sigmas.double().numpy(), atol=1e-6)


@pytest.mark.parametrize("seq_len", [16, 36, 64])
def test_a_models_own_token_range_matches_diffusers_scheduler_config(seq_len):
    """A model trained at 64-128 px spans 16-64 tokens: diffusers' base/max_image_seq_len, same formula."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schedule = sampling.ShiftSchedule(base_seq_len=16, max_seq_len=64)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=64)
    mu = calculate_shift(seq_len, 16, 64, 0.5, 1.15)
    assert sampling.schedule_mu(seq_len, schedule) == pytest.approx(mu)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    np.testing.assert_allclose(sampling.get_schedule(4, seq_len, schedule=schedule),
                               scheduler.sigmas.double().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="base_seq_len < max_seq_len"):
        sampling.ShiftSchedule(base_seq_len=64, max_seq_len=16)


def test_schnell_schedule_is_unshifted_linspace():
    assert sampling.get_schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_shift_formula_endpoints():
    assert sampling.schedule_mu(256) == pytest.approx(0.5)
    assert sampling.schedule_mu(4096) == pytest.approx(1.15)
    t = sampling.get_schedule(2, 4096)
    mu = 1.15
    assert t[1] == pytest.approx(np.exp(mu) / (np.exp(mu) + (1 / 0.5 - 1)))


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling.get_schedule(0, 256)


def test_pack_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12)
    packed = sampling.pack(x)
    theirs = FluxPipeline._pack_latents(x, 2, 16, 8, 12)
    assert torch.equal(packed, theirs)
    assert torch.equal(sampling.unpack(packed, 8, 12), x)


def test_image_ids_match_diffusers():
    from diffusers import FluxPipeline

    ours = sampling.image_ids(3, 8, 12)
    theirs = FluxPipeline._prepare_latent_image_ids(3, 4, 6, "cpu", torch.float32)
    assert ours.shape == (3, 24, 3)
    assert torch.equal(ours[1], theirs)


def test_text_ids_number_the_tokens_on_axis_0_only_when_asked():
    assert torch.equal(sampling.text_ids(2, 5), torch.zeros(2, 5, 3))  # FLUX: every text token at 0
    numbered = sampling.text_ids(2, 5, numbered=True)
    assert torch.equal(numbered[..., 0], torch.arange(5.0).expand(2, 5))
    assert not numbered[..., 1:].any()  # image tokens keep axis 0 at 0: rows and columns stay theirs


def test_the_transformer_sees_word_order_only_through_numbered_text_ids():
    """With all text tokens at one position, attention reads the text as a set: reversing the tokens changes
    nothing. Numbered, the same weights give another velocity."""
    model = random_weights(Flux(TRANSFORMER_PRESETS["debug"]), seed=5).eval()
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 6, 32, generator=g)
    vec, t, guidance = torch.randn(1, 32, generator=g), torch.tensor([0.7]), torch.tensor([3.5])
    reversed_txt = txt.flip(1)

    def velocity(text, numbered):
        return model(img, sampling.image_ids(1, 8, 8), text, sampling.text_ids(1, 6, numbered=numbered), t, vec,
                     guidance=guidance)

    with torch.no_grad():
        torch.testing.assert_close(velocity(reversed_txt, False), velocity(txt, False), rtol=1e-5, atol=1e-6)
        assert (velocity(reversed_txt, True) - velocity(txt, True)).abs().max() > 1e-3


def test_noise_is_per_seed_and_batch_independent():
    a = sampling.get_noise([7, 8, 9], 64, 48)
    b = sampling.get_noise([9], 64, 48)
    assert a.shape == (3, 16, 8, 6)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
