"""The pictures of the tiny family in the README: the same prompts and seeds through each shipped model, at each
of four sizes (--sizes), and (--star) through tiny-dev and tiny-schnell without and with the built-in star LoRA.

    python docs/family_grid.py --out docs/tiny-family.png
    python docs/family_grid.py --sizes --out docs/tiny-family-sizes.png
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
SIZE_PROMPTS = ["three orange circles on a black background", "a blue circle right of a red triangle",
                "two green squares", "a purple circle above a yellow square", "a photo of a red triangle",
                "a scene showing a single square sits under a single triangle", "a purple triangle",
                "4 blue circles in the picture"]
SIZES = [(64, 64), (128, 128), (64, 128), (128, 64)]  # (width, height)
SIZE_ROWS = [(model, steps, None, size) for model, steps in (("tiny-pro", 20), ("tiny-dev", 20), ("tiny-schnell", 4))
             for size in SIZES]
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


def family_grid(rows: list[tuple], prompts: list[str], cell: int = CELL) -> Image.Image:
    """One row per (model, steps, LoRA or None[, (width, height)]); each image fitted into a cell, enlarged by
    nearest neighbour so its pixels stay visible."""
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (LABEL_WIDTH + cell * len(prompts), HEADER + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, prompt in enumerate(prompts):
        draw.multiline_text((LABEL_WIDTH + col * cell + 3, 3), _wrap(prompt), fill="black", font=font, spacing=1)
    pipes = {}
    for row, (model, steps, lora, *size) in enumerate(rows):
        if (model, lora) not in pipes:
            pipes[model, lora] = Pipeline.from_pretrained(model, device="cpu")
            if lora:
                pipes[model, lora].load_lora(lora)
        pipe = pipes[model, lora]
        width, height = size[0] if size else (pipe.defaults.size, pipe.defaults.size)
        y = HEADER + row * cell
        label = f"{model}\n{steps} step{'s' * (steps > 1)}" + (f"\n+ LoRA {lora}" if lora else "") + \
            (f"\n{width}x{height}" if size else "")
        draw.multiline_text((4, y + cell // 2 - 12), label, fill="black", font=font)
        images = pipe(prompts, num_inference_steps=steps, seed=list(range(len(prompts))), width=width, height=height)
        for col, image in enumerate(images):
            scale = (cell - 4) / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + col * cell + 2 + (cell - 4 - image.width) // 2,
                                y + 2 + (cell - 4 - image.height) // 2))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/tiny-family.png"))
    parser.add_argument("--star", action="store_true", help="the star LoRA's before/after grid instead")
    parser.add_argument("--sizes", action="store_true", help="the family at 64x64, 128x128, 64x128 and 128x64")
    args = parser.parse_args()
    if args.star:
        sheet = family_grid(STAR_ROWS, STAR_PROMPTS)
    elif args.sizes:
        sheet = family_grid(SIZE_ROWS, SIZE_PROMPTS, cell=132)
    else:
        sheet = family_grid(ROWS, PROMPTS)
    atomic_write(args.out, lambda tmp: sheet.save(tmp, format="PNG", optimize=True))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
