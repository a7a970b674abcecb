"""A geometric object detector for shapes-world images: palette segmentation, components, shape by moments and hull."""

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from fluxion.data.shapes import BACKGROUNDS, PALETTE
from fluxion.errors import InputError

_COLOR_NAMES = tuple(PALETTE)
_COLOR_RGB = np.array([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)   # (K, 3)


@dataclass
class DetectorConfig:
    # A pixel belongs to colour c when it is at least `min_alpha` of the way from the background to c
    # (anti-aliased edges below that are ignored) and within `color_threshold` (RGB units) of that blend line.
    min_alpha: float = 0.5
    color_threshold: float = 70.0
    # Components smaller than this fraction of the image (and than `min_pixels`) are noise.
    min_area_frac: float = 0.002
    min_pixels: int = 6
    # A component is split by colour when two colours each hold a connected region this large (a fraction of
    # the component): touching objects; scattered pixels of a neighbouring colour stay with the majority.
    split_fraction: float = 0.1
    # Shape decision, on the features of `_shape_features`; thresholds sit between the rendered shapes'
    # ranges measured under blur and noise (triangle skew <= -0.24, others >= -0.17; square kurtosis
    # <= 2.4 at blur 1.5 px and <= 1.92 sharp, circle >= 2.56; star solidity <= 0.8 sharp, convex >= 0.85).
    triangle_skew: float = -0.3
    star_solidity: float = 0.8
    # A blurred star (the tiny VAE rounds its concave corners: solidity 0.81-0.93) is still five-fold: its
    # r^2-weighted 5th angular harmonic is 0.45-0.56 rendered and 0.11-0.32 for large stars through the tiny VAE,
    # against <= 0.06 for 95% of circles and squares either way (triangles, 0.07-0.18, have a larger 3rd).
    star_harmonic: float = 0.1
    square_kurtosis: float = 2.3


@dataclass
class Detection:
    cls: str
    color: str
    bbox: tuple[float, float, float, float]   # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
    centroid: tuple[float, float]             # (x, y) in pixels
    area: int                                 # pixels
    # The shape features of `_shape_features`; None for detections made some other way.
    fill: float | None = None
    solidity: float | None = None
    skew: float | None = None
    kurtosis: float | None = None
    fivefold: float | None = None
    threefold: float | None = None
    fourfold: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def to_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {array.shape} {array.dtype}")
    return array


def background_color(array: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border ring: scenes keep a margin free, so the border is background."""
    ring = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])
    return np.median(ring, axis=0).astype(np.float32)


def background_name(array: np.ndarray) -> str:
    bg = background_color(array)
    return min(BACKGROUNDS, key=lambda name: float(np.abs(np.array(BACKGROUNDS[name]) - bg).sum()))


def color_map(array: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """(H, W) palette index per pixel, -1 for background and edge pixels."""
    bg = background_color(array)
    q = array.astype(np.float32) - bg                        # (H, W, 3), offset from the background
    d = _COLOR_RGB - bg                                      # (K, 3), background -> colour
    alpha = np.clip(q @ d.T / np.maximum((d * d).sum(1), 1.0), 0.0, 1.0)   # (H, W, K)
    residual = np.linalg.norm(q[..., None, :] - alpha[..., None] * d, axis=-1)  # (H, W, K)
    # Pick the blend line first, then ask for enough coverage: thresholding alpha before the choice would
    # hand a 49%-red edge pixel to orange, whose line passes nearby with a larger alpha.
    best = residual.argmin(-1)
    keep = ((np.take_along_axis(residual, best[..., None], -1)[..., 0] < config.color_threshold)
            & (np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= config.min_alpha))
    return np.where(keep, best, -1)


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative values of `classes` (H, W); returns labels (-1 elsewhere)
    that are the flat index of one pixel of the component. Min-label propagation to the 4 neighbours, with
    pointer jumping (a label is replaced by its own pixel's label) so labels travel far in few numpy passes."""
    h, w = classes.shape
    fg = classes >= 0
    big = h * w
    labels = np.where(fg, np.arange(big).reshape(h, w), big)
    right = fg[:, :-1] & (classes[:, :-1] == classes[:, 1:])   # pixel joined to its right neighbour
    down = fg[:-1] & (classes[:-1] == classes[1:])             # pixel joined to the one below
    while True:
        new = labels.copy()
        np.minimum(new[:, :-1], np.where(right, labels[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(right, labels[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:-1], np.where(down, labels[1:], big), out=new[:-1])
        np.minimum(new[1:], np.where(down, labels[:-1], big), out=new[1:])
        flat = np.append(new.ravel(), big)
        new = flat[flat[new]]   # jump twice along the chain of labels
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_features(ys: np.ndarray, xs: np.ndarray) -> dict[str, float]:
    """Shape descriptors of a pixel set. Moments are used where they can be, as a stray edge pixel or a
    blurred corner barely moves them (it can move a bounding box by a pixel, a lot for a 10 px object):
    - skew: third moment of y; an upward triangle's mass sits low, -0.57 (others ~0; a star ~-0.1..0.1);
    - kurtosis: (mu40 + mu04) / (2 mu22), 1.8 for an axis-aligned square, 3 for anything isotropic;
    - solidity: area / convex hull area (hull over pixel corners, so a full square is 1); a star ~0.6-0.75;
    - fivefold, threefold, fourfold: |sum r^2 e^(i k theta)| / sum r^2 about the centroid for k = 5, 3, 4: the
      share of the mass's spread in k-fold symmetry (a star's five arms; a triangle 3, a square 4, a circle ~0);
    - fill: area / bounding box area (reported only)."""
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    area = len(xs)
    x, y = xs - xs.mean(), ys - ys.mean()
    m02, m22 = (y * y).mean(), (x * x * y * y).mean()
    skew = (y ** 3).mean() / m02 ** 1.5 if m02 > 0 else 0.0
    kurtosis = ((x ** 4).mean() + (y ** 4).mean()) / (2 * m22) if m22 > 0 else float("inf")
    # Row extremes suffice for the hull: (N rows) x 4 corners instead of every pixel.
    rows = ys - y0
    lo = np.full(y1 - y0, x1, dtype=np.int64)
    hi = np.full(y1 - y0, x0 - 1, dtype=np.int64)
    np.minimum.at(lo, rows, xs)
    np.maximum.at(hi, rows, xs)
    r = np.nonzero(hi >= lo)[0]
    yy = (r + y0).astype(np.int64)
    corners = np.concatenate([np.stack([lo[r], yy], 1), np.stack([lo[r], yy + 1], 1),
                              np.stack([hi[r] + 1, yy], 1), np.stack([hi[r] + 1, yy + 1], 1)])
    hull = _hull_area(corners)
    r2, theta = x * x + y * y, np.arctan2(y, x)
    fold = {k: float(abs((r2 * np.exp(1j * k * theta)).sum()) / r2.sum()) if r2.sum() > 0 else 0.0 for k in (3, 4, 5)}
    return {"fill": area / float((x1 - x0) * (y1 - y0)), "solidity": area / hull if hull > 0 else 0.0,
            "skew": float(skew), "kurtosis": float(kurtosis), "fivefold": fold[5], "threefold": fold[3],
            "fourfold": fold[4]}


def classify_shape(features: dict[str, float], config: DetectorConfig) -> str:
    if features["skew"] <= config.triangle_skew:
        return "triangle"
    five = features.get("fivefold", 0.0)
    if features["solidity"] < config.star_solidity or (
            five >= config.star_harmonic and five > features.get("threefold", 0.0)
            and five > features.get("fourfold", 0.0)):
        return "star"
    return "square" if features["kurtosis"] < config.square_kurtosis else "circle"


def _objects(classes: np.ndarray, min_area: float, config: DetectorConfig):
    """(mask, palette index) per object. Components are taken over all foreground pixels, so noise that flips
    single pixels to a neighbouring colour (orange/yellow) does not fragment an object; its colour is the
    majority. A component is split by colour only when a second colour forms a region of its own
    (touching objects of different colours)."""
    objects = []
    fg_labels = label_components(np.where(classes >= 0, 0, -1))
    color_labels = label_components(classes)
    ids, counts = np.unique(fg_labels[fg_labels >= 0], return_counts=True)
    for label, count in zip(ids[counts >= min_area], counts[counts >= min_area]):
        mask = fg_labels == label
        regions, sizes = np.unique(color_labels[mask], return_counts=True)
        keep = sizes >= max(min_area, config.split_fraction * count)
        if len({int(classes.flat[r]) for r in regions[keep]}) >= 2:
            objects += [(color_labels == r, int(classes.flat[r])) for r in regions[keep]]
        else:
            objects.append((mask, int(np.bincount(classes[mask], minlength=len(_COLOR_NAMES)).argmax())))
    return objects


def detect(image, config: DetectorConfig | None = None) -> list[Detection]:
    """Objects in a shapes-world image (PIL image or (H, W, 3) uint8 array), largest first."""
    config = config or DetectorConfig()
    array = to_array(image)
    classes = color_map(array, config)
    min_area = max(config.min_pixels, config.min_area_frac * array.shape[0] * array.shape[1])
    detections = []
    for mask, color in _objects(classes, min_area, config):
        ys, xs = np.nonzero(mask)
        features = _shape_features(ys, xs)
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        centroid = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
        detections.append(Detection(classify_shape(features, config), _COLOR_NAMES[color], bbox, centroid, len(xs),
                                    **{k: round(v, 4) for k, v in features.items()}))
    # GenEval keeps each class's detections in decreasing confidence; size stands in for confidence here.
    return sorted(detections, key=lambda d: -d.area)
