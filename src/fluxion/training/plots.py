"""Pictures of a run: the loss curve (matplotlib, Agg canvas) and image grids, written atomically."""

import logging
import math
from pathlib import Path

from PIL import Image

from ..files import atomic_write

log = logging.getLogger(__name__)


def save_image(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def image_grid(images: list[Image.Image], cols: int, pad: int = 2, background=(128, 128, 128),
               min_side: int = 128) -> Image.Image:
    """Images laid out row by row, `cols` per row, each cell as large as the largest image; small images are
    enlarged by an integer factor (nearest neighbour, so pixels stay visible) to at least `min_side`."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    factor = max(1, -(-min_side // max(min(im.width, im.height) for im in images)))
    images = [im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in images]
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad) + (w - im.width) // 2, pad + r * (h + pad) + (h - im.height) // 2))
    return grid


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average, as TensorBoard's smoothing; by default over ~1/30 of the
    curve, so a short curve is not dragged behind its points."""
    if weight is None:
        weight = 1 - 1 / max(1, len(values) // 30)
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def loss_curve(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Plot `loss` against `step` from metrics rows; None (with a warning) if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("loss curve skipped: matplotlib is not installed (pip install 'fluxion[train]')")
        return None
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    # A bare Figure renders through the Agg canvas on savefig: no pyplot, no global backend switch.
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed")
    if all(v > 0 for v in losses):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
