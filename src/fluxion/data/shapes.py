"""The shapes world: vocabulary, scenes of flat shapes, and seeded scene sampling laid out per bucket."""

import math
from dataclasses import dataclass

import numpy as np

from fluxion.errors import InputError

# Pure, well separated RGB values: the detector segments by nearest palette colour, so the closest pair
# (orange/yellow, red/orange) is kept >= 90 apart in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 20),
    "green": (0, 170, 50),
    "blue": (20, 70, 240),
    "yellow": (255, 230, 0),
    "purple": (150, 40, 210),
    "orange": (255, 130, 0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
TRAIN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
ALL_SHAPES: tuple[str, ...] = TRAIN_SHAPES + ("star",)
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_COUNT = 4
P_RELATION = 0.4  # default share of two-object relation scenes; the rest are 1-4 copies of one object

# Kept out of every training scene: the model must compose these from parts it has seen (held-out pairs)
# or learn them later from a LoRA (the star).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("orange", "square")})
HELD_OUT_SHAPES: frozenset[str] = frozenset({"star"})

# (height, width); every side a multiple of 16 so that latents pack into 2x2 patches.
BUCKETS: tuple[tuple[int, int], ...] = ((64, 64), (48, 80), (80, 48))

# Object extents as fractions of sqrt(H*W), so objects look alike across buckets of equal area.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.17, 0.22), "large": (0.29, 0.36)}
MARGIN_FRAC = 0.04   # free border, so the detector reads the background from the image's edge
GAP_FRAC = 0.08      # minimum free space between two objects
# A relation's objects are offset along the other axis by at most this fraction of their offset along the
# relation's axis, which keeps GenEval's position test (threshold 0.1) from also seeing a second relation.
ACROSS_RATIO = 0.3
# Where a pair's objects go along the relation's axis. "spread": anywhere, in order. "halves": each in its own
# half of the canvas (as "spread" places all but a few pairs in a hundred); ShapesDataset then also names a pair
# without its relation ("a X and a Y") in reading order, so that word order says where each object goes.
LAYOUTS: tuple[str, ...] = ("spread", "halves")


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str                     # "small" or "large"
    center: tuple[float, float]   # (x, y) in pixels of the scene's canvas
    extent: float                 # side of the object's square bounding box, in pixels

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        x, y = self.center
        h = self.extent / 2
        return (x - h, y - h, x + h, y + h)


@dataclass(frozen=True)
class Scene:
    """Either 1-4 identical objects (`relation` None), or two objects with `objects[0] <relation> objects[1]`."""

    height: int
    width: int
    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise InputError(f"background {self.background!r} is not one of {sorted(BACKGROUNDS)}")
        if self.relation is not None and (self.relation not in RELATIONS or len(self.objects) != 2):
            raise InputError(f"relation {self.relation!r} needs one of {RELATIONS} and exactly 2 objects, "
                             f"got {len(self.objects)}")
        if not 1 <= len(self.objects) <= MAX_COUNT:
            raise InputError(f"a scene holds 1-{MAX_COUNT} objects, got {len(self.objects)}")

    @property
    def is_held_out(self) -> bool:
        return any(is_held_out(o.color, o.shape) for o in self.objects)


def is_held_out(color: str | None, shape: str) -> bool:
    return shape in HELD_OUT_SHAPES or (color, shape) in HELD_OUT_PAIRS


def check_layout(layout: str):
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r} is not one of {LAYOUTS}")


def _check_vocab(shape: str, color: str | None = None):
    if shape not in ALL_SHAPES:
        raise InputError(f"shape {shape!r} is not one of {ALL_SHAPES}")
    if color is not None and color not in PALETTE:
        raise InputError(f"color {color!r} is not one of {COLORS}")


def _extent(rng: np.random.Generator, size: str, height: int, width: int) -> float:
    lo, hi = SIZE_RANGE[size]
    return float(rng.uniform(lo, hi) * math.sqrt(height * width))


def _pick_color(rng: np.random.Generator, shape: str, allow_held_out: bool) -> str:
    colors = [c for c in COLORS if allow_held_out or (c, shape) not in HELD_OUT_PAIRS]
    return colors[rng.integers(len(colors))]


def _grid_layout(rng: np.random.Generator, n: int, extent: float, height: int, width: int):
    """Centres of `n` copies in distinct cells of a jittered grid (no overlap by construction), and the extent
    shrunk if even the roomiest grid is too tight."""
    margin = MARGIN_FRAC * math.sqrt(height * width)
    gap = GAP_FRAC * math.sqrt(height * width)
    inner_h, inner_w = height - 2 * margin, width - 2 * margin
    grids = [(r, c) for r in range(1, n + 1) for c in range(1, n + 1) if n <= r * c <= n + 2]
    room = {g: min(inner_h / g[0], inner_w / g[1]) - gap for g in grids}
    fitting = [g for g in grids if room[g] >= extent]
    if not fitting:  # e.g. four large objects in a 48-high bucket
        fitting = [max(grids, key=room.get)]
        extent = room[fitting[0]]
    rows, cols = fitting[rng.integers(len(fitting))]
    cells = rng.permutation(rows * cols)[:n]
    cell_h, cell_w = inner_h / rows, inner_w / cols
    centers = []
    for cell in cells:
        r, c = divmod(int(cell), cols)
        # Half a gap inside each cell edge keeps neighbours a full gap apart; max(): where the shrunk extent fills
        # its cell exactly, rounding may put the range's end a hair below its start.
        lo = gap / 2 + extent / 2
        x = margin + c * cell_w + rng.uniform(lo, max(lo, cell_w - gap / 2 - extent / 2))
        y = margin + r * cell_h + rng.uniform(lo, max(lo, cell_h - gap / 2 - extent / 2))
        centers.append((float(x), float(y)))
    return centers, extent


def _relation_layout(rng: np.random.Generator, relation: str, ext_a: float, ext_b: float, height: int,
                     width: int, layout: str = "spread"):
    """Centres of a and b with `a <relation> b`: separated by a gap along the relation's axis (in order, or
    each in its own half: LAYOUTS), and offset across it by at most ACROSS_RATIO of the offset along it."""
    if relation in ("right of", "below"):
        (cb, ca), (ext_b, ext_a) = _relation_layout(rng, INVERSE_RELATION[relation], ext_b, ext_a, height, width,
                                                    layout)
        return (ca, cb), (ext_a, ext_b)
    horizontal = relation == "left of"
    along, across = (width, height) if horizontal else (height, width)
    margin = MARGIN_FRAC * math.sqrt(height * width)
    gap = GAP_FRAC * math.sqrt(height * width)
    room = along - 2 * margin - gap
    if ext_a + ext_b > room:  # two large objects stacked in a 48-high bucket
        shrink = room / (ext_a + ext_b)
        ext_a, ext_b = ext_a * shrink, ext_b * shrink
    if layout == "halves":
        # The gap straddles the middle, moved off it only as far as an object too large for its half needs.
        split = min(max(along / 2, margin + ext_a + gap / 2), along - margin - ext_b - gap / 2)
        lo_a, lo_b = margin + ext_a / 2, split + gap / 2 + ext_b / 2
        pos_a = rng.uniform(lo_a, max(lo_a, split - gap / 2 - ext_a / 2))  # max: rounding where an object
        pos_b = rng.uniform(lo_b, max(lo_b, along - margin - ext_b / 2))   # fills its whole range
    else:  # split the free length at random between the outer margins and the gap
        free = max(room - ext_a - ext_b, 0.0)
        u, v = sorted(rng.uniform(0, free, size=2))
        pos_a = margin + u + ext_a / 2
        pos_b = pos_a + ext_a / 2 + gap + (v - u) + ext_b / 2
    # The larger object is placed across first: the smaller one's valid range then contains it.
    max_off = ACROSS_RATIO * (pos_b - pos_a)
    big, small = (ext_a, ext_b) if ext_a >= ext_b else (ext_b, ext_a)
    across_big = rng.uniform(margin + big / 2, across - margin - big / 2)
    lo = max(margin + small / 2, across_big - max_off)
    hi = min(across - margin - small / 2, across_big + max_off)
    across_small = rng.uniform(lo, hi)
    across_a, across_b = (across_big, across_small) if ext_a >= ext_b else (across_small, across_big)
    if horizontal:
        return ((float(pos_a), float(across_a)), (float(pos_b), float(across_b))), (ext_a, ext_b)
    return ((float(across_a), float(pos_a)), (float(across_b), float(pos_b))), (ext_a, ext_b)


def group_scene(rng: np.random.Generator, bucket: tuple[int, int], shape: str, color: str, count: int,
                size: str, background: str) -> Scene:
    """`count` identical objects (same shape, colour and size) at random non-overlapping places."""
    _check_vocab(shape, color)
    if not 1 <= count <= MAX_COUNT:
        raise InputError(f"count must be in 1..{MAX_COUNT}, got {count}")
    height, width = bucket
    centers, extent = _grid_layout(rng, count, _extent(rng, size, height, width), height, width)
    objects = tuple(ShapeObject(shape, color, size, c, extent) for c in centers)
    return Scene(height, width, background, objects)


def relation_scene(rng: np.random.Generator, bucket: tuple[int, int], a: tuple[str, str, str],
                   b: tuple[str, str, str], relation: str, background: str, layout: str = "spread") -> Scene:
    """Two objects given as (shape, color, size) with `a <relation> b`, placed as `layout` (LAYOUTS) says."""
    for shape, color, _ in (a, b):
        _check_vocab(shape, color)
    if relation not in RELATIONS:
        raise InputError(f"relation {relation!r} is not one of {RELATIONS}")
    check_layout(layout)
    height, width = bucket
    ext = (_extent(rng, a[2], height, width), _extent(rng, b[2], height, width))
    (ca, cb), (ea, eb) = _relation_layout(rng, relation, *ext, height, width, layout)
    objects = (ShapeObject(a[0], a[1], a[2], ca, ea), ShapeObject(b[0], b[1], b[2], cb, eb))
    return Scene(height, width, background, objects, relation)


def sample_scene(rng: np.random.Generator, bucket: tuple[int, int], *, allow_held_out: bool = False,
                 shapes: tuple[str, ...] = TRAIN_SHAPES, p_relation: float = P_RELATION,
                 layout: str = "spread") -> Scene:
    """A random scene for `bucket` (height, width). Without `allow_held_out`, never a held-out pair or shape."""
    if not allow_held_out and any(s in HELD_OUT_SHAPES for s in shapes):
        raise InputError(f"shapes {shapes} include held-out shapes {sorted(HELD_OUT_SHAPES)}; "
                         f"pass allow_held_out=True to sample them")
    for s in shapes:
        _check_vocab(s)
    background = ("white", "black")[rng.integers(2)]
    if len(shapes) >= 2 and rng.random() < p_relation:
        i, j = rng.choice(len(shapes), size=2, replace=False)
        a, b = ((shapes[k], _pick_color(rng, shapes[k], allow_held_out), SIZES[rng.integers(2)]) for k in (i, j))
        return relation_scene(rng, bucket, a, b, RELATIONS[rng.integers(len(RELATIONS))], background, layout)
    shape = shapes[rng.integers(len(shapes))]
    return group_scene(rng, bucket, shape, _pick_color(rng, shape, allow_held_out),
                       int(rng.integers(1, MAX_COUNT + 1)), SIZES[rng.integers(2)], background)


def scene_from_spec(entry: dict, rng: np.random.Generator, bucket: tuple[int, int]) -> Scene:
    """A scene satisfying a GenEval-style spec entry (`include` with class/count/color/position); colours,
    sizes and unspecified relations are drawn from `rng`, the background from `entry["background"]` if given."""
    include = entry.get("include", [])
    background = entry.get("background") or ("white", "black")[rng.integers(2)]

    def attrs(req):
        _check_vocab(req["class"], req.get("color"))
        color = req.get("color") or _pick_color(rng, req["class"], allow_held_out=True)
        return req["class"], color, SIZES[rng.integers(2)]

    if len(include) == 1:
        shape, color, size = attrs(include[0])
        return group_scene(rng, bucket, shape, color, int(include[0].get("count", 1)), size, background)
    pair = len(include) == 2 and include[0]["class"] != include[1]["class"]
    if pair and all(r.get("count", 1) == 1 for r in include):
        target, subject = attrs(include[0]), attrs(include[1])
        if "position" in include[1]:
            relation, index = include[1]["position"]
            if index != 0:
                raise InputError(f"spec entry {entry.get('prompt')!r}: position target must be 0, got {index}")
        else:
            relation = RELATIONS[rng.integers(len(RELATIONS))]
        return relation_scene(rng, bucket, subject, target, relation, background)
    raise InputError(f"spec entry {entry.get('prompt')!r}: the shapes world renders one class (count 1-4) or two "
                     f"different classes (count 1 each), got include={include}")
