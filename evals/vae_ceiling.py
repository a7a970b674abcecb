"""The score ceiling a latent model can reach: the evaluator on world renders of the spec passed through the VAE
(encode, decode). If the autoencoder loses shapes or colours, no transformer can score above this.

    python evals/vae_ceiling.py weights/tiny-vae/ae.safetensors --spec evals/shapes.jsonl --images-per-prompt 2
"""

import argparse

import numpy as np
import torch

from fluxion.checkpoints import load_autoencoder
from fluxion.data.render import render
from fluxion.data.shapes import scene_from_spec
from fluxion.eval import evaluate, format_table, load_spec
from fluxion.pipeline import image_to_tensor, tensor_to_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("autoencoder")
    parser.add_argument("--spec", default="evals/shapes.jsonl")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    ae = load_autoencoder(args.autoencoder, dtype=torch.float32)
    entries = load_spec(args.spec)
    rng = np.random.default_rng(0)
    groups, originals = [], []
    for entry in entries:
        images = [render(scene_from_spec(entry, rng, (args.size, args.size)))
                  for _ in range(args.images_per_prompt)]
        originals.append(images)
        with torch.inference_mode():
            x = torch.cat([image_to_tensor(im, args.size, args.size) for im in images])
            groups.append(tensor_to_images(ae.decode(ae.encode(x))))
    print("world renders:\n" + format_table(evaluate(entries, originals)))
    print("through the VAE:\n" + format_table(evaluate(entries, groups)))


if __name__ == "__main__":
    main()
