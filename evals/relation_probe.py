"""Does a model follow the direction of a relation ("left of" vs "right of")? Two measures on prompts
"a red X <relation> a blue Y", read from colour centroids, so a wrong shape does not hide the answer:

- held: of the generated images showing both colours, the share where red sits on the named side of blue
  (0.5 is chance);
- mean x0: the x0 the model predicts from pure noise (t = 1), decoded, as the red-minus-blue centroid offset in
  pixels over N noise draws. A model that knows the direction moves red left for "left of" and right for
  "right of"; one blind to the direction gives both the same offset.

It first prints how much word order the text states carry: the cosine between a word's state as the subject of
"left of" and as its object ("a red circle left of a blue square" vs "a blue square left of a red circle"); and how
well the model knows where in the image a token sits: the share of the world's position pattern (its mean latent
for "a red circle on a white background", each token minus their average) that the model's mean x0 from pure noise
reproduces (1 = all of it; 512 noise draws against 512 renders, in latent space since decoding single blurry
predictions hides the pattern).

    python evals/relation_probe.py tiny-pro --images 24
"""

import argparse

import numpy as np
import torch

from fluxion import Pipeline, sampling
from fluxion.data.dataset import to_tensor
from fluxion.data.render import render
from fluxion.data.shapes import PALETTE, scene_from_spec
from fluxion.eval.detect import DetectorConfig, color_map

SIZE = 64
PAIRS = (("circle", "square"), ("triangle", "circle"))
RELATIONS = ("left of", "right of", "above", "below")


def redness(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(red, blue) mass maps (B, H, W) of (B, 3, H, W) images in [-1, 1]."""
    r, g, b = ((images.clamp(-1, 1) + 1) / 2).unbind(1)
    return (r - (g + b) / 2).clamp(min=0), (b - (r + g) / 2).clamp(min=0)


def red_minus_blue(images: torch.Tensor) -> tuple[float, float]:
    """(dx, dy) between the red and blue mass centroids of (B, 3, H, W) images in [-1, 1], over the batch."""
    red, blue = redness(images)
    xs = torch.arange(images.shape[-1], dtype=images.dtype)[None, None, :]
    ys = torch.arange(images.shape[-2], dtype=images.dtype)[None, :, None]

    def centroid(mass):
        return float((mass * xs).sum() / mass.sum()), float((mass * ys).sum() / mass.sum())

    (rx, ry), (bx, by) = centroid(red), centroid(blue)
    return rx - bx, ry - by


@torch.no_grad()
def role_similarity(pipe: Pipeline) -> dict[str, float]:
    """Cosine of each word's text state as subject vs as object of the same relation."""
    subject, obj = "a red circle left of a blue square", "a blue square left of a red circle"
    txt, _ = pipe.text_encoder.encode([subject, obj])
    # token positions ([CLS] first): a=1 red=2 circle=3 left=4 of=5 a=6 blue=7 square=8, mirrored in `obj`
    where = {"red": (2, 7), "circle": (3, 8), "blue": (7, 2), "square": (8, 3)}
    return {w: float(torch.cosine_similarity(txt[0, i], txt[1, j], dim=0)) for w, (i, j) in where.items()}


def held(pipe: Pipeline, prompt: str, relation: str, n: int) -> tuple[int, int]:
    """(images where red is on the named side of blue, images showing both colours)."""
    red, blue = list(PALETTE).index("red"), list(PALETTE).index("blue")
    ok = shown = 0
    for image in pipe([prompt] * n, seed=list(range(n)), height=SIZE, width=SIZE, num_inference_steps=20):
        labels = color_map(np.asarray(image.convert("RGB")), DetectorConfig())
        r, b = np.argwhere(labels == red), np.argwhere(labels == blue)
        if len(r) < 5 or len(b) < 5:
            continue
        (ry, rx), (by, bx) = r.mean(0), b.mean(0)
        ok += {"left of": rx < bx, "right of": rx > bx, "above": ry < by, "below": ry > by}[relation]
        shown += 1
    return ok, shown


@torch.no_grad()
def latent_x0_from_noise(pipe: Pipeline, prompt: str, seeds: range) -> torch.Tensor:
    """The model's packed x0 predictions (B, L, 64) at t = 1 from one noise draw per seed: x0 = x_1 - v."""
    n = len(seeds)
    cond = pipe.encode_prompt([prompt] * n)
    x = sampling.pack(sampling.get_noise(seeds, SIZE, SIZE)).to(pipe.device, pipe.dtype)
    ids = sampling.image_ids(n, SIZE // 8, SIZE // 8, pipe.device)
    return x - pipe.transformer(x, ids, cond.txt, cond.txt_ids, torch.ones(n, device=pipe.device), cond.vec)


@torch.no_grad()
def x0_from_noise(pipe: Pipeline, prompt: str, n: int) -> torch.Tensor:
    """The model's x0 predictions (B, 3, H, W) from n noise draws at t = 1, decoded."""
    x0 = sampling.unpack(latent_x0_from_noise(pipe, prompt, range(n)), SIZE // 8, SIZE // 8)
    return pipe.autoencoder.decode(x0).float().cpu()


@torch.no_grad()
def position_share(pipe: Pipeline, n: int = 512) -> float:
    """How much of the world's position pattern for one red circle the model's mean x0 from noise reproduces."""
    entry = {"include": [{"class": "circle", "color": "red"}], "background": "white"}
    rng = np.random.default_rng(0)
    world, model = [], []
    for k in range(n // 64):
        images = torch.stack([to_tensor(render(scene_from_spec(entry, rng, (SIZE, SIZE)))) for _ in range(64)])
        world.append(sampling.pack(pipe.autoencoder.encode(images.to(pipe.device, pipe.dtype))).float().cpu())
        model.append(latent_x0_from_noise(pipe, "a red circle on a white background", range(64 * k, 64 * k + 64))
                     .float().cpu())
    world, model = (torch.cat(parts).mean(0) for parts in (world, model))  # mean latent per token (L, 64)
    world, model = ((m - m.mean(0)).flatten() for m in (world, model))  # each token minus the average token
    return float(model @ world / (world @ world))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=24, help="images per prompt (seeds 0..N-1)")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.model, device="cpu", dtype="fp32")
    if pipe.variant != "pro":
        parser.error(f"{args.model} is a {pipe.variant} model: the mean-x0 probe calls the transformer without "
                     "guidance, which only a pro model takes")
    print("text state, subject vs object:", ", ".join(f"{w} {c:.3f}" for w, c in role_similarity(pipe).items()))
    print(f"position: the model's x0 from pure noise reproduces {position_share(pipe):.2f} of the world's "
          "position pattern")
    total_ok = total_shown = 0
    print(f"{'prompt':44s} {'held':>7s}   mean x0: dx, dy")
    for shapes in PAIRS:
        for relation in RELATIONS:
            prompt = f"a red {shapes[0]} {relation} a blue {shapes[1]}"
            ok, shown = held(pipe, prompt, relation, args.images)
            total_ok, total_shown = total_ok + ok, total_shown + shown
            dx, dy = red_minus_blue(x0_from_noise(pipe, prompt, args.images))
            print(f"{prompt:44s} {ok:3d}/{shown:<3d}   {dx:+5.1f}, {dy:+5.1f}")
    print(f"relation held in {total_ok}/{total_shown} images ({total_ok / max(total_shown, 1):.2f}; chance 0.5)")


if __name__ == "__main__":
    main()
