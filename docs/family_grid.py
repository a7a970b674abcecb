"""The pictures of the tiny family in the README: the same prompts and seeds through each shipped model, and
(--star) through tiny-dev and tiny-schnell without and with the built-in star LoRA.

    python docs/family_grid.py --out docs/tiny-family.png
    python docs/family_grid.py --star --out docs/lora-star.png

One row per (model, steps): tiny-pro with classifier-free guidance, tiny-dev with distilled guidance, tiny-schnell at
4, 2 and 1 steps, each at its own default guidance; one column per prompt, seed = column index. The last two prompts
are held out of all training ("purple triangle", "orange square").
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fluxion import Pipeline
from fluxion.files import atomic_write

PROMPTS = ["a red circle", "two blue squares", "three yellow triangles on a black background",
           "a green square left of an orange circle", "a small purple circle above a large blue triangle",
           "a red triangle below a yellow square", "a purple triangle", "an orange square and a green circle"]
ROWS = [("tiny-pro", 20, None), ("tiny-dev", 20, None), ("tiny-schnell", 4, None), ("tiny-schnell", 2, None),
        ("tiny-schnell", 1, None)]
STAR_PROMPTS = ["a star", "a photo of a red star", "two yellow stars", "four blue stars",
                "a green star left of a purple circle", "a star above a square", "an orange star and a triangle",
                "a photo of a purple triangle"]
STAR_ROWS = [("tiny-dev", 28, None), ("tiny-dev", 28, "star"), ("tiny-schnell", 4, None), ("tiny-schnell", 4, "star")]
CELL, LABEL_WIDTH, HEADER = 96, 130, 52


def _wrap(text: str, width: int = 16) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def family_grid(rows: list[tuple[str, int, str | None]], prompts: list[str]) -> Image.Image:
    """One row per (model, steps, LoRA or None)."""
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (LABEL_WIDTH + CELL * len(prompts), HEADER + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, prompt in enumerate(prompts):
        draw.multiline_text((LABEL_WIDTH + col * CELL + 3, 3), _wrap(prompt), fill="black", font=font, spacing=1)
    for row, (model, steps, lora) in enumerate(rows):
        pipe = Pipeline.from_pretrained(model, device="cpu")
        if lora:
            pipe.load_lora(lora)
        y = HEADER + row * CELL
        label = f"{model}\n{steps} step{'s' * (steps > 1)}" + (f"\n+ LoRA {lora}" if lora else "")
        draw.multiline_text((4, y + CELL // 2 - 12), label, fill="black", font=font)
        images = pipe(prompts, num_inference_steps=steps, seed=list(range(len(prompts))))
        for col, image in enumerate(images):
            sheet.paste(image.resize((CELL - 4, CELL - 4), Image.Resampling.NEAREST),
                        (LABEL_WIDTH + col * CELL + 2, y + 2))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/tiny-family.png"))
    parser.add_argument("--star", action="store_true", help="the star LoRA's before/after grid instead")
    args = parser.parse_args()
    sheet = family_grid(STAR_ROWS, STAR_PROMPTS) if args.star else family_grid(ROWS, PROMPTS)
    atomic_write(args.out, lambda tmp: sheet.save(tmp, format="PNG", optimize=True))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
