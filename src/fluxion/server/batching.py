"""Batch groups: which pending jobs share forward passes (`pick_group`) and one pipeline call for a group
(`render_group`), with every image bit-identical to the one its request makes alone (invariance.batch_invariant).

This module knows nothing of HTTP or SQLite: a Ray Serve deployment can call `render_group` on its own batches."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .. import sampling
from ..pipeline import tensor_to_images
from ..settings import GenerationRequest
from ..invariance import batch_invariant
from .specs import JobSpec

# fbcache and teacache skip steps by a change measured over the whole batch, so a companion would change a request's
# images; taylorseer skips on a fixed schedule and batches freely
BATCH_INVARIANT_CACHES = ("taylorseer",)


class GroupCancelled(Exception):
    """Every job of a group was cancelled: the pipeline call stops at the next step."""


def pick_group(pending: Sequence, max_batch: int, max_jobs: int | None = None) -> list:
    """The oldest pending job and, after it in order, the jobs with its batch key, while the images fit in
    `max_batch` (a job larger than max_batch runs alone; the pipeline splits it to fit memory)."""
    first = pending[0]
    group, images = [first], first.num_images
    for job in pending[1:]:
        if max_jobs is not None and len(group) >= max_jobs:
            break
        if job.batch_key == first.batch_key and images + job.num_images <= max_batch:
            group.append(job)
            images += job.num_images
    return group


def group_request(specs: Sequence[JobSpec], images: dict | None = None, cache=None) -> GenerationRequest:
    """One request for the whole group: each image's own prompt, negative prompt and seed, in job order."""
    first = specs[0]
    images = images or {}
    return GenerationRequest(
        prompt=[s.prompt for s in specs for _ in s.seeds],
        negative_prompt=[s.negative_prompt for s in specs for _ in s.seeds],
        seed=[seed for s in specs for seed in s.seeds], num_images_per_prompt=1, height=first.height,
        width=first.width, num_inference_steps=first.steps, guidance_scale=first.guidance,
        true_cfg_scale=first.true_cfg, image=images.get("image"), mask_image=images.get("mask_image"),
        strength=first.strength, cache=cache)


@dataclass
class StepInfo:
    """What a step callback learns: the step (0-based) of `total`, the group's images `start:start+count` now in
    flight (a chunk, when the pipeline splits a group to fit memory) and a way to preview them."""

    step: int
    total: int
    start: int
    count: int
    preview: Callable[[list[int]], list[Image.Image]]  # image indices (in the group) -> previews


def preview_steps(steps: int, partial_images: int, first: int = 0) -> set[int]:
    """Which steps (0-based) send a preview: `partial_images` of them spread over first..steps-2 (the last step's
    image is the final one)."""
    candidates = list(range(first, steps - 1))
    if partial_images >= len(candidates):
        return set(candidates)
    return {candidates[(k + 1) * len(candidates) // (partial_images + 1)] for k in range(partial_images)}


class _Previewer:
    """Step previews: the clean image the model currently predicts, x0 = x_t - t v, with v from the last two
    points of the trajectory (the start, for text-to-image, is the seed's noise at t = 1)."""

    def __init__(self, pipe, specs: Sequence[JobSpec]):
        self.pipe = pipe
        first = specs[0]
        self.seeds = [seed for s in specs for seed in s.seeds]
        self.height, self.width = first.height, first.width
        self.text_to_image = first.kind == "generate"
        self.last: tuple[float, torch.Tensor] | None = None
        self.chunk_start = -1

    def step(self, start: int, count: int, t: float, img: torch.Tensor):
        """Record this step; returns the point before it: (t, latents), or (start, count) at a chunk's first step
        (its noise is drawn only if a preview is asked for)."""
        if start != self.chunk_start:  # a new chunk starts from its own noise
            self.chunk_start = start
            self.last = (start, count) if self.text_to_image else None
        previous, self.last = self.last, (t, img)
        return previous

    def images(self, previous, t: float, img: torch.Tensor, rows: list[int]) -> list[Image.Image]:
        if previous is None or not rows:
            return []
        if isinstance(previous[1], int):  # the chunk's start: the seeds' noise at t = 1
            start, count = previous
            noise = sampling.get_noise(self.seeds[start:start + count], self.height, self.width,
                                       downsample=self.pipe.autoencoder.downsample_factor, device=img.device,
                                       dtype=img.dtype)
            previous = (1.0, sampling.pack(noise))
        t_before, img_before = previous
        x, x_before = img[rows].float(), img_before[rows].float()
        velocity = (x - x_before) / (t - t_before)
        clean = x - t * velocity
        factor = self.pipe.autoencoder.downsample_factor
        latents = sampling.unpack(clean, self.height // factor, self.width // factor)
        with torch.inference_mode():
            return tensor_to_images(self.pipe.decode(latents))


def render_group(pipe, specs: Sequence[JobSpec], *, images: dict | None = None, cache=None,
                 on_step: Callable[[StepInfo], None] | None = None) -> list[list[Image.Image]]:
    """Generate a compatible group (same batch key) in one pipeline call; returns each spec's images, each
    carrying its settings in `.info["fluxion"]`. The adapters must already be active (loras.AdapterCache).
    on_step may raise GroupCancelled to stop between steps."""
    request = group_request(specs, images, cache)
    previewer = _Previewer(pipe, specs) if on_step is not None else None
    done: list[Image.Image] = []

    def callback(step: int, total: int, t: float, img: torch.Tensor) -> None:
        start, count = len(done), img.shape[0]
        previous = previewer.step(start, count, t, img)

        def preview(indices: list[int]) -> list[Image.Image]:
            return previewer.images(previous, t, img, [i - start for i in indices if start <= i < start + count])

        on_step(StepInfo(step=step, total=total, start=start, count=count, preview=preview))

    with batch_invariant(pipe.device):
        for chunk in pipe.generate_batches(request, callback=callback if on_step is not None else None):
            done.extend(chunk)
    out, start = [], 0
    for spec in specs:
        out.append(done[start:start + spec.n])
        start += spec.n
    return out
