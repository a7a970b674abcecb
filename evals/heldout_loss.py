"""Held-out flow-matching loss of in-house transformers: a cheap, low-noise signal for comparing training runs.

The GenEval-style score of `fluxion eval` on the standard spec has a binomial standard error of about 0.02 (496
images over six tags); this loss, on fixed world images (a data seed no recipe trains on), fixed noise and a fixed
grid of t, separates runs whose scores cannot be told apart, and it needs no sampling. Lower is better. Models are
compared on the same images, each reading the captions as it was trained to (fluxion.json's text_length and
text_positions, or the run's data.text_length and model.text_positions).

    python evals/heldout_loss.py tiny-pro runs/tiny-pro            # a model by name, a run folder (its EMA)
"""

import argparse
import json
from pathlib import Path

import torch

from fluxion.checkpoints import load_autoencoder, load_transformer
from fluxion.checkpoints.io import load_state_dict, read_checkpoint_info
from fluxion.data import ShapesDataset, collate
from fluxion.model import Flux
from fluxion.registry import resolve
from fluxion.sampling import image_ids, pack, text_ids
from fluxion.text import load_minilm
from fluxion.training.checkpoint import CHECKPOINT, STATE_KEY
from fluxion.training.config import load_config

TIMES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BATCH = 128


def load(source: str) -> tuple[Flux, int, bool, str]:
    """(transformer, text_length, text_positions, label): a run folder's EMA weights at its last checkpoint, or a
    model folder."""
    run = Path(source)
    if (run / CHECKPOINT).is_file():
        cfg = load_config(run / "config.toml")
        model = Flux(cfg.model_params())
        tensors = load_state_dict(run / CHECKPOINT)
        model.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
        step = json.loads(read_checkpoint_info(run / CHECKPOINT).metadata[STATE_KEY])["step"]
        return model, cfg.data.text_length, cfg.model.text_positions, f"{source} (EMA, step {step})"
    files = resolve(source)
    model = load_transformer(files.transformer, dtype=torch.float32)
    return model, files.text_length or 32, files.text_positions, source


@torch.inference_mode()
def heldout_loss(model: Flux, x0: torch.Tensor, noise: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                 text_positions: bool = False) -> dict[float, float]:
    """Mean squared error of the predicted velocity against eps - x0 at each t of TIMES (packed 64x64 latents).
    A guidance-distilled (dev) model is asked for guidance 1: the plain conditional velocity."""
    n = x0.shape[0]
    ids, tids = image_ids(n, 8, 8), text_ids(n, txt.shape[1], numbered=text_positions)
    guidance = torch.ones(n) if model.params.guidance_embed else None
    losses = {}
    for t in TIMES:
        x_t = (1 - t) * x0 + t * noise
        v = torch.cat([model(x_t[i:i + BATCH], ids[i:i + BATCH], txt[i:i + BATCH], tids[i:i + BATCH],
                             torch.full((len(x_t[i:i + BATCH]),), t), vec[i:i + BATCH],
                             None if guidance is None else guidance[i:i + BATCH]) for i in range(0, n, BATCH)])
        losses[t] = float((v - (noise - x0)).pow(2).mean())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model names or folders, or training run folders")
    parser.add_argument("--autoencoder", default="weights/tiny-vae/ae.safetensors")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--p-relation", type=float, default=0.5)
    args = parser.parse_args()

    ae = load_autoencoder(args.autoencoder, dtype=torch.float32)
    world = ShapesDataset(seed=args.data_seed, length=args.images, buckets=[(64, 64)], p_relation=args.p_relation)
    images, captions = collate([world[i] for i in range(args.images)])
    with torch.inference_mode():
        x0 = pack(torch.cat([ae.encode(images[i:i + BATCH]) for i in range(0, args.images, BATCH)]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for source in args.models:
        model, text_length, text_positions, label = load(source)
        txt, vec = load_minilm(max_length=text_length).encode(captions)
        losses = heldout_loss(model.eval(), x0, noise, txt.float(), vec.float(), text_positions)
        print(f"{label}: mean {sum(losses.values()) / len(losses):.4f} | "
              + " ".join(f"t={t}: {v:.4f}" for t, v in losses.items()), flush=True)


if __name__ == "__main__":
    main()
