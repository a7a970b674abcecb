"""Anti-aliased rendering of shapes-world scenes with PIL (4x supersampling, then a box filter)."""

import math

import numpy as np
from PIL import Image, ImageDraw

from fluxion.data.shapes import BACKGROUNDS, PALETTE, Scene, ShapeObject

SUPERSAMPLE = 4
STAR_INNER_RATIO = 0.5   # inner/outer radius: fat enough arms to survive 64 px, still clearly concave

# A unit star (outer radius 1) pointing up, then normalised so its bounding box is [-0.5, 0.5]^2 scaled to
# the largest side: the star's extent is then its bounding box side, as for the other shapes.
_STAR = np.array([(math.sin(k * math.pi / 5) * (1 if k % 2 == 0 else STAR_INNER_RATIO),
                   -math.cos(k * math.pi / 5) * (1 if k % 2 == 0 else STAR_INNER_RATIO)) for k in range(10)])
_STAR = (_STAR - (_STAR.max(0) + _STAR.min(0)) / 2) / (_STAR.max(0) - _STAR.min(0)).max()


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, sx: float, sy: float):
    x, y = obj.center[0] * sx, obj.center[1] * sy
    h = obj.extent * min(sx, sy) / 2
    fill = PALETTE[obj.color]
    # PIL fills pixel (i, j) when its corner-based coordinate lies inside; shift by half a pixel so
    # shapes are centred on continuous coordinates.
    x, y = x - 0.5, y - 0.5
    if obj.shape == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    elif obj.shape == "star":
        draw.polygon([(x + 2 * h * px, y + 2 * h * py) for px, py in _STAR], fill=fill)
    else:
        raise ValueError(f"cannot draw shape {obj.shape!r}")


def render(scene: Scene, height: int | None = None, width: int | None = None) -> Image.Image:
    """The scene as an RGB image, by default at its own (height, width); other sizes rescale the layout."""
    height, width = height or scene.height, width or scene.width
    sx, sy = SUPERSAMPLE * width / scene.width, SUPERSAMPLE * height / scene.height
    canvas = Image.new("RGB", (SUPERSAMPLE * width, SUPERSAMPLE * height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, sx, sy)
    return canvas.reduce(SUPERSAMPLE)  # exact box average: edge pixels get the covered fraction
