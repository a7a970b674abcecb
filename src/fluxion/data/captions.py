"""Captions for shapes-world scenes: a small template grammar, enumerable so prompts can be checked against it,
and the wordings that vary it (frames, articles, numerals, word orders, relation phrases), some kept out of
training so that following the meaning rather than the template can be measured."""

import itertools
from dataclasses import dataclass, fields, replace

import numpy as np

from fluxion.data.shapes import INVERSE_RELATION, Scene, ShapeObject

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PREFIXES = ("", "a photo of ")
# Relation scenes are described with their relation as drawn, its mirror image ("b right of a"), or
# as a plain pair in either order, which is how GenEval phrases its two_object prompts.
FORMS = ("relation", "inverse", "and", "and_reversed")
FORM_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
# Optional parts are drawn once per caption, not per object: GenEval's position and counting prompts name
# no colour at all ("a circle left of a square"), its colour prompts name every colour.
P_PHOTO, P_COLOR, P_SIZE, P_BACKGROUND = 0.5, 0.7, 0.3, 0.3


@dataclass(frozen=True)
class Wording:
    """The words of one caption. The defaults are the grammar of the GenEval-style spec (evals/shapes.jsonl);
    WORDINGS lists the alternatives of each field, trained and held out."""

    frame: str = "{}"                  # the whole caption: "a photo of {}"
    one: str = "a"                     # a single object's article; "a" becomes "an" before a vowel
    count: str = "{word}"              # several objects: "{word}" (three) or "{digit}" (3)
    color: str = "{color} {noun}"      # where a colour goes: "{noun} in {color}"
    small: str = "small"
    large: str = "large"
    left: str = "left of"
    right: str = "right of"
    above: str = "above"
    below: str = "below"
    clause: str = "{a} {relation} {b}"  # a relation scene: "{a} is {relation} {b}"
    pair: str = "{a} and {b}"           # a pair named without its relation
    background: str = "on a {} background"
    end: str = ""                       # "." or nothing
    degree: str = ""                    # an adverb before the relation: "a circle directly left of a square"
    adjective: str = ""                 # a word before every noun phrase that says nothing drawn: "a plain circle"

    def relation(self, relation: str) -> str:
        return {"left of": self.left, "right of": self.right, "above": self.above, "below": self.below}[relation]


# field -> (trained wordings, held-out wordings). The first trained wording is the default (the spec's).
# Held-out wordings never appear in training captions; evals/shapes-phrasings.jsonl is the spec in them.
WORDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "frame": (("{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}",
               "an illustration of {}", "{} in the picture"), ("a rendering of {}", "a scene showing {}")),
    "one": (("a", "one"), ("a single",)),
    "count": (("{word}", "{digit}"), ("exactly {word}",)),
    "color": (("{color} {noun}", "{noun} in {color}", "{noun} painted {color}", "{noun} drawn in {color}"),
              ("{noun} coloured {color}",)),
    "small": (("small", "little"), ("tiny",)),
    "large": (("large", "big"), ("huge",)),
    "left": (("left of", "to the left of", "on the left of"), ("on the left side of",)),
    "right": (("right of", "to the right of", "on the right of"), ("on the right side of",)),
    "above": (("above", "on top of", "higher than", "atop"), ("over",)),
    "below": (("below", "beneath", "lower than", "underneath"), ("under",)),
    "clause": (("{a} {relation} {b}", "{a} is {relation} {b}", "{a} lies {relation} {b}",
                "{a} is placed {relation} {b}"), ("{a} sits {relation} {b}",)),
    "pair": (("{a} and {b}", "{a} plus {b}", "{a} as well as {b}", "{a} alongside {b}"), ("both {a} and {b}",)),
    "background": (("on a {} background", "on {}", "against a {} background"), ("with a {} background",)),
    "end": (("", "."), ()),
}
# The "rich" captions: each field's trained wordings above and these, which fill the frames, verbs and relations
# with many more words and put fillers ("directly", "plain") between the ones that matter, so that no word the
# model meets is tied to where the content words sit. None is a held-out word or shares a stem with one (no
# "show", "side", "sit", "with", "colored").
RICH_EXTRA: dict[str, tuple[str, ...]] = {
    "frame": ("a view of {}", "a sketch of {}", "a diagram of {}", "a graphic of {}", "a depiction of {}",
              "an example of {}", "a snapshot of {}", "a photograph of {}", "an artwork of {}", "a poster of {}",
              "a painting of {}", "a simple picture of {}", "a clean drawing of {}", "a flat illustration of {}",
              "a digital image of {}", "an icon of {}", "here is {}", "we see {}", "look at {}", "{} on display",
              "{} in flat style"),
    "one": ("just one", "only one", "a lone"),
    "count": ("precisely {word}", "a total of {word}", "{word} separate"),
    "color": ("{noun} shaded {color}", "{noun} tinted {color}", "{noun} in solid {color}"),
    "small": ("smaller", "compact", "petite"),
    "large": ("giant", "enormous", "massive"),
    "left": ("at the left of", "leftward of", "left from"),
    "right": ("at the right of", "rightward of", "right from"),
    "above": ("up above", "higher up than", "further up than"),
    "below": ("down below", "lower down than", "further down than"),
    "clause": ("{a} stands {relation} {b}", "{a} appears {relation} {b}", "{a} is located {relation} {b}",
               "{a} rests {relation} {b}", "{a} is found {relation} {b}", "{a} is positioned {relation} {b}",
               "{a} can be seen {relation} {b}"),
    "pair": ("{a}, {b}", "{a} and also {b}", "{a} in addition to {b}", "{a} and then {b}"),
    "background": ("in front of a {} background", "on a plain {} background", "set against {}",
                   "on a {} backdrop"),
    "degree": ("", "directly", "just", "slightly", "clearly", "somewhat", "immediately", "roughly", "a bit"),
    "adjective": ("", "simple", "plain", "flat", "solid", "neat", "clean", "basic"),
}
_NONE: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
RICH_WORDINGS = {f.name: (WORDINGS.get(f.name, _NONE)[0] + RICH_EXTRA.get(f.name, ()), WORDINGS.get(f.name, _NONE)[1])
                 for f in fields(Wording)}


def caption_wordings(mode: str) -> dict | None:
    """The wordings table a dataset's caption mode draws from (None: "templates", the spec's wording only)."""
    return {"templates": None, "varied": WORDINGS, "rich": RICH_WORDINGS}[mode]


# With reading order, the plain forms ("a circle and a square", FORM_WEIGHTS' last 0.3) always name the left or
# upper object first; relation captions that do so this often bring all pair captions to one half (balance_order).
P_LEFT_OR_UPPER_FIRST = (0.5 - sum(FORM_WEIGHTS[2:])) / (1 - sum(FORM_WEIGHTS[2:]))
P_DEFAULT_WORDING = 0.4  # each field keeps the spec's wording this often, so the spec's phrasing stays common


def draw_wording(rng: np.random.Generator, table: dict = WORDINGS) -> Wording:
    """A random trained wording of `table` (WORDINGS or RICH_WORDINGS), field by field; fields it lacks keep the
    default."""
    choices = {}
    for f in fields(Wording):
        if f.name not in table:
            continue
        trained = table[f.name][0]
        u = rng.random()  # one draw per field: below P_DEFAULT_WORDING the default, above it the others in turn
        k = 0 if u < P_DEFAULT_WORDING or len(trained) == 1 else \
            1 + min(int((u - P_DEFAULT_WORDING) / (1 - P_DEFAULT_WORDING) * (len(trained) - 1)), len(trained) - 2)
        choices[f.name] = trained[k]
    return _sentence_unframed(Wording(**choices))


def _sentence_unframed(wording: Wording) -> Wording:
    """A clause that is a sentence ("a circle is left of a square") is not put in a frame ("a photo of ...")."""
    if wording.clause != Wording.clause and wording.frame != Wording.frame:
        return replace(wording, clause=Wording.clause)
    return wording


def held_out_wording(rng: np.random.Generator, used: tuple[str, ...], p: float = 0.5) -> Wording:
    """A wording with held-out words in some of the `used` fields (each with probability `p`, at least one),
    trained defaults elsewhere."""
    candidates = [name for name in used if WORDINGS[name][1]]
    chosen = [name for name in candidates if rng.random() < p] or [candidates[rng.integers(len(candidates))]]
    if "clause" in chosen and "frame" in chosen:  # a sentence is not framed (_sentence_unframed)
        chosen.remove("frame")
    return replace(Wording(), **{name: WORDINGS[name][1][rng.integers(len(WORDINGS[name][1]))] for name in chosen})


@dataclass(frozen=True)
class CaptionStyle:
    prefix: str = ""
    color: bool = True
    size: bool = False
    background: bool = False
    form: str = "relation"   # used by relation scenes only
    wording: Wording = Wording()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: str, count: int = 1, color: str | None = None, size: str | None = None,
                wording: Wording = Wording()) -> str:
    """'a small red circle', 'two blue squares', 'an orange triangle' (or as `wording` phrases them)."""
    noun = shape if count == 1 else shape + "s"
    if color:
        noun = wording.color.format(color=color, noun=noun)
    if size:  # the size comes first: "a small red circle", "a small circle in red"
        noun = f"{wording.small if size == 'small' else wording.large} {noun}"
    if wording.adjective:
        noun = f"{wording.adjective} {noun}"
    if count > 1:
        return f"{wording.count.format(word=NUMBER_WORDS[count], digit=count)} {noun}"
    return f"{_article(noun) if wording.one == 'a' else wording.one} {noun}"


def _object_phrase(obj: ShapeObject, style: CaptionStyle, count: int = 1) -> str:
    return noun_phrase(obj.shape, count, obj.color if style.color else None, obj.size if style.size else None,
                       style.wording)


def describe(scene: Scene, style: CaptionStyle) -> str:
    """The caption of `scene` in the given style."""
    first, w = scene.objects[0], style.wording
    if scene.relation is None:
        body = _object_phrase(first, style, len(scene.objects))
    else:
        a, b = (_object_phrase(o, style) for o in scene.objects)
        relation, inverse = w.relation(scene.relation), w.relation(INVERSE_RELATION[scene.relation])
        if w.degree:
            relation, inverse = f"{w.degree} {relation}", f"{w.degree} {inverse}"
        body = {"relation": w.clause.format(a=a, relation=relation, b=b),
                "inverse": w.clause.format(a=b, relation=inverse, b=a),
                "and": w.pair.format(a=a, b=b),
                "and_reversed": w.pair.format(a=b, b=a)}[style.form]
    suffix = " " + w.background.format(scene.background) if style.background else ""
    return w.frame.format(f"{style.prefix}{body}{suffix}") + w.end


def caption_styles(scene: Scene) -> list[CaptionStyle]:
    """Every style `caption` can draw for this scene in the default wording."""
    forms = FORMS if scene.relation is not None else ("relation",)
    return [CaptionStyle(*opts) for opts in itertools.product(PREFIXES, (True, False), (True, False),
                                                              (True, False), forms)]


def caption(scene: Scene, rng: np.random.Generator, reading_order: bool = False,
            wordings: dict | None = None, balance_order: bool = False) -> str:
    """A random caption of `scene`; every caption names each object's shape and count and the relation
    (unless it uses the plain 'a and b' form), and any colour, size or background it names is the drawn one.
    With `reading_order`, the plain form names the left (or upper) object first. Given `wordings` (WORDINGS
    or RICH_WORDINGS), the words too are drawn (draw_wording: frames, articles, numerals, word orders, relation
    phrases; never held-out ones); without, the caption keeps the spec's wording. With `reading_order` and
    `balance_order`, a relation caption names the right (or lower) object first often enough that half of all pair
    captions do: reading order then tells nothing, and the relation phrase must be read."""
    u = rng.random(5)
    form = FORMS[min(int(np.searchsorted(np.cumsum(FORM_WEIGHTS), u[4], side="right")), len(FORMS) - 1)]
    if reading_order and form in ("and", "and_reversed"):
        form = "and" if scene.relation in ("left of", "above") else "and_reversed"
    elif reading_order and balance_order and scene.relation is not None:
        left_or_upper_first = rng.random() < P_LEFT_OR_UPPER_FIRST
        form = "relation" if left_or_upper_first == (scene.relation in ("left of", "above")) else "inverse"
    style = CaptionStyle(prefix=PREFIXES[int(u[0] < P_PHOTO)], color=bool(u[1] < P_COLOR),
                         size=bool(u[2] < P_SIZE), background=bool(u[3] < P_BACKGROUND), form=form)
    if wordings is not None:  # the frame takes the place of the prefix
        style = replace(style, prefix="", wording=draw_wording(rng, wordings))
    return describe(scene, style)
