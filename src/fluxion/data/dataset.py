"""A seeded, indexable dataset of shapes-world images with captions, and a batch sampler that keeps buckets apart."""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fluxion.data.captions import caption, caption_wordings
from fluxion.data.render import render
from fluxion.data.shapes import (ALL_SHAPES, BUCKETS, HELD_OUT_PAIRS, HELD_OUT_SHAPES, P_RELATION, TRAIN_SHAPES, Scene,
                                 check_layout, sample_scene)
from fluxion.errors import InputError

CAPTION_MODES = ("templates", "varied", "rich")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> (3, H, W) float32 in [-1, 1]."""
    array = np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ShapesDataset:
    """Item i is a function of (seed, i) only: its bucket is `buckets[i % len(buckets)]`, its scene and caption
    come from a generator seeded with (seed, i). Held-out pairs and shapes appear only with `allow_held_out`.
    `layout` places pairs (shapes.LAYOUTS); with "halves", a caption naming a pair without its relation names
    it in reading order. With `teach` (a held-out shape, e.g. the star for a LoRA), the first `teach_images`
    items (default: all) each show that shape, drawn from `shapes`; the items after them are ordinary scenes of
    the other shapes (DreamBooth's prior-preservation images). Held-out colour pairs stay out either way.
    `captions` is "templates" (the spec's wording), "varied" (captions.draw_wording: many phrasings, never the
    held-out ones) or "rich" (more of them, with fillers: captions.RICH_WORDINGS); `captions_per_image` captions
    are drawn per item (`captions(i)`), the first as `scene(i)`'s. `balance_order`: see captions.caption."""

    def __init__(self, seed: int = 0, length: int = 1_000_000, buckets: Sequence[tuple[int, int]] = BUCKETS, *,
                 allow_held_out: bool = False, shapes: tuple[str, ...] = TRAIN_SHAPES,
                 p_relation: float = P_RELATION, layout: str = "spread", teach: str | None = None,
                 teach_images: int | None = None, captions: str = "templates", captions_per_image: int = 1,
                 balance_order: bool = False):
        if length < 1 or not buckets:
            raise InputError(f"ShapesDataset needs length >= 1 and at least one bucket, got length={length}, "
                             f"buckets={buckets}")
        for h, w in buckets:
            if h % 16 or w % 16:
                raise InputError(f"bucket {(h, w)} must have sides divisible by 16 (VAE x8, then 2x2 patches)")
        self.seed, self.length, self.buckets = seed, length, tuple(tuple(b) for b in buckets)
        if not 0.0 <= p_relation <= 1.0:
            raise InputError(f"p_relation must be in [0, 1], got {p_relation}")
        check_layout(layout)
        unknown = sorted(set(shapes) - set(ALL_SHAPES))
        if unknown or not shapes:
            raise InputError(f"shapes must be some of {ALL_SHAPES}, got {tuple(shapes)}")
        if teach is not None and (teach not in HELD_OUT_SHAPES or teach not in shapes):
            raise InputError(f"teach must be a held-out shape ({sorted(HELD_OUT_SHAPES)}) listed in shapes "
                             f"{tuple(shapes)}, got {teach!r}")
        if teach_images is not None and not (teach and 1 <= teach_images <= length):
            raise InputError(f"teach_images={teach_images} needs `teach` and must be in 1..length ({length})")
        if captions not in CAPTION_MODES:
            raise InputError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        if captions_per_image < 1:
            raise InputError(f"captions_per_image must be >= 1, got {captions_per_image}")
        if balance_order and layout != "halves":
            raise InputError("balance_order needs layout='halves' (captions in reading order), got "
                             f"layout={layout!r}")
        self.caption_mode, self.captions_per_image, self.balance_order = captions, captions_per_image, balance_order
        self.teach = teach
        self.teach_images = length if teach_images is None else teach_images
        self.allow_held_out, self.shapes, self.p_relation, self.layout = allow_held_out, shapes, p_relation, layout

    def __len__(self) -> int:
        return self.length

    def bucket_for_index(self, index: int) -> tuple[int, int]:
        return self.buckets[index % len(self.buckets)]

    def scene(self, index: int) -> tuple[Scene, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        rng = np.random.default_rng((self.seed, index))
        teaching = self.teach is not None and index < self.teach_images
        shapes = self.shapes if self.teach is None or teaching else tuple(s for s in self.shapes if s != self.teach)
        while True:  # teaching: draw until the scene shows the taught shape and no held-out pair
            scene = sample_scene(rng, self.bucket_for_index(index), allow_held_out=self.allow_held_out or teaching,
                                 shapes=shapes, p_relation=self.p_relation, layout=self.layout)
            if not teaching or (any(o.shape == self.teach for o in scene.objects) and
                                not any((o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects)):
                break
        return scene, self._caption(scene, rng)

    def _caption(self, scene: Scene, rng: np.random.Generator) -> str:
        return caption(scene, rng, reading_order=self.layout == "halves", wordings=caption_wordings(self.caption_mode),
                       balance_order=self.balance_order)

    def captions(self, index: int) -> list[str]:
        """The item's `captions_per_image` captions of one scene: scene(index)'s, then more drawn from
        (seed, index, k)."""
        scene, first = self.scene(index)
        return [first] + [self._caption(scene, np.random.default_rng((self.seed, index, k)))
                          for k in range(1, self.captions_per_image)]

    def image(self, index: int) -> tuple[Image.Image, str]:
        scene, text = self.scene(index)
        return render(scene), text

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(image (3, H, W) float32 in [-1, 1], caption)."""
        image, text = self.image(index)
        return to_tensor(image), text


def collate(items: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """Items of one bucket -> ((B, 3, H, W), captions)."""
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) != 1:
        raise InputError(f"cannot batch images of different shapes {sorted(shapes)}; use BucketBatchSampler")
    return torch.stack([x for x, _ in items]), [t for _, t in items]


class BucketBatchSampler:
    """Batches of indices that all share one bucket, shuffled per epoch from (seed, epoch); usable as a
    torch DataLoader `batch_sampler`. Leftovers smaller than `batch_size` are dropped unless `drop_last=False`."""

    def __init__(self, dataset: ShapesDataset, batch_size: int, seed: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _groups(self) -> list[np.ndarray]:
        n, k = len(self.dataset), len(self.dataset.buckets)
        return [np.arange(b, n, k) for b in range(k)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = []
        for group in self._groups():
            group = rng.permutation(group)
            stop = len(group) - len(group) % self.batch_size if self.drop_last else len(group)
            batches += [group[i:i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]
        for i in rng.permutation(len(batches)):
            yield batches[i]

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self._groups())
        return sum(-(-len(g) // self.batch_size) for g in self._groups())
