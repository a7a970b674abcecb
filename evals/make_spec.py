"""Writes evals/shapes.jsonl, the GenEval-style spec for the shapes world; evals/shapes-phrasings.jsonl, the same
entries in wordings kept out of training (fluxion.data.captions.WORDINGS); and evals/star.jsonl, the same tasks for
the held-out star that a LoRA teaches (deterministic: same files every run).

    python evals/make_spec.py            # all three files
"""

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from fluxion.data.captions import Wording, caption_styles, describe, held_out_wording, noun_phrase
from fluxion.data.shapes import COLORS, HELD_OUT_PAIRS, INVERSE_RELATION, RELATIONS, TRAIN_SHAPES, scene_from_spec

SEED = 0
PHOTO = "a photo of "


def _entry(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None,
           background: str | None = None) -> dict:
    # Key order follows GenEval's metadata; `background` is our extension, read only by scene_from_spec.
    entry = {"tag": tag, "include": include}
    if exclude:
        entry["exclude"] = exclude
    entry["prompt"] = prompt + (f" on a {background} background" if background else "")
    if background:
        entry["background"] = background
    return entry


def _obj(shape: str, color: str | None = None, count: int = 1, position: tuple[str, int] | None = None) -> dict:
    req = {"class": shape, "count": count}
    if color:
        req["color"] = color
    if position:
        req["position"] = list(position)
    return req


def _train_color(rng: np.random.Generator, shape: str, avoid: tuple[str, ...] = ()) -> str:
    colors = [c for c in COLORS if (c, shape) not in HELD_OUT_PAIRS and c not in avoid]
    return colors[rng.integers(len(colors))]


def single_object(rng: np.random.Generator) -> list[dict]:
    out = []
    for shape in TRAIN_SHAPES:
        out += [_entry("single_object", [_obj(shape)], PHOTO + noun_phrase(shape)),
                _entry("single_object", [_obj(shape)], noun_phrase(shape)),
                _entry("single_object", [_obj(shape)], noun_phrase(shape), background="white"),
                _entry("single_object", [_obj(shape)], PHOTO + noun_phrase(shape), background="black")]
    # Held-out pairs, phrased unlike the `colors` entries; the colour is part of what is checked.
    for color, shape in sorted(HELD_OUT_PAIRS):
        out += [_entry("single_object", [_obj(shape, color)], noun_phrase(shape, 1, color)),
                _entry("single_object", [_obj(shape, color)], noun_phrase(shape, 1, color), background="black")]
    return out


def two_object(rng: np.random.Generator) -> list[dict]:
    out = []
    for (a, b), prefix in itertools.product(itertools.permutations(TRAIN_SHAPES, 2), ("", PHOTO)):
        out.append(_entry("two_object", [_obj(a), _obj(b)], f"{prefix}{noun_phrase(a)} and {noun_phrase(b)}"))
    return out


def counting(rng: np.random.Generator) -> list[dict]:
    # GenEval's counting: at least `count` (include) and fewer than count + 1 (exclude), i.e. exactly `count`.
    out = []
    for shape, count in itertools.product(TRAIN_SHAPES, (2, 3, 4)):
        out.append(_entry("counting", [_obj(shape, count=count)], PHOTO + noun_phrase(shape, count),
                          exclude=[_obj(shape, count=count + 1)]))
        color = _train_color(rng, shape)
        out.append(_entry("counting", [_obj(shape, color, count)], noun_phrase(shape, count, color),
                          exclude=[_obj(shape, count=count + 1)]))
    return out


def colors(rng: np.random.Generator) -> list[dict]:
    return [_entry("colors", [_obj(shape, color)], PHOTO + noun_phrase(shape, 1, color))
            for shape, color in itertools.product(TRAIN_SHAPES, COLORS)]


def position(rng: np.random.Generator) -> list[dict]:
    """Every ordered shape pair in every relation without colours (as GenEval), then coloured ones, a third of
    them holding a held-out pair. Prompt "a <subject> <relation> a <target>": the subject is include[1]."""
    out = []
    for (subject, target), relation in itertools.product(itertools.permutations(TRAIN_SHAPES, 2), RELATIONS):
        out.append(_entry("position", [_obj(target), _obj(subject, position=(relation, 0))],
                          f"{PHOTO}{noun_phrase(subject)} {relation} {noun_phrase(target)}"))
    held = sorted(HELD_OUT_PAIRS)
    for k in range(12):
        subject, target = (TRAIN_SHAPES[i] for i in rng.choice(len(TRAIN_SHAPES), size=2, replace=False))
        relation = RELATIONS[k % len(RELATIONS)]
        s_color, t_color = _train_color(rng, subject), _train_color(rng, target)
        if k % 3 == 0:  # put a held-out pair on the subject or the target, alternating
            color, shape = held[(k // 3) % len(held)]
            if (k // 3) % 2 == 0:
                subject, s_color = shape, color
                target = TRAIN_SHAPES[(TRAIN_SHAPES.index(shape) + 1 + rng.integers(2)) % 3]
                t_color = _train_color(rng, target, avoid=(color,))
            else:
                target, t_color = shape, color
                subject = TRAIN_SHAPES[(TRAIN_SHAPES.index(shape) + 1 + rng.integers(2)) % 3]
                s_color = _train_color(rng, subject, avoid=(color,))
        prefix = PHOTO if k % 2 == 0 else ""
        out.append(_entry("position", [_obj(target, t_color), _obj(subject, s_color, position=(relation, 0))],
                          f"{prefix}{noun_phrase(subject, 1, s_color)} {relation} {noun_phrase(target, 1, t_color)}"))
    return out


def color_attr(rng: np.random.Generator) -> list[dict]:
    """Two shapes in two different colours (24 distinct entries); every fourth draw holds a held-out pair."""
    out, k = [], -1
    held = sorted(HELD_OUT_PAIRS)
    while len(out) < 24:
        k += 1
        a, b = (TRAIN_SHAPES[i] for i in rng.choice(len(TRAIN_SHAPES), size=2, replace=False))
        if k % 4 == 0:
            color_a, a = held[(k // 4) % len(held)]
            b = TRAIN_SHAPES[(TRAIN_SHAPES.index(a) + 1 + rng.integers(2)) % 3]
        else:
            color_a = _train_color(rng, a)
        color_b = _train_color(rng, b, avoid=(color_a,))
        if k % 8 >= 4:  # the held-out object is named first or second
            (a, color_a), (b, color_b) = (b, color_b), (a, color_a)
        prefix = PHOTO if k % 2 == 0 else ""
        entry = _entry("color_attr", [_obj(a, color_a), _obj(b, color_b)],
                       f"{prefix}{noun_phrase(a, 1, color_a)} and {noun_phrase(b, 1, color_b)}")
        if entry not in out:
            out.append(entry)
    return out


def build_spec(seed: int = SEED) -> list[dict]:
    rng = np.random.default_rng(seed)
    entries = [e for part in (single_object, two_object, counting, colors, position, color_attr) for e in part(rng)]
    unique, seen = [], set()
    for e in entries:
        key = json.dumps(e, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique


RELATION_FIELDS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


def _wording_fields(scene, style) -> tuple[str, ...]:
    """The Wording fields a caption of `scene` in `style` uses."""
    used = ["frame", "end"]
    counts = [len(scene.objects)] if scene.relation is None else [1, 1]
    used += ["one"] if 1 in counts else ["count"]
    used += ["color"] if style.color else []
    used += ["background"] if style.background else []
    if scene.relation is not None and style.form in ("relation", "inverse"):
        relation = scene.relation if style.form == "relation" else INVERSE_RELATION[scene.relation]
        used += ["clause", RELATION_FIELDS[relation]]
    elif scene.relation is not None:
        used += ["pair"]
    return tuple(used)


def heldout_phrasings(entries: list[dict], seed: int = SEED) -> list[dict]:
    """The entries with their prompts in held-out wordings: each rephrased with held-out words in some of the
    fields its caption uses (each with probability 1/2, at least one), the scene asked for unchanged."""
    rng = np.random.default_rng(seed)
    out = []
    for i, entry in enumerate(entries):
        scene = scene_from_spec(entry, np.random.default_rng(i), (64, 64))
        style = next(s for s in caption_styles(scene) if describe(scene, s) == entry["prompt"])
        wording = held_out_wording(rng, _wording_fields(scene, style))
        if style.prefix and wording.frame == Wording.frame and wording.clause == Wording.clause:
            wording = replace(wording, frame=style.prefix + "{}")  # keep "a photo of" unless the frame changed
        out.append({**entry, "prompt": describe(scene, replace(style, prefix="", wording=wording))})
    return out


def star_spec(shape: str = "star") -> list[dict]:
    """GenEval's tasks for one new shape: alone, in every colour, counted, beside each trained shape (both
    orders), and placed by each relation against each trained shape (as the subject, then as the target)."""
    out = [_entry("single_object", [_obj(shape)], PHOTO + noun_phrase(shape)),
           _entry("single_object", [_obj(shape)], noun_phrase(shape)),
           _entry("single_object", [_obj(shape)], noun_phrase(shape), background="white"),
           _entry("single_object", [_obj(shape)], PHOTO + noun_phrase(shape), background="black")]
    out += [_entry("colors", [_obj(shape, color)], PHOTO + noun_phrase(shape, 1, color)) for color in COLORS]
    for count, color in zip((2, 3, 4, 2, 3, 4), (None, None, None, "yellow", "red", "blue")):
        out.append(_entry("counting", [_obj(shape, color, count)], (PHOTO if color is None else "")
                          + noun_phrase(shape, count, color), exclude=[_obj(shape, count=count + 1)]))
    for other, prefix in itertools.product(TRAIN_SHAPES, ("", PHOTO)):
        for a, b in ((shape, other), (other, shape)):
            out.append(_entry("two_object", [_obj(a), _obj(b)], f"{prefix}{noun_phrase(a)} and {noun_phrase(b)}"))
    for (k, other), relation in itertools.product(enumerate(TRAIN_SHAPES), RELATIONS):
        subject, target = (shape, other) if k % 2 == RELATIONS.index(relation) % 2 else (other, shape)
        out.append(_entry("position", [_obj(target), _obj(subject, position=(relation, 0))],
                          f"{PHOTO}{noun_phrase(subject)} {relation} {noun_phrase(target)}"))
    return out


def write(entries: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    print(f"wrote {len(entries)} entries to {path}")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    spec = build_spec(args.seed)
    write(spec, args.out_dir / "shapes.jsonl")
    write(heldout_phrasings(spec, args.seed), args.out_dir / "shapes-phrasings.jsonl")
    write(star_spec(), args.out_dir / "star.jsonl")


if __name__ == "__main__":
    main()
