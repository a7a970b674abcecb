"""GenEval scoring rules (include/exclude/count/color/position) applied to our detector's output."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fluxion.data.shapes import HELD_OUT_PAIRS
from fluxion.errors import InputError
from fluxion.eval.detect import Detection, DetectorConfig, background_name, detect, to_array

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's default `position_threshold`: each box's dimensions shrink the offset by 10% before the test.
POSITION_THRESHOLD = 0.1


def load_spec(path: str | Path) -> list[dict]:
    """GenEval metadata: one JSON object per line with `tag`, `include` (class, count, color?, position?),
    optional `exclude` (class, count) and `prompt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} does not exist")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from e
        missing = [k for k in ("tag", "include", "prompt") if k not in entry]
        if missing or any("class" not in r or "count" not in r for r in entry["include"] + entry.get("exclude", [])):
            raise InputError(f"{path}:{lineno}: a spec entry needs tag, include, prompt and class/count in every "
                             f"include/exclude clause; got {entry}")
        entries.append(entry)
    return entries


def is_held_out_entry(entry: dict) -> bool:
    """Whether the entry asks for a colour/shape pair kept out of training (purple triangle, orange square)."""
    return any((req.get("color"), req["class"]) in HELD_OUT_PAIRS for req in entry["include"])


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B (x0, y0, x1, y1), as GenEval's `relative_position`: the centre offset is
    reduced by `threshold` times the summed box sizes, and a relation holds where the reduced offset keeps
    more than half of the offset's length along its axis."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def score_entry(entry: dict, detections: Sequence[Detection]) -> tuple[bool, str]:
    """(correct, reason) for one image, following GenEval's `evaluate`: include clauses are ANDed and exclude
    clauses ORed; colour and position are checked on the first `count` detections of the class only (GenEval:
    the most confident; here: the largest)."""
    objects: dict[str, list[Detection]] = {}
    for d in detections:
        objects.setdefault(d.cls, []).append(d)
    correct, reason, matched_groups = True, [], []
    for req in entry["include"]:
        cls, count = req["class"], req["count"]
        found = objects.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reason.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in req:
            colors = [d.color for d in found]
            if colors.count(req["color"]) < count:
                matched = False
                found_colors = ", ".join(f"{colors.count(c)} {c}" for c in sorted(set(colors)))
                reason.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                              f"{req['color']}; and {found_colors}")
        if matched and "position" in req:
            expected, target = req["position"]
            if matched_groups[target] is None:
                matched = False
                reason.append(f"no target for {cls} to be {expected}")
            else:
                for obj in found:
                    for target_obj in matched_groups[target]:
                        rels = relative_position(obj.bbox, target_obj.bbox)
                        if expected not in rels:
                            matched = False
                            found_rels = " and ".join(sorted(rels))
                            reason.append(f"expected {cls} {expected} target, found {found_rels} target")
                            break
                    if not matched:
                        break
        correct &= matched
        matched_groups.append(found if matched else None)
    for req in entry.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reason.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reason)


def color_binding(entry: dict, detections: Sequence[Detection]) -> str | None:
    """For an entry asking for two different shapes of two different colours ("a yellow circle and a blue
    triangle"): "bound" if the image shows each shape in its colour, "swapped" if each in the other's colour, else
    "neither". None for any other entry. Telling the two failures apart shows whether a model binds colours to
    shapes at all: one that does not swaps as often as it binds."""
    include = entry["include"]
    if len(include) != 2 or any(r.get("count", 1) != 1 or "color" not in r for r in include):
        return None
    (a, b), shown = include, {(d.cls, d.color) for d in detections}
    if a["class"] == b["class"] or a["color"] == b["color"]:
        return None
    if {(a["class"], a["color"]), (b["class"], b["color"])} <= shown:
        return "bound"
    if {(a["class"], b["color"]), (b["class"], a["color"])} <= shown:
        return "swapped"
    return "neither"


def summarize(records: Sequence[dict]) -> dict:
    """Per-tag accuracy (mean over images), overall = mean over tags, its standard error, and the held-out-pair
    subset. The standard error treats each image as an independent pass/fail draw (binomial per tag): what the
    overall score would scatter by under other seeds for the same prompts; two scores from different seeds differ
    by about 1.4 of it by chance."""
    per_tag: dict[str, dict] = {}
    for r in records:   # tags in order of first appearance, as GenEval's groupby(sort=False)
        t = per_tag.setdefault(r["tag"], {"correct": 0, "total": 0})
        t["correct"] += int(r["correct"])
        t["total"] += 1
    for t in per_tag.values():
        t["accuracy"] = t["correct"] / t["total"]
    held = [r for r in records if r["held_out"]]
    by_prompt: dict[int, bool] = {}
    for r in records:
        by_prompt[r["entry"]] = by_prompt.get(r["entry"], False) or r["correct"]
    binding = {k: sum(r.get("binding") == k for r in records) for k in ("bound", "swapped", "neither")}
    tags = per_tag.values()
    return {
        "overall": float(np.mean([t["accuracy"] for t in tags])) if per_tag else 0.0,
        "overall_se": float(np.sqrt(sum(t["accuracy"] * (1 - t["accuracy"]) / t["total"] for t in tags))
                            / len(per_tag)) if per_tag else 0.0,
        "per_tag": per_tag,
        "held_out": {"correct": sum(r["correct"] for r in held), "total": len(held),
                     "accuracy": sum(r["correct"] for r in held) / len(held) if held else None},
        "images": len(records),
        "image_accuracy": sum(r["correct"] for r in records) / len(records) if records else 0.0,
        "prompt_accuracy": sum(by_prompt.values()) / len(by_prompt) if by_prompt else 0.0,
        "color_binding": binding,  # over the images of prompts naming two shapes in two colours
    }


def evaluate(spec_entries: Sequence[dict], images_per_entry: Sequence[Sequence], *,
             seeds: Sequence[Sequence[int]] | None = None, config: DetectorConfig | None = None) -> dict:
    """Score `images_per_entry[i]` (PIL images or uint8 arrays) against `spec_entries[i]`. Returns the
    `summarize` dict plus `records`: one per image, in entry order, with its detections."""
    if len(spec_entries) != len(images_per_entry):
        raise InputError(f"got {len(spec_entries)} spec entries but images for {len(images_per_entry)}")
    records = []
    for i, (entry, images) in enumerate(zip(spec_entries, images_per_entry)):
        held_out = is_held_out_entry(entry)
        for j, image in enumerate(images):
            image = to_array(image)
            detections = detect(image, config)
            correct, reason = score_entry(entry, detections)
            records.append({"entry": i, "image": j, "seed": None if seeds is None else seeds[i][j],
                            "tag": entry["tag"], "prompt": entry["prompt"], "held_out": held_out,
                            "background": background_name(image),
                            "correct": correct, "reason": reason, "binding": color_binding(entry, detections),
                            "detections": [d.to_dict() for d in detections]})
    return {**summarize(records), "records": records}
