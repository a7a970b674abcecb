"""Tests for the GenEval-style evaluator: spec, detector on world renders, scoring rules, reports, run_eval."""

import copy
import dataclasses
import importlib.util
import json
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fluxion.data import (
    BUCKETS,
    COLORS,
    INVERSE_RELATION,
    PALETTE,
    caption_styles,
    describe,
    group_scene,
    render,
    scene_from_spec,
)
from fluxion.errors import InputError
from fluxion.eval import (
    TAGS,
    Detection,
    color_binding,
    detect,
    evaluate,
    format_table,
    is_held_out_entry,
    load_spec,
    relative_position,
    run_eval,
    score_entry,
    summarize,
    write_report,
)
from fluxion.eval.detect import label_components
from fluxion.model import TRANSFORMER_PRESETS, Flux

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "evals" / "shapes.jsonl"
SPEC_ENTRIES = load_spec(SPEC)


def _world_images(entry, n, seed, render_entry=None):
    """`n` world renders of `render_entry` (default: the entry itself), cycling through the buckets."""
    return [render(scene_from_spec(render_entry or entry, np.random.default_rng((seed, j)), BUCKETS[j % len(BUCKETS)]))
            for j in range(n)]


def _pixels(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) image in [-1, 1] as (H, W, 3) pixel values 0-255."""
    return ((image + 1) * 127.5).round().permute(1, 2, 0).numpy()


def _script(name: str):
    """A script of evals/ imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "evals" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spec_is_generated_deterministically_and_covers_all_tags():
    make_spec = _script("make_spec")
    assert make_spec.build_spec() == SPEC_ENTRIES == make_spec.build_spec()
    assert make_spec.heldout_phrasings(SPEC_ENTRIES) == load_spec(ROOT / "evals" / "shapes-phrasings.jsonl")
    assert len(SPEC_ENTRIES) >= 100 and {e["tag"] for e in SPEC_ENTRIES} == set(TAGS)
    assert len({e["prompt"] for e in SPEC_ENTRIES}) == len(SPEC_ENTRIES)
    held = {e["tag"] for e in SPEC_ENTRIES if is_held_out_entry(e)}
    assert {"single_object", "colors", "color_attr", "position"} <= held
    for pair in ("purple triangle", "orange square"):
        assert any(pair in e["prompt"] and is_held_out_entry(e) for e in SPEC_ENTRIES)
    for e in SPEC_ENTRIES:   # GenEval's counting: exactly N via include N and exclude N + 1
        if e["tag"] == "counting":
            assert e["exclude"] == [{"class": e["include"][0]["class"], "count": e["include"][0]["count"] + 1}]


def test_spec_prompts_are_world_captions():
    """The tiny models only know the caption grammar: every prompt is a caption of a scene rendered for it."""
    for i, entry in enumerate(SPEC_ENTRIES):
        scene = scene_from_spec(entry, np.random.default_rng(i), (64, 64))
        captions = {describe(scene, style) for style in caption_styles(scene) if not style.size}
        assert entry["prompt"] in captions, entry


def test_world_renders_score_at_least_099_on_every_tag():
    images = [_world_images(e, 4, seed=1000 + i) for i, e in enumerate(SPEC_ENTRIES)]
    results = evaluate(SPEC_ENTRIES, images)
    failures = [(r["prompt"], r["reason"]) for r in results["records"] if not r["correct"]]
    for tag in TAGS:
        assert results["per_tag"][tag]["accuracy"] >= 0.99, (tag, failures)
        assert results["per_tag"][tag]["total"] == 4 * sum(e["tag"] == tag for e in SPEC_ENTRIES)
    assert results["overall"] >= 0.99
    assert results["held_out"]["total"] == 4 * sum(map(is_held_out_entry, SPEC_ENTRIES))
    assert results["held_out"]["accuracy"] >= 0.99
    assert len(results["records"]) == results["images"] == 4 * len(SPEC_ENTRIES)
    for r in results["records"]:
        assert r["background"] == SPEC_ENTRIES[r["entry"]].get("background", r["background"])


def _corrupt(entry, rng):
    """A spec entry describing a scene that must fail `entry`, or None when the tag has no such variant."""
    bad = copy.deepcopy(entry)
    inc = bad["include"]
    if entry["tag"] == "counting":
        inc[0]["count"] += 1 if rng.random() < 0.5 and inc[0]["count"] < 4 else -1
    elif entry["tag"] in ("colors", "color_attr") or any("color" in r for r in inc):
        req = next(r for r in inc if "color" in r)
        others = {r.get("color") for r in inc}
        req["color"] = next(c for c in rng.permutation(COLORS) if c not in others)
    elif entry["tag"] == "position":
        inc[1]["position"][0] = INVERSE_RELATION[inc[1]["position"][0]]
    elif entry["tag"] == "two_object":
        del inc[1]
    elif entry["tag"] == "single_object":
        inc[0]["class"] = next(s for s in ("circle", "square", "triangle") if s != inc[0]["class"])
    return bad


def test_detector_tolerates_blur_noise_and_colour_cast():
    """Model samples are softer and noisier than renders: blur 0.8 px, pixel noise 10 and a global colour
    cast of 10 (RGB units) must not break detection."""
    entries = SPEC_ENTRIES[::2]
    images = []
    for i, entry in enumerate(entries):
        row = []
        for image in _world_images(entry, 2, seed=3000 + i):
            rng = np.random.default_rng(i)
            noisy = (np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
                     + rng.normal(0, 10, (image.height, image.width, 3)) + rng.normal(0, 10, 3))
            row.append(np.clip(noisy, 0, 255).astype(np.uint8))
        images.append(row)
    results = evaluate(entries, images)
    assert all(t["accuracy"] >= 0.95 for t in results["per_tag"].values()), results["per_tag"]


def test_wrong_images_score_zero():
    rng = np.random.default_rng(0)
    entries, images = [], []
    for i, entry in enumerate(SPEC_ENTRIES):
        bad = _corrupt(entry, rng)
        entries.append(entry)
        images.append(_world_images(entry, 2, seed=2000 + i, render_entry=bad))
    results = evaluate(entries, images)
    passed = [(r["prompt"], r["detections"]) for r in results["records"] if r["correct"]]
    assert not passed
    assert all(t["accuracy"] == 0 for t in results["per_tag"].values()) and results["overall"] == 0


def test_position_uses_the_relation_of_include_1_to_include_0():
    entry = next(e for e in SPEC_ENTRIES if e["tag"] == "position" and e["include"][1]["position"][0] == "left of")
    subject, target = entry["include"][1]["class"], entry["include"][0]["class"]
    image = _world_images(entry, 1, seed=5)[0]
    dets = {d.cls: d for d in detect(image)}
    assert dets[subject].centroid[0] < dets[target].centroid[0]
    assert relative_position(dets[subject].bbox, dets[target].bbox) == {"left of"}


def test_stars_are_detected_as_stars():
    for k, (color, size, bucket, bg) in enumerate(zip(COLORS, ("small", "large") * 3, BUCKETS * 2,
                                                       ("white", "black") * 3)):
        for count in (1, 3):
            scene = group_scene(np.random.default_rng(k), bucket, "star", color, count, size, bg)
            dets = detect(render(scene))
            assert [(d.cls, d.color) for d in dets] == [("star", color)] * count, (scene, dets)
    entry = {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "orange"}],
             "prompt": "a photo of an orange star"}
    results = evaluate([entry], [_world_images(entry, 6, seed=3)])
    assert results["per_tag"]["colors"]["accuracy"] == 1.0


def _det(cls, color, box):
    x0, y0, x1, y1 = box
    return Detection(cls, color, box, ((x0 + x1) / 2, (y0 + y1) / 2), int((x1 - x0) * (y1 - y0)))


def test_relative_position_follows_geneval():
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()   # within the 10% slack per box size


def test_score_entry_semantics():
    circle = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}
    two = [_det("circle", "red", (0, 0, 10, 10)), _det("circle", "blue", (20, 0, 28, 8))]
    assert score_entry(circle, two) == (True, "")       # GenEval: "at least", single_object has no exclude
    assert not score_entry(circle, [_det("square", "red", (0, 0, 10, 10))])[0]
    counting = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
                "exclude": [{"class": "circle", "count": 3}], "prompt": "two circles"}
    assert score_entry(counting, two)[0]
    ok, reason = score_entry(counting, two + [_det("circle", "red", (40, 0, 45, 5))])
    assert not ok and "circle<3" in reason
    # Colour is judged on the largest `count` objects only (GenEval: the most confident ones).
    red = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    blue = {**red, "include": [{"class": "circle", "count": 1, "color": "blue"}]}
    assert score_entry(red, two)[0] and not score_entry(blue, two)[0]
    pos = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}],
           "prompt": "a circle left of a square"}
    assert score_entry(pos, [_det("circle", "red", (0, 0, 10, 10)), _det("square", "red", (20, 0, 30, 10))])[0]
    ok, reason = score_entry(pos, [_det("circle", "red", (20, 0, 30, 10)), _det("square", "red", (0, 0, 10, 10))])
    assert not ok and "right of" in reason
    ok, reason = score_entry(pos, [_det("circle", "red", (0, 0, 10, 10))])
    assert not ok and "no target" in reason


def test_label_components_matches_bfs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        classes = np.where(rng.random((40, 50)) < 0.6, rng.integers(0, 3, (40, 50)), -1)
        labels = label_components(classes)
        seen = np.zeros(classes.shape, bool)
        n_components = 0
        for start in zip(*np.nonzero(classes >= 0)):
            if seen[start]:
                continue
            n_components += 1
            queue, members = deque([start]), []
            seen[start] = True
            while queue:
                y, x = queue.popleft()
                members.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if (0 <= ny < 40 and 0 <= nx < 50 and not seen[ny, nx]
                            and classes[ny, nx] == classes[y, x]):
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            assert len({labels[p] for p in members}) == 1
        assert len(np.unique(labels[labels >= 0])) == n_components
        assert (labels[classes < 0] == -1).all()


def test_detect_accepts_arrays_and_rejects_bad_input():
    scene = group_scene(np.random.default_rng(0), (64, 64), "triangle", "purple", 2, "small", "black")
    image = render(scene)
    assert detect(image) == detect(np.asarray(image))
    assert [d.cls for d in detect(image)] == ["triangle", "triangle"]
    assert detect(Image.new("RGB", (64, 64), (255, 255, 255))) == []
    with pytest.raises(InputError, match="uint8"):
        detect(np.zeros((64, 64), np.float32))


def test_run_eval_writes_report(tmp_path):
    entries = [e for e in SPEC_ENTRIES if e["tag"] in ("colors", "position")][::6]
    spec_path = tmp_path / "spec.jsonl"
    spec_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    by_prompt = {e["prompt"]: e for e in entries}
    calls = []

    def generate(prompts, seeds):
        calls.append((prompts, seeds))
        return [render(scene_from_spec(by_prompt[p], np.random.default_rng(s), (64, 64)))
                for p, s in zip(prompts, seeds)]

    results = run_eval(generate, spec_path, 2, tmp_path / "out", seed=10)
    assert calls[0] == ([entries[0]["prompt"]] * 2, [10, 11]) and calls[1][1] == [12, 13]
    assert results["overall"] == 1.0 and [r["seed"] for r in results["records"]][:3] == [10, 11, 12]
    assert results["settings"] is None and results["seconds_per_image"] >= 0  # arrays carry no settings
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["per_tag"] == results["per_tag"] and len(written["records"]) == 2 * len(entries)
    for tag in ("colors", "position"):
        sheet = Image.open(tmp_path / "out" / f"contact_{tag}.png")
        n_rows = sum(e["tag"] == tag for e in entries)
        assert sheet.width > 2 * 128 and sheet.height > n_rows * 128
    table = format_table(results)
    assert "colors" in table and "position" in table and "overall" in table and "1.0000" in table
    with pytest.raises(InputError, match="images"):
        write_report(results, [], tmp_path / "bad")


def test_report_marks_failures_red(tmp_path):
    entry = SPEC_ENTRIES[0]
    good = _world_images(entry, 1, seed=0)[0]
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    results = evaluate([entry], [[good, blank]])
    assert [r["correct"] for r in results["records"]] == [True, False]
    write_report(results, [good, blank], tmp_path)
    sheet = np.asarray(Image.open(tmp_path / f"contact_{entry['tag']}.png"))
    green, red = (40, 170, 60), (210, 40, 40)
    assert (sheet == green).all(-1).sum() > 400 and (sheet == red).all(-1).sum() > 400
    assert results["per_tag"][entry["tag"]]["accuracy"] == 0.5
    assert results["overall_se"] == pytest.approx(np.sqrt(0.5 * 0.5 / 2))  # one tag, 2 images: binomial


def test_overall_standard_error_is_the_binomial_one_of_the_mean_of_tags():
    records = [{"entry": i, "tag": tag, "correct": ok, "held_out": False}
               for i, (tag, ok) in enumerate([("a", True)] * 3 + [("a", False)] + [("b", True)] * 2)]
    results = summarize(records)
    assert results["overall"] == pytest.approx((0.75 + 1.0) / 2)
    assert results["overall_se"] == pytest.approx(np.sqrt(0.75 * 0.25 / 4 + 0.0) / 2)
    assert "standard error 0.108" in format_table(results)


def test_load_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_spec(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "prompt": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_spec(bad)


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_heldout_loss_of_a_zero_velocity_is_the_target_power(guidance_embed):
    # A freshly initialised transformer (adaLN-Zero) predicts v = 0, so its loss at every t is E|eps - x0|^2.
    params = dataclasses.replace(TRANSFORMER_PRESETS["debug"], guidance_embed=guidance_embed)
    model = Flux(params).initialize_weights()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 64, generator=g), torch.randn(3, 16, 64, generator=g)
    txt, vec = torch.randn(3, 5, params.context_in_dim, generator=g), torch.randn(3, params.vec_in_dim, generator=g)
    heldout = _script("heldout_loss")
    losses = heldout.heldout_loss(model, x0, noise, txt, vec)
    assert list(losses) == list(heldout.TIMES)
    assert losses == pytest.approx({t: float((noise - x0).pow(2).mean()) for t in heldout.TIMES}, rel=1e-6)


@pytest.mark.parametrize("relation", ["left of", "right of"])
@pytest.mark.parametrize("mirrored", [False, True])
def test_relation_learnability_scenes_captions_and_halves_agree(relation, mirrored):
    # The layout version of a scene must put each object's colour on the side its caption says.
    learn = _script("relation_learnability")
    scene, caption = learn.scene_and_caption(np.random.default_rng(3), "red", "blue", relation, mirrored, "white",
                                            "large")
    red, blue = (next(o for o in scene.objects if o.color == c) for c in ("red", "blue"))
    expected = (f"a blue {blue.shape} {INVERSE_RELATION[relation]} a red {red.shape}" if mirrored
                else f"a red {red.shape} {relation} a blue {blue.shape}")
    assert caption.endswith(expected) and scene.background == "white" and {red.size, blue.size} == {"large"}
    red_left = relation == "left of"
    assert (red.center[0] < blue.center[0]) == red_left
    image = _pixels(learn.halves(scene))
    left, right = (PALETTE["red"], PALETTE["blue"]) if red_left else (PALETTE["blue"], PALETTE["red"])
    assert (image[:, :32] == left).all() and (image[:, 32:] == right).all()


def test_color_binding_tells_bound_from_swapped_and_is_tallied():
    entry = {"tag": "color_attr", "prompt": "a purple triangle and a blue square",
             "include": [{"class": "triangle", "count": 1, "color": "purple"},
                         {"class": "square", "count": 1, "color": "blue"}]}

    def shown(*pairs):
        return [Detection(cls, color, (0, 0, 8, 8), (4, 4), 64) for cls, color in pairs]

    assert color_binding(entry, shown(("triangle", "purple"), ("square", "blue"))) == "bound"
    assert color_binding(entry, shown(("triangle", "blue"), ("square", "purple"))) == "swapped"
    assert color_binding(entry, shown(("triangle", "purple"), ("square", "purple"))) == "neither"
    assert color_binding(entry, shown(("triangle", "purple"))) == "neither"
    uncoloured = next(e for e in SPEC_ENTRIES if e["tag"] == "position" and "color" not in e["include"][0])
    assert color_binding(uncoloured, shown(("circle", "red"), ("square", "blue"))) is None
    # World renders of colour_attr prompts are bound; the tally skips the uncoloured position prompt.
    pairs = [e for e in SPEC_ENTRIES if e["tag"] == "color_attr"][:3] + [uncoloured]
    results = evaluate(pairs, [_world_images(e, 2, seed=5) for e in pairs])
    assert results["color_binding"] == {"bound": 6, "swapped": 0, "neither": 0}
    assert "6 bound, 0 swapped, 0 neither" in format_table(results)


def test_binding_learnability_halves_follow_the_bound_colours(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "evals"))
    learn = _script("binding_learnability")
    shapes, colors = ("triangle", "circle"), ("red", "blue")
    assert learn.binding_caption(shapes, colors, "a photo of ") == "a photo of a red triangle and a blue circle"
    image = _pixels(learn.binding_halves(shapes, colors))
    assert (image[:, :32] == PALETTE["blue"]).all() and (image[:, 32:] == PALETTE["red"]).all()  # circle first
    swapped = _pixels(learn.binding_halves(shapes, colors[::-1]))
    assert (swapped[:, :32] == PALETTE["red"]).all()


def test_binding_learnability_renders_swap_only_the_shapes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "evals"))
    learn = _script("binding_learnability")
    colors = ("red", "blue")
    bound, swapped = (_pixels(learn.binding_render(shapes, colors, seed=3))
                      for shapes in (("circle", "triangle"), ("triangle", "circle")))
    for color in colors:
        masks = [(image == PALETTE[color]).all(-1) for image in (bound, swapped)]
        centroids = [np.argwhere(m).mean(0) for m in masks]
        assert masks[0].sum() > 50 and (masks[0] != masks[1]).any()  # the same place, another shape
        assert np.abs(centroids[0] - centroids[1]).max() < 4  # a triangle's centroid sits lower in its box


def test_heldout_words_finds_each_held_out_wording_and_compares_the_same_entries(tmp_path, capsys, monkeypatch):
    heldout_words = _script("heldout_words")
    patterns = heldout_words.held_out_patterns()
    phrased = load_spec(ROOT / "evals" / "shapes-phrasings.jsonl")
    assert all(any(p.search(e["prompt"]) for p in patterns.values()) for e in phrased)
    assert not any(p.search(e["prompt"]) for e in SPEC_ENTRIES for p in patterns.values())
    assert not patterns["under"].search("a square underneath a circle")
    # entry 0 in a held-out wording: right once of two; in the spec's wording: right twice of two
    for spec, correct in (("phrasings", [True, False]), ("shapes", [True, True])):
        folder = tmp_path / f"tiny-pro_64x64_seed=0_{spec}"
        folder.mkdir()
        prompt = phrased[0]["prompt"] if spec == "phrasings" else SPEC_ENTRIES[0]["prompt"]
        records = [{"entry": 0, "prompt": prompt, "correct": c} for c in correct]
        (folder / "results.json").write_text(json.dumps({"records": records}))
    monkeypatch.setattr(sys, "argv", ["heldout_words.py", str(tmp_path), "--sizes", "64x64"])
    heldout_words.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    wordings = [w for w, p in patterns.items() if p.search(phrased[0]["prompt"])]
    assert rows[1:1 + len(wordings)] == [f"| {w} | 2 | 0.50 | 1.00 |" for w in wordings]
    # "a circle under a square": found twice, once drawn one above the other with the circle on top (reading order)
    records = [{"prompt": "a photo of a circle under a square", "detections": [
        {"cls": "circle", "centroid": [30, 10]}, {"cls": "square", "centroid": [32, 50]}]}, {
        "prompt": "a circle under a square", "detections": [
            {"cls": "circle", "centroid": [10, 40]}, {"cls": "square", "centroid": [50, 30]}]},
        {"prompt": "a circle under a square", "detections": [{"cls": "circle", "centroid": [10, 40]}]}]
    assert heldout_words.layouts(records, patterns["under"], "y") == (2, 1, 1)
