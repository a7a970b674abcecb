"""Tests for the shapes world: determinism, buckets, held-out content, captions and layout geometry."""

import re

import numpy as np
import pytest
import torch

from fluxion.data import (
    ALL_SHAPES,
    BUCKETS,
    COLORS,
    HELD_OUT_PAIRS,
    LAYOUTS,
    PALETTE,
    RELATIONS,
    BucketBatchSampler,
    CaptionStyle,
    ShapesDataset,
    caption,
    caption_styles,
    collate,
    describe,
    group_scene,
    relation_scene,
    render,
    sample_scene,
    scene_from_spec,
)
from fluxion.data.shapes import ACROSS_RATIO
from fluxion.errors import InputError

SHAPE_WORDS = {"circle", "square", "triangle", "star"}
COUNT_WORDS = {1: ("a", "an"), 2: ("two",), 3: ("three",), 4: ("four",)}


def _scenes(n, seed=0, **kwargs):
    return [sample_scene(np.random.default_rng((seed, i)), BUCKETS[i % len(BUCKETS)], **kwargs) for i in range(n)]


def test_dataset_is_deterministic_per_seed_and_index():
    a, b = ShapesDataset(seed=7, length=100), ShapesDataset(seed=7, length=100)
    order = [5, 3, 99, 0, 5]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]
    for (x, cx), (y, cy) in zip(first, second):
        assert torch.equal(x, y) and cx == cy
    other = ShapesDataset(seed=8, length=100)
    assert sum(torch.equal(a[i][0], other[i][0]) for i in range(20)) < 3
    assert len({a[i][1] for i in range(50)}) > 20


def test_p_relation_sets_the_share_of_two_object_relation_scenes():
    def share(p: float) -> float:
        ds = ShapesDataset(seed=3, length=400, p_relation=p)
        return sum(ds.scene(i)[0].relation is not None for i in range(400)) / 400

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert abs(share(0.5) - 0.5) < 0.08 and share(0.4) < share(0.6)
    with pytest.raises(InputError, match="p_relation"):
        ShapesDataset(p_relation=1.5)


def test_items_have_bucket_shapes_and_range():
    ds = ShapesDataset(seed=0, length=30)
    seen = set()
    for i in range(9):
        x, text = ds[i]
        h, w = ds.bucket_for_index(i)
        seen.add((h, w))
        assert x.shape == (3, h, w) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and isinstance(text, str) and text
    assert seen == set(BUCKETS) and {(48, 80), (80, 48), (64, 64)} <= set(BUCKETS)
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(InputError, match="divisible by 16"):
        ShapesDataset(buckets=[(60, 64)])


def test_bucket_batch_sampler_groups_and_shuffles():
    ds = ShapesDataset(seed=1, length=100)
    sampler = BucketBatchSampler(ds, batch_size=8, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(len(range(b, 100, 3)) // 8 for b in range(3))
    assert all(len({ds.bucket_for_index(i) for i in batch}) == 1 and len(batch) == 8 for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert len(set(flat)) == len(flat)
    assert batches == list(sampler)
    sampler.set_epoch(1)
    assert batches != list(sampler)
    keep_all = BucketBatchSampler(ds, batch_size=8, drop_last=False)
    assert sorted(i for batch in keep_all for i in batch) == list(range(100)) and len(list(keep_all)) == len(keep_all)
    images, texts = collate([ds[i] for i in batches[0]])
    assert images.shape == (8, 3, *ds.bucket_for_index(batches[0][0])) and len(texts) == 8
    with pytest.raises(InputError, match="BucketBatchSampler"):
        collate([ds[0], ds[1]])


def test_training_mode_never_samples_held_out_content():
    scenes = _scenes(3000, seed=11)
    assert not any(s.is_held_out for s in scenes)
    drawn = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert drawn.isdisjoint(HELD_OUT_PAIRS) and all(shape != "star" for _, shape in drawn)
    # Everything else does appear: 3 shapes x 6 colours minus the two held-out pairs.
    assert len(drawn) == 3 * len(COLORS) - len(HELD_OUT_PAIRS)
    with pytest.raises(InputError, match="held-out"):
        sample_scene(np.random.default_rng(0), (64, 64), shapes=ALL_SHAPES)


def test_held_out_content_is_renderable_on_request():
    scenes = _scenes(600, seed=12, allow_held_out=True, shapes=ALL_SHAPES)
    drawn = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert HELD_OUT_PAIRS <= drawn and any(shape == "star" for _, shape in drawn)
    for color, shape in sorted(HELD_OUT_PAIRS) + [("green", "star")]:
        scene = group_scene(np.random.default_rng(0), (64, 64), shape, color, 1, "large", "white")
        x, y = (int(v) for v in scene.objects[0].center)
        pixel = np.asarray(render(scene))[y + 2, x]   # below the centre: inside a star's body too
        assert tuple(pixel) == PALETTE[color]


def test_render_is_antialiased_and_pure_inside():
    scene = group_scene(np.random.default_rng(1), (64, 64), "circle", "blue", 1, "large", "black")
    image = np.asarray(render(scene))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    colors = {tuple(p) for p in image.reshape(-1, 3)}
    assert PALETTE["blue"] in colors and (0, 0, 0) in colors
    assert len(colors) > 5                     # blended edge pixels
    assert tuple(image[0, 0]) == (0, 0, 0)
    big = np.asarray(render(scene, 128, 128))
    assert big.shape == (128, 128, 3)
    assert abs((big != 0).any(-1).sum() / 4 - (image != 0).any(-1).sum()) < 40   # same layout, scaled


def _no_overlap_and_inside(scene):
    margin = 1.0
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        assert x0 >= margin and y0 >= margin and x1 <= scene.width - margin and y1 <= scene.height - margin
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1:]:
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= 2.0, (scene, gap)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_do_not_overlap_and_relations_hold(layout):
    scenes = _scenes(1500, seed=13, allow_held_out=True, shapes=ALL_SHAPES, layout=layout)
    relations, in_halves = set(), []
    for scene in scenes:
        _no_overlap_and_inside(scene)
        if scene.relation is None:
            assert len({(o.shape, o.color, o.size, o.extent) for o in scene.objects}) == 1
            continue
        relations.add(scene.relation)
        a, b = scene.objects
        assert a.shape != b.shape
        (ax, ay), (bx, by) = a.center, b.center
        ax0, ay0, ax1, ay1 = a.bbox
        bx0, by0, bx1, by1 = b.bbox
        along, across, separated = {
            "left of": (bx - ax, by - ay, ax1 < bx0),
            "right of": (ax - bx, ay - by, bx1 < ax0),
            "above": (by - ay, bx - ax, ay1 < by0),
            "below": (ay - by, ax - bx, by1 < ay0),
        }[scene.relation]
        assert separated and along > 0 and abs(across) <= ACROSS_RATIO * along + 1e-9, scene
        # Each object in its own half: the centre of the first in reading order before the middle, the other after.
        horizontal = scene.relation in ("left of", "right of")
        first, second = (a, b) if scene.relation in ("left of", "above") else (b, a)
        middle = (scene.width if horizontal else scene.height) / 2
        axis = 0 if horizontal else 1
        in_halves.append(first.center[axis] < middle < second.center[axis])
    assert relations == set(RELATIONS)
    if layout == "halves":
        assert all(in_halves)
    else:  # "spread" puts both centres on one side of the middle in a few scenes in a hundred
        assert 0.01 < 1 - np.mean(in_halves) < 0.2
    # Sizes: "large" objects are larger than "small" ones of the same bucket.
    for bucket in BUCKETS:
        ext = {s: [o.extent for sc in scenes if (sc.height, sc.width) == bucket for o in sc.objects if o.size == s]
               for s in ("small", "large")}
        assert max(ext["small"]) < min(ext["large"])


def _check_caption(scene, text):
    words = text.split()
    named_colors = [w for w in words if w in COLORS]
    assert set(named_colors) <= {o.color for o in scene.objects}, text
    for size in ("small", "large"):
        if size in words:
            assert size in {o.size for o in scene.objects}, text
    if "background" in words:
        assert f"on a {scene.background} background" in text
    if scene.relation is None:
        n, shape = len(scene.objects), scene.objects[0].shape
        assert words[words.index("of") + 1 if text.startswith("a photo of") else 0] in COUNT_WORDS[n], text
        assert (shape if n == 1 else shape + "s") in words, text
        assert len(set(named_colors)) <= 1
        return
    a, b = scene.objects
    assert a.shape in words and b.shape in words, text
    rel = next((r for r in RELATIONS if f" {r} " in text), None)
    if rel is None:
        assert " and " in text
        return
    before, after = text.split(f" {rel} ")
    subject = a if a.shape in before.split() else b
    target = b if subject is a else a
    assert target.shape in after.split() and subject.shape not in after.split(), text
    expected = scene.relation if subject is a else {"left of": "right of", "right of": "left of",
                                                    "above": "below", "below": "above"}[scene.relation]
    assert rel == expected, (text, scene)
    # Colours, when named, sit next to their own object.
    for obj, part in ((subject, before), (target, after)):
        m = re.search(rf"(\w+) {obj.shape}\b", part)
        if m and m.group(1) in COLORS:
            assert m.group(1) == obj.color, text


def test_every_bucket_from_64_to_128_lays_out_every_scene():
    """The sizes recipes' buckets, including aspect ratios where four large objects only fit shrunk."""
    for bucket in ((64, 64), (96, 96), (128, 128), (64, 128), (128, 64), (80, 112), (112, 80), (96, 128), (128, 96),
                   (64, 96)):
        rng = np.random.default_rng(bucket)
        for _ in range(300):
            scene = sample_scene(rng, bucket, p_relation=0.5, layout="halves")
            for o in scene.objects:
                x0, y0, x1, y1 = o.bbox
                assert 0 <= x0 and 0 <= y0 and x1 <= scene.width and y1 <= scene.height, (bucket, scene)
        for count in range(1, 5):  # the grid's fallback: the extent shrunk to fill its cell exactly
            group_scene(np.random.default_rng(count), bucket, "circle", "red", count, "large", "white")


def test_captions_describe_what_is_drawn():
    rng = np.random.default_rng(0)
    styles_seen = set()
    for scene in _scenes(400, seed=14, allow_held_out=True, shapes=ALL_SHAPES):
        for style in caption_styles(scene):
            _check_caption(scene, describe(scene, style))
        text = caption(scene, rng)
        _check_caption(scene, text)
        styles_seen.add(text.startswith("a photo of "))
    assert styles_seen == {True, False}
    scene = relation_scene(np.random.default_rng(0), (64, 64), ("triangle", "purple", "small"),
                           ("circle", "yellow", "large"), "above", "black")
    full = CaptionStyle(prefix="a photo of ", color=True, size=True, background=True)
    assert describe(scene, full) == ("a photo of a small purple triangle above a large yellow circle "
                                     "on a black background")
    assert describe(scene, CaptionStyle(color=False, form="inverse")) == "a circle below a triangle"
    two = group_scene(np.random.default_rng(0), (64, 64), "square", "orange", 2, "small", "white")
    assert describe(two, CaptionStyle()) == "two orange squares"
    one = group_scene(np.random.default_rng(0), (64, 64), "square", "orange", 1, "small", "white")
    assert describe(one, CaptionStyle()) == "an orange square"


def test_halves_captions_name_a_plain_pair_in_reading_order():
    ds = ShapesDataset(seed=3, length=600, p_relation=1.0, layout="halves")
    plain = 0
    for i in range(len(ds)):
        scene, text = ds.scene(i)
        _check_caption(scene, text)
        if " and " in text:
            plain += 1
            a, b = scene.objects
            first = a if scene.relation in ("left of", "above") else b
            assert first.shape in text.split(" and ")[0].split(), (text, scene)
    assert plain > 100
    with pytest.raises(InputError, match="layout 'grid'"):
        ShapesDataset(layout="grid")


def test_scene_from_spec_matches_the_entry():
    entries = [
        {"tag": "counting", "include": [{"class": "square", "count": 3}],
         "exclude": [{"class": "square", "count": 4}], "prompt": "three squares"},
        {"tag": "position", "include": [{"class": "circle", "count": 1, "color": "blue"},
                                        {"class": "triangle", "count": 1, "color": "purple",
                                         "position": ["below", 0]}],
         "prompt": "a purple triangle below a blue circle", "background": "black"},
        {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "star", "count": 1}],
         "prompt": "a circle and a star"},
    ]
    for bucket in BUCKETS:
        rng = np.random.default_rng(0)
        three = scene_from_spec(entries[0], rng, bucket)
        assert [o.shape for o in three.objects] == ["square"] * 3 and (three.height, three.width) == bucket
        rel = scene_from_spec(entries[1], rng, bucket)
        assert rel.relation == "below" and rel.background == "black"
        assert [(o.shape, o.color) for o in rel.objects] == [("triangle", "purple"), ("circle", "blue")]
        pair = scene_from_spec(entries[2], rng, bucket)
        assert {o.shape for o in pair.objects} == {"circle", "star"}
    with pytest.raises(InputError, match="hexagon"):
        scene_from_spec({"include": [{"class": "hexagon", "count": 1}], "prompt": "a hexagon"},
                        np.random.default_rng(0), (64, 64))
    with pytest.raises(InputError, match="one class"):
        scene_from_spec({"include": [{"class": "circle", "count": 2}, {"class": "square", "count": 1}],
                         "prompt": "x"}, np.random.default_rng(0), (64, 64))
