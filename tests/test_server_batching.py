"""The server's batching, without HTTP: a batch group's images are bit-identical to each request run alone through
the plain pipeline (noise per seed, batch-invariant kernels), adapters included, and groups form by the rules."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fluxion.pipeline import Pipeline
from fluxion.server.batching import pick_group, preview_steps, render_group
from fluxion.invariance import batch_invariant
from fluxion.server.jobs import Job
from fluxion.server.loras import AdapterCache, resolve_loras
from fluxion.server.specs import JobSpec
from server_fixtures import one_thread  # noqa: F401  (fixture)

PROMPTS = ["a red circle", "a blue square left of a green triangle", "two yellow circles", "a purple triangle",
           "a big orange square"]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def spec(prompt: str, seeds: list[int], model="tiny-schnell", steps=2, **kw) -> JobSpec:
    return JobSpec(model=model, prompt=prompt, seeds=seeds, width=64, height=64, steps=steps, **kw)


@pytest.fixture(scope="module")
def schnell(one_thread):  # noqa: F811
    return Pipeline.from_pretrained("tiny-schnell")


@pytest.fixture(scope="module")
def dev(one_thread):  # noqa: F811
    return Pipeline.from_pretrained("tiny-dev")


def test_plain_batching_is_not_bit_exact_but_the_invariant_mode_is(schnell):
    """Why invariance.batch_invariant exists: on this CPU a plain batch changes some bits of the latents (GEMM
    kernels chosen by row count), the mode makes every sample's latents equal to its run alone."""
    alone = [schnell(p, seed=s, height=64, width=64, num_inference_steps=2, output_type="latent")[0]
             for s, p in enumerate(PROMPTS)]
    plain = schnell(PROMPTS, seed=list(range(5)), height=64, width=64, num_inference_steps=2, output_type="latent")
    with batch_invariant():
        exact = schnell(PROMPTS, seed=list(range(5)), height=64, width=64, num_inference_steps=2,
                        output_type="latent")
    assert all(torch.equal(a, b) for a, b in zip(alone, exact))
    if all(torch.equal(a, b) for a, b in zip(alone, plain)):
        pytest.skip("this machine's kernels are batch-invariant even without the mode")


def test_group_images_equal_each_request_alone(schnell):
    specs = [spec(PROMPTS[0], [11]), spec(PROMPTS[1], [5, 6, 7]), spec(PROMPTS[2], [0]), spec(PROMPTS[3], [42])]
    groups = render_group(schnell, specs)
    for s, images in zip(specs, groups):
        assert len(images) == s.n
        for seed, image in zip(s.seeds, images):
            alone = schnell(s.prompt, seed=seed, height=64, width=64, num_inference_steps=2)[0]
            assert np.array_equal(pixels(image), pixels(alone)), (s.prompt, seed)
            assert image.info["fluxion"] == alone.info["fluxion"]  # the same settings record, seed included
    # order inside the group does not matter either
    reordered = render_group(schnell, specs[::-1])[::-1]
    assert all(np.array_equal(pixels(a), pixels(b)) for g, h in zip(groups, reordered) for a, b in zip(g, h))


def test_interleaved_adapters_do_not_leak(dev, tmp_path):
    """Groups with and without the star adapter, in turns, on one pipeline: each image equals a sequential run on a
    fresh pipeline with exactly that adapter set."""
    star = resolve_loras([{"name": "star", "scale": 0.8}], tmp_path)
    cache = AdapterCache(capacity=4)
    kw = dict(model="tiny-dev", steps=2, guidance=3.5)
    plan = [([], [spec(PROMPTS[0], [1], **kw), spec(PROMPTS[1], [2], **kw)]),
            (star, [spec(PROMPTS[0], [1], loras=star, **kw), spec(PROMPTS[2], [3], loras=star, **kw)]),
            ([], [spec(PROMPTS[3], [4], **kw)]),
            (star, [spec(PROMPTS[4], [5], loras=star, **kw)])]
    got = []
    for loras, specs in plan:
        cache.activate(dev, loras)
        got.append(render_group(dev, specs))
    reference = Pipeline.from_pretrained("tiny-dev")
    plain = {(p, s): reference(p, seed=s, height=64, width=64, num_inference_steps=2)[0]
             for _, specs in plan for sp in specs if not sp.loras for p, s in [(sp.prompt, sp.seeds[0])]}
    reference.load_lora("star", scale=0.8)
    starred = {(p, s): reference(p, seed=s, height=64, width=64, num_inference_steps=2)[0]
               for _, specs in plan for sp in specs if sp.loras for p, s in [(sp.prompt, sp.seeds[0])]}
    for (loras, specs), images in zip(plan, got):
        for sp, (image,) in zip(specs, images):
            want = (starred if loras else plain)[(sp.prompt, sp.seeds[0])]
            assert np.array_equal(pixels(image), pixels(want)), (sp.prompt, bool(loras))
            assert (image.info["fluxion"] == want.info["fluxion"])
    # the adapter changed the image (else the test would prove nothing)
    assert not np.array_equal(pixels(got[0][0][0]), pixels(got[1][0][0]))


def test_quantized_groups_stay_bit_exact(one_thread, tmp_path, monkeypatch):  # noqa: F811
    """--quantize int8: fluxion.quant's int8 GEMM quantizes activations per sample, the adaLN path goes through
    the invariant mode, so batching is still exact; the images record the scheme."""
    from fluxion.server.models import load_pipeline

    monkeypatch.setenv("FLUXION_HOME", str(tmp_path))  # where the quantized weights are kept
    pipe = load_pipeline("tiny-schnell", quantize="int8")
    assert pipe.quantization == "int8"
    specs = [spec(p, [i]) for i, p in enumerate(PROMPTS[:3])]
    for s, (image,) in zip(specs, render_group(pipe, specs)):
        alone = pipe(s.prompt, seed=s.seeds[0], height=64, width=64, num_inference_steps=2)[0]
        assert np.array_equal(pixels(image), pixels(alone))


def _job(key: str, n: int = 1) -> Job:
    return Job(id=Job.new_id(), api="bfl", model="m", spec={}, batch_key=key, num_images=n)


def test_pick_group_takes_the_oldest_and_its_compatible_followers():
    a1, b1, a2, a3, a4 = _job("a"), _job("b"), _job("a", 2), _job("a", 3), _job("a")
    assert pick_group([a1, b1, a2, a3, a4], max_batch=4) == [a1, a2, a4]  # a3 would pass 4 images
    assert pick_group([b1, a1, a2], max_batch=4) == [b1]
    assert pick_group([_job("a", 9)], max_batch=4)[0].num_images == 9  # a large job runs alone
    assert pick_group([a1, a2, a4], max_batch=16, max_jobs=1) == [a1]


def test_preview_steps():
    assert preview_steps(4, 2) == {1, 2}
    assert preview_steps(4, 3) == {0, 1, 2}
    assert preview_steps(4, 1) == {1}
    assert preview_steps(1, 3) == set()
    assert preview_steps(4, 2, first=1) == {1, 2}
