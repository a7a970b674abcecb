"""Evaluation reports (results.json, contact sheets, a text table) and the generate-then-score loop."""

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from fluxion.errors import InputError
from fluxion.files import atomic_write
from fluxion.eval.score import evaluate, load_spec
from fluxion.metadata import PNG_KEY

logger = logging.getLogger(__name__)

CELL = 128          # images are fitted into CELL x CELL: 64 px images show at 2x
BORDER = 4
PAD = 6
TEXT_WIDTH = 220
PASS, FAIL = (40, 170, 60), (210, 40, 40)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):   # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _fit(image: Image.Image) -> Image.Image:
    """Scale to fit CELL x CELL: nearest-neighbour when enlarging, so the model's true pixels stay visible."""
    image = image.convert("RGB")
    scale = CELL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def contact_sheet(records: Sequence[dict], images: Sequence) -> Image.Image:
    """One row per spec entry: its prompt and score, then its images framed green (pass) or red (fail)."""
    rows: dict[int, list[int]] = {}
    for k, r in enumerate(records):
        rows.setdefault(r["entry"], []).append(k)
    if not rows:
        raise InputError("contact_sheet needs at least one record")
    font = _font()
    cols = max(len(ks) for ks in rows.values())
    cell = CELL + 2 * BORDER + PAD
    sheet = Image.new("RGB", (TEXT_WIDTH + cols * cell + PAD, len(rows) * cell + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, ks in enumerate(rows.values()):
        y = PAD + row * cell
        first = records[ks[0]]
        n_ok = sum(records[k]["correct"] for k in ks)
        text = _wrap(draw, first["prompt"], font, TEXT_WIDTH - 2 * PAD)
        text.append(f"[{first['tag']}] {n_ok}/{len(ks)}" + ("  held-out" if first.get("held_out") else ""))
        draw.multiline_text((PAD, y + BORDER), "\n".join(text), fill=(0, 0, 0), font=font, spacing=3)
        for col, k in enumerate(ks):
            x = TEXT_WIDTH + col * cell
            draw.rectangle((x, y, x + CELL + 2 * BORDER - 1, y + CELL + 2 * BORDER - 1),
                           fill=PASS if records[k]["correct"] else FAIL)
            draw.rectangle((x + BORDER, y + BORDER, x + BORDER + CELL - 1, y + BORDER + CELL - 1), fill=(128, 128, 128))
            tile = _fit(images[k] if isinstance(images[k], Image.Image) else Image.fromarray(np.asarray(images[k])))
            sheet.paste(tile, (x + BORDER + (CELL - tile.width) // 2, y + BORDER + (CELL - tile.height) // 2))
    return sheet


def write_report(results: dict, images: Sequence, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json and one contact sheet per tag (contact_<tag>.png); `images` are in record order.
    Returns the written paths by name."""
    records = results["records"]
    if len(images) != len(records):
        raise InputError(f"write_report got {len(images)} images for {len(records)} records")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.json"}
    atomic_write(paths["results"], lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    for tag in results["per_tag"]:
        ks = [k for k, r in enumerate(records) if r["tag"] == tag]
        paths[f"contact_{tag}"] = out_dir / f"contact_{tag}.png"
        sheet = contact_sheet([records[k] for k in ks], [images[k] for k in ks])
        atomic_write(paths[f"contact_{tag}"], lambda tmp: sheet.save(tmp, format="PNG"))
    return paths


def format_table(results: dict) -> str:
    """Per-tag accuracies, the overall score and the held-out-pair subset as a fixed-width table."""
    lines = [f"{'tag':<16}{'accuracy':>10}{'correct':>10}", "-" * 36]
    for tag, t in results["per_tag"].items():
        lines.append(f"{tag:<16}{t['accuracy']:>10.2%}{t['correct']:>6} / {t['total']}")
    lines.append("-" * 36)
    lines.append(f"{'overall':<16}{results['overall']:>10.4f}  (standard error {results['overall_se']:.3f})")
    held = results["held_out"]
    if held["total"]:
        lines.append(f"{'held_out pairs':<16}{held['accuracy']:>10.2%}{held['correct']:>6} / {held['total']}")
    binding = results.get("color_binding", {})
    if sum(binding.values()):
        # as many swapped as bound: the model does not tie colours to shapes
        lines.append("colour binding  " + ", ".join(f"{n} {k}" for k, n in binding.items()))
    return "\n".join(lines)


def run_eval(generate_fn: Callable[[list[str], list[int]], list[Image.Image]], spec_path: str | Path,
             images_per_prompt: int, out_dir: str | Path, seed: int = 0) -> dict:
    """Generate `images_per_prompt` images for every spec prompt (image j of entry i gets seed
    `seed + i * images_per_prompt + j`), score them, write the report to `out_dir` and return the results.
    The results also hold `settings` (the first image's fluxion settings, less prompt and seed, when it carries
    them) and `seconds_per_image` (generation wall time over all images, in batches of `images_per_prompt`)."""
    if images_per_prompt < 1:
        raise InputError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    entries = load_spec(spec_path)
    images, seeds = [], []
    generation_s = 0.0
    for i, entry in enumerate(tqdm(entries, desc="eval", unit="prompt")):
        entry_seeds = [seed + i * images_per_prompt + j for j in range(images_per_prompt)]
        start = time.perf_counter()
        out = generate_fn([entry["prompt"]] * images_per_prompt, entry_seeds)
        generation_s += time.perf_counter() - start
        if len(out) != images_per_prompt:
            raise InputError(f"generate_fn returned {len(out)} images for {images_per_prompt} prompts")
        images.append(list(out))
        seeds.append(entry_seeds)
    results = evaluate(entries, images, seeds=seeds)
    first = images[0][0].info.get(PNG_KEY) if isinstance(images[0][0], Image.Image) else None
    settings = {k: v for k, v in json.loads(first).items() if k not in ("prompt", "seed")} if first else None
    results = {"settings": settings, "seconds_per_image": generation_s / results["images"], **results}
    paths = write_report(results, [im for group in images for im in group], out_dir)
    logger.info("eval: overall %.4f over %d images; report in %s", results["overall"], results["images"],
                paths["results"].parent)
    return results
