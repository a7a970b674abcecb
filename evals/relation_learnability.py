"""How fast can a fresh transformer of a given shape learn which way "left of" points, from MiniLM states?

The same task in two versions, differing only in the image:

- halves: the left half of the image is the colour of the object on the left, the right half that of the other;
- renders: the world's render of the scene (small or large shapes, white or black background).

Both use 64x64 "left of" / "right of" scenes of two differently coloured shapes, captioned by the world's grammar
with colours named, half as drawn ("a red circle left of a blue square") and half mirrored ("a blue square right
of a red circle"). Training is at t = 1 only, where the model sees pure noise and must predict the mean layout
the caption implies: exactly what decides a relation's direction when sampling starts.

Reported per checkpoint, on held-out colour pairs: how far swapping "left of" for "right of" in a caption moves
the predicted x0 along the ideal direction (the halves image minus its mirror), as a share of how far the world's
own images move. 1 means the model has learned the direction; 0 means it ignores it.

    python evals/relation_learnability.py --steps 600
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

from fluxion.checkpoints import load_autoencoder, load_transformer
from fluxion.data.captions import CaptionStyle, describe
from fluxion.data.dataset import to_tensor
from fluxion.data.render import render
from fluxion.data.shapes import COLORS, PALETTE, SIZES, TRAIN_SHAPES, relation_scene
from fluxion.model import Flux
from fluxion.model.configs import TRANSFORMER_PRESETS
from fluxion.registry import resolve
from fluxion.sampling import image_ids, pack, text_ids
from fluxion.text import load_minilm

SIZE = 64
PROBE_COLORS = (("red", "blue"), ("green", "yellow"), ("purple", "orange"))  # never trained as a pair here


def color_halves(left: str, right: str) -> torch.Tensor:
    """An image whose left half is colour `left` and right half colour `right`."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:, : SIZE // 2], image[:, SIZE // 2:] = PALETTE[left], PALETTE[right]
    return to_tensor(Image.fromarray(image))


def halves(scene) -> torch.Tensor:
    """The scene reduced to its layout: each half of the image in the colour of the object on that side."""
    left, right = sorted(scene.objects, key=lambda o: o.center[0])
    return color_halves(left.color, right.color)


def scene_and_caption(rng: np.random.Generator, a_color: str, b_color: str, relation: str, mirrored: bool,
                      background: str | None = None, size: str | None = None):
    shapes = rng.choice(TRAIN_SHAPES, size=2, replace=False)
    sizes = rng.choice(SIZES, size=2) if size is None else (size, size)
    a, b = (str(shapes[0]), a_color, str(sizes[0])), (str(shapes[1]), b_color, str(sizes[1]))
    scene = relation_scene(rng, (SIZE, SIZE), a, b, relation,
                           background or ("white", "black")[rng.integers(2)])
    style = CaptionStyle(prefix=("", "a photo of ")[rng.integers(2)], form="inverse" if mirrored else "relation")
    return scene, describe(scene, style)


class Task:
    """Pre-encoded training pool and probe set of one version ("halves" or "renders")."""

    def __init__(self, version: str, autoencoder, encoder, pool: int, seed: int = 0, background: str | None = None,
                 size: str | None = None):
        rng = np.random.default_rng(seed)
        image = halves if version == "halves" else (lambda s: to_tensor(render(s)))
        probe = {frozenset(p) for p in PROBE_COLORS}
        pairs = [(a, b) for a in COLORS for b in COLORS if a != b and frozenset((a, b)) not in probe]
        scenes, captions = [], []
        for _ in range(pool):
            a, b = pairs[rng.integers(len(pairs))]
            scene, caption = scene_and_caption(rng, a, b, ("left of", "right of")[rng.integers(2)],
                                               bool(rng.integers(2)), background, size)
            scenes.append(image(scene))
            captions.append(caption)
        with torch.no_grad():
            self.latents = torch.cat([pack(autoencoder.encode(torch.stack(scenes[i:i + 256])))
                                      for i in range(0, pool, 256)])
            self.txt, self.vec = encoder.encode(captions)
        # Probe: per held-out pair, the caption with "left of" and with "right of", the ideal direction (halves
        # minus mirror) and the world's own mean latent difference along it.
        self.probe = []
        for a, b in PROBE_COLORS:
            mean, ideal = {}, {}
            for relation in ("left of", "right of"):
                drawn = [scene_and_caption(rng, a, b, relation, False, background, size)[0] for _ in range(128)]
                with torch.no_grad():
                    mean[relation] = pack(autoencoder.encode(torch.stack([image(s) for s in drawn]))).mean(0)
                    ideal[relation] = pack(autoencoder.encode(halves(drawn[0])[None]))[0]
            direction = ideal["left of"] - ideal["right of"]
            world = float((mean["left of"] - mean["right of"]).flatten() @ direction.flatten())
            txt, vec = encoder.encode([f"a {a} circle left of a {b} square", f"a {a} circle right of a {b} square"])
            self.probe.append((txt, vec, direction, world))
        # How far the world's own images move along the ideal direction, against the halves (1 by construction).
        self.signal = float(np.mean([world / float(d.flatten() @ d.flatten()) for _, _, d, world in self.probe]))

    @torch.no_grad()
    def direction_share(self, model: Flux, numbered: bool = False, noises: int = 32) -> float:
        """Mean over probe pairs of (model's left-minus-right x0 along the ideal direction) / (the world's)."""
        eps = torch.randn(noises, 16, 64, generator=torch.Generator().manual_seed(1))
        ids, t = image_ids(noises, SIZE // 8, SIZE // 8), torch.ones(noises)
        tids = text_ids(noises, self.txt.shape[1], numbered=numbered)
        shares = []
        for txt, vec, direction, world in self.probe:
            x0 = []
            for i in range(2):
                v = model(eps, ids, txt[i:i + 1].expand(noises, -1, -1), tids, t, vec[i:i + 1].expand(noises, -1))
                x0.append((eps - v).mean(0))  # x0 = x_1 - v at t = 1
            shares.append(float((x0[0] - x0[1]).flatten() @ direction.flatten()) / world)
        return float(np.mean(shares))


def fresh_or_loaded(preset: str, init: str | None) -> tuple[Flux, bool]:
    """The model, and whether it numbers caption tokens (a loaded model's text_positions)."""
    if init is None:
        return Flux(TRANSFORMER_PRESETS[preset]).initialize_weights(), False
    files = resolve(init)
    return load_transformer(files.transformer, dtype=torch.float32), files.text_positions


def train(model: Flux, numbered: bool, task: Task, steps: int, batch: int, lr: float, every: int, seed: int,
          show: bool = True, t: float = 1.0) -> None:
    """`steps` AdamW steps at time `t` (1: pure noise in) on the task's pool; with `show`, the task's share every
    `every` steps, printed as it comes, since long runs are the point."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n, L = len(task.latents), task.txt.shape[1]
    ids, tids = image_ids(batch, SIZE // 8, SIZE // 8), text_ids(batch, L, numbered=numbered)
    times = torch.full((batch,), t)
    for step in range(1, steps + 1):
        pick = torch.randint(n, (batch,), generator=g)
        x0, eps = task.latents[pick], torch.randn(batch, 16, 64, generator=g)
        x_t = (1 - t) * x0 + t * eps
        loss = (model(x_t, ids, task.txt[pick], tids, times, task.vec[pick]) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if show and step % every == 0:
            print(f" {task.direction_share(model, numbered):6.2f}", end="", flush=True)


def training_arguments(description: str) -> argparse.ArgumentParser:
    """The options every learnability script shares: the run, the model it trains, the VAE, the seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100, help="measure every N steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=4096, help="training images (per version)")
    parser.add_argument("--preset", default="tiny-pro", help="transformer shape, trained from scratch")
    parser.add_argument("--init", help="fine-tune this model (name or folder) instead, with its own text ids")
    parser.add_argument("--autoencoder", default="tiny-pro", help="model whose VAE encodes the images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    parser = training_arguments(__doc__)
    parser.add_argument("--versions", nargs="+", default=["halves", "renders"], choices=["halves", "renders"])
    parser.add_argument("--halves-first", type=int, default=0, metavar="N",
                        help="train N steps on halves before renders (a curriculum), then measure on renders")
    parser.add_argument("--background", choices=["white", "black"], help="render every scene on this background "
                        "(default: either, as the world)")
    parser.add_argument("--size", choices=["small", "large"], help="draw every shape at this size (default: either)")
    args = parser.parse_args()
    autoencoder = load_autoencoder(resolve(args.autoencoder).autoencoder, dtype=torch.float32)
    encoder = load_minilm(max_length=24)
    model_name = f"fresh {args.preset}" if args.init is None else f"from {args.init}"
    print(f"{model_name}, t = 1, batch {args.batch}, lr {args.lr}: direction share (1 = as the world, "
          "0 = word ignored)")
    print(f"{'version':8s} " + " ".join(f"{s:>6d}" for s in range(args.every, args.steps + 1, args.every)))
    tasks = {}
    for version in args.versions:
        start = time.perf_counter()
        for v in {version, "halves"} if version == "renders" and args.halves_first else {version}:
            tasks[v] = tasks.get(v) or Task(v, autoencoder, encoder, args.pool, args.seed, args.background,
                                            args.size)
        torch.manual_seed(args.seed)
        model, numbered = fresh_or_loaded(args.preset, args.init)
        print(f"{version:8s}", end="", flush=True)
        if version == "renders" and args.halves_first:
            train(model, numbered, tasks["halves"], args.halves_first, args.batch, args.lr, args.halves_first,
                  args.seed, show=False)
        train(model, numbered, tasks[version], args.steps, args.batch, args.lr, args.every, args.seed)
        after = f", after {args.halves_first} steps of halves" if version == "renders" and args.halves_first else ""
        print(f"   ({time.perf_counter() - start:.0f} s{after}; the world's images move {tasks[version].signal:.2f} "
              "as far as halves)", flush=True)


if __name__ == "__main__":
    main()
