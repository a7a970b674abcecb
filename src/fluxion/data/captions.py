"""Captions for shapes-world scenes: a small template grammar, enumerable so prompts can be checked against it."""

import itertools
from dataclasses import dataclass

import numpy as np

from fluxion.data.shapes import INVERSE_RELATION, Scene, ShapeObject

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
PREFIXES = ("", "a photo of ")
# Relation scenes are described with their relation as drawn, its mirror image ("b right of a"), or
# as a plain pair in either order, which is how GenEval phrases its two_object prompts.
FORMS = ("relation", "inverse", "and", "and_reversed")
FORM_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
# Optional parts are drawn once per caption, not per object: GenEval's position and counting prompts name
# no colour at all ("a circle left of a square"), its colour prompts name every colour.
P_PHOTO, P_COLOR, P_SIZE, P_BACKGROUND = 0.5, 0.7, 0.3, 0.3


@dataclass(frozen=True)
class CaptionStyle:
    prefix: str = ""
    color: bool = True
    size: bool = False
    background: bool = False
    form: str = "relation"   # used by relation scenes only


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: str, count: int = 1, color: str | None = None, size: str | None = None) -> str:
    """'a small red circle', 'two blue squares', 'an orange triangle'."""
    words = [w for w in (size, color) if w] + [shape if count == 1 else shape + "s"]
    return " ".join([_article(words[0]) if count == 1 else NUMBER_WORDS[count]] + words)


def _object_phrase(obj: ShapeObject, style: CaptionStyle, count: int = 1) -> str:
    return noun_phrase(obj.shape, count, obj.color if style.color else None, obj.size if style.size else None)


def describe(scene: Scene, style: CaptionStyle) -> str:
    """The caption of `scene` in the given style."""
    first = scene.objects[0]
    if scene.relation is None:
        body = _object_phrase(first, style, len(scene.objects))
    else:
        a, b = (_object_phrase(o, style) for o in scene.objects)
        body = {"relation": f"{a} {scene.relation} {b}",
                "inverse": f"{b} {INVERSE_RELATION[scene.relation]} {a}",
                "and": f"{a} and {b}",
                "and_reversed": f"{b} and {a}"}[style.form]
    suffix = f" on a {scene.background} background" if style.background else ""
    return f"{style.prefix}{body}{suffix}"


def caption_styles(scene: Scene) -> list[CaptionStyle]:
    """Every style `caption` can draw for this scene."""
    forms = FORMS if scene.relation is not None else ("relation",)
    return [CaptionStyle(*opts) for opts in itertools.product(PREFIXES, (True, False), (True, False),
                                                              (True, False), forms)]


def caption(scene: Scene, rng: np.random.Generator, reading_order: bool = False) -> str:
    """A random caption of `scene`; every caption names each object's shape and count and the relation
    (unless it uses the plain 'a and b' form), and any colour, size or background it names is the drawn one.
    With `reading_order`, the plain form names the left (or upper) object first."""
    u = rng.random(5)
    form = FORMS[min(int(np.searchsorted(np.cumsum(FORM_WEIGHTS), u[4], side="right")), len(FORMS) - 1)]
    if reading_order and form in ("and", "and_reversed"):
        form = "and" if scene.relation in ("left of", "above") else "and_reversed"
    style = CaptionStyle(prefix=PREFIXES[int(u[0] < P_PHOTO)], color=bool(u[1] < P_COLOR),
                         size=bool(u[2] < P_SIZE), background=bool(u[3] < P_BACKGROUND), form=form)
    return describe(scene, style)
