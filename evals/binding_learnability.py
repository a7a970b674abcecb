"""Can a transformer of tiny-pro's shape learn which colour goes with which shape, from MiniLM states?

MiniLM's state of a shape word hardly depends on the colour word before it: "circle" in "a yellow circle and a blue
triangle" and in "a blue circle and a yellow triangle" has cosine 0.996 (printed). With FLUX's text ids (all 0) the
transformer sees the caption's states as a set, so the two captions differ only by that small residue; numbered text
ids (`text_positions`) also show it the order. Captions are GenEval's color_attr phrasing, "a C1 S1 and a C2 S2",
two different shapes in either order, colour pairs of the probe never trained together. Two versions:

- halves (t = 1, pure noise in, the mean image out): the image's left half is in the colour of the shape that comes
  first in (circle, square, triangle), the right half in the other's, so where a colour goes depends only on the
  shape it is bound to. Share: how far swapping the colours between the shapes moves the predicted x0 along the
  ideal direction (the halves image minus its mirror), over that direction's squared length.
- renders (at `--t`, where blobs and colours show in x_t but shapes are still undecided): the world's two-object
  scenes. Share: from the midpoint of a scene and the same scene with the two shapes swapped, noised to t (so x_t
  favours neither), how far the caption's binding moves the predicted x0 from the one scene to the other.

1 means the model binds the colours as the caption says; 0 means it cannot tell the two captions apart.

    python evals/binding_learnability.py --steps 600                      # halves, zero vs numbered text ids
    python evals/binding_learnability.py --version renders --init tiny-pro --t 0.8
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from fluxion.checkpoints import load_autoencoder
from fluxion.data.captions import noun_phrase
from fluxion.data.dataset import to_tensor
from fluxion.data.render import render
from fluxion.data.shapes import COLORS, RELATIONS, SIZES, TRAIN_SHAPES, Scene, ShapeObject, relation_scene
from fluxion.model import Flux
from fluxion.registry import resolve
from fluxion.sampling import image_ids, pack, text_ids
from fluxion.text import load_minilm

from relation_learnability import PROBE_COLORS, SIZE, color_halves, fresh_or_loaded, train, training_arguments

PROBE_SHAPES = ("circle", "triangle")


def binding_caption(shapes: tuple[str, str], colors: tuple[str, str], prefix: str = "") -> str:
    """'a yellow circle and a blue triangle': shape k in colour k."""
    return prefix + " and ".join(noun_phrase(s, color=c) for s, c in zip(shapes, colors))


def binding_halves(shapes: tuple[str, str], colors: tuple[str, str]) -> torch.Tensor:
    """Left half in the colour of the shape that comes first in TRAIN_SHAPES, right half in the other's."""
    first = 0 if TRAIN_SHAPES.index(shapes[0]) < TRAIN_SHAPES.index(shapes[1]) else 1
    return color_halves(colors[first], colors[1 - first])


def binding_render(shapes: tuple[str, str], colors: tuple[str, str], seed: int) -> torch.Tensor:
    """A world scene of the two objects; the same `seed` gives the same layout, sizes and background, so swapping
    `shapes` swaps only which shape each colour has."""
    rng = np.random.default_rng(seed)
    size, relation, background = SIZES[rng.integers(2)], RELATIONS[rng.integers(4)], ("white", "black")[rng.integers(2)]
    scene = relation_scene(rng, (SIZE, SIZE), (shapes[0], colors[0], size), (shapes[1], colors[1], size), relation,
                           background)
    return to_tensor(render(scene))


@torch.no_grad()
def shape_signal(autoencoder) -> dict[str, float]:
    """Latent distances from a small red circle on white to: a square in its place, itself 4 px to the right, and a
    blue circle in its place. How loud a shape is against a place and a colour, for the loss."""
    def latent(shape: str, color: str = "red", x: float = 24.0) -> torch.Tensor:
        scene = Scene(SIZE, SIZE, "white", (ShapeObject(shape, color, "small", (x, 30.0), 12.5),))
        return autoencoder.encode(to_tensor(render(scene))[None])

    circle = latent("circle")
    others = {"square": latent("square"), "4 px": latent("circle", x=28.0), "blue": latent("circle", "blue")}
    return {name: float((other - circle).norm()) for name, other in others.items()}


class BindingTask:
    """Pre-encoded training pool and probe; `direction_share` is what relation_learnability.train reports."""

    def __init__(self, version: str, autoencoder, encoder, pool: int, seed: int = 0, t: float = 1.0,
                 probe_scenes: int = 16):
        rng = np.random.default_rng(seed)
        self.t = t
        probe = {frozenset(p) for p in PROBE_COLORS}
        pairs = [(a, b) for a in COLORS for b in COLORS if a != b and frozenset((a, b)) not in probe]
        images, captions = [], []
        for _ in range(pool):
            shapes = tuple(str(s) for s in rng.choice(TRAIN_SHAPES, size=2, replace=False))
            colors = pairs[rng.integers(len(pairs))]
            images.append(binding_halves(shapes, colors) if version == "halves"
                          else binding_render(shapes, colors, int(rng.integers(1 << 31))))
            captions.append(binding_caption(shapes, colors, ("", "a photo of ")[rng.integers(2)]))
        with torch.no_grad():
            self.latents = self.encode(autoencoder, images)
            self.txt, self.vec = encoder.encode(captions)
        # Probe, per held-out colour pair (a, b): "a a circle and a b triangle" and the colours swapped; the x_t
        # the model sees (pure noise for halves; the midpoint of the two bindings' scenes noised to t for renders);
        # the ideal direction from the swapped binding's image to the caption's.
        self.probe = []
        for k, (a, b) in enumerate(PROBE_COLORS):
            txt, vec = encoder.encode([binding_caption(PROBE_SHAPES, (a, b)), binding_caption(PROBE_SHAPES, (b, a))])
            if version == "halves":
                bound, swapped = (self.encode(autoencoder, [binding_halves(PROBE_SHAPES, c)]) for c in ((a, b), (b, a)))
                x_t = torch.randn(32, 16, 64, generator=torch.Generator().manual_seed(k))
                direction = (bound - swapped).expand(32, -1, -1)
            else:
                seeds = [int(s) for s in rng.integers(1 << 31, size=probe_scenes)]
                bound, swapped = (self.encode(autoencoder, [binding_render(shapes, (a, b), s) for s in seeds])
                                  for shapes in (PROBE_SHAPES, PROBE_SHAPES[::-1]))
                eps = torch.randn(probe_scenes, 16, 64, generator=torch.Generator().manual_seed(k))
                x_t, direction = (1 - t) * (bound + swapped) / 2 + t * eps, bound - swapped
            self.probe.append((txt, vec, x_t, direction))
        # How alike MiniLM's states of the shape word are under the two bindings (position of "circle": 3).
        self.state_cosine = float(np.mean([F.cosine_similarity(txt[0, 3], txt[1, 3], dim=0) for txt, *_ in self.probe]))

    @staticmethod
    @torch.no_grad()
    def encode(autoencoder, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([pack(autoencoder.encode(torch.stack(images[i:i + 256]))) for i in range(0, len(images), 256)])

    @torch.no_grad()
    def direction_share(self, model: Flux, numbered: bool = False) -> float:
        """Mean over probe pairs of (caption's minus swapped caption's x0 along the ideal direction) over the
        direction's squared length."""
        shares = []
        for txt, vec, x_t, direction in self.probe:
            n = len(x_t)
            ids, tids = image_ids(n, SIZE // 8, SIZE // 8), text_ids(n, txt.shape[1], numbered=numbered)
            t = torch.full((n,), self.t)
            x0 = [x_t - self.t * model(x_t, ids, txt[i:i + 1].expand(n, -1, -1), tids, t, vec[i:i + 1].expand(n, -1))
                  for i in range(2)]
            shares.append(float(((x0[0] - x0[1]) * direction).sum() / direction.pow(2).sum()))
        return float(np.mean(shares))


def main() -> None:
    parser = training_arguments(__doc__)
    parser.add_argument("--version", choices=["halves", "renders"], default="halves")
    parser.add_argument("--t", type=float, default=None, help="training and probe time (default: 1 for halves, "
                        "0.8 for renders)")
    parser.add_argument("--ids", nargs="+", default=["zero", "numbered"], choices=["zero", "numbered"],
                        help="text ids of the fresh models to compare")
    args = parser.parse_args()
    t = args.t if args.t is not None else (1.0 if args.version == "halves" else 0.8)
    autoencoder = load_autoencoder(resolve(args.autoencoder).autoencoder, dtype=torch.float32)
    task = BindingTask(args.version, autoencoder, load_minilm(max_length=24), args.pool, args.seed, t)
    print(f"MiniLM state of 'circle' under the two bindings of a probe caption: cosine {task.state_cosine:.3f}")
    print("latent distance from a small red circle on white to " +
          ", ".join(f"{k}: {v:.1f}" for k, v in shape_signal(autoencoder).items()))
    print(f"{args.version}, t = {t}, batch {args.batch}, lr {args.lr}: binding share (1 = bound as the caption "
          "says, 0 = captions not told apart)")
    print(f"{'model':24s}      0 " + " ".join(f"{s:>6d}" for s in range(args.every, args.steps + 1, args.every)))
    for ids in [None] if args.init else args.ids:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        model, numbered = fresh_or_loaded(args.preset, args.init)
        numbered = numbered if args.init else ids == "numbered"
        name = f"from {args.init}" if args.init else f"fresh, {ids} text ids"
        print(f"{name:24s} {task.direction_share(model, numbered):6.2f}", end="", flush=True)
        train(model, numbered, task, args.steps, args.batch, args.lr, args.every, args.seed, t=t)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
