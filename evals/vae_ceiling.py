"""The score ceiling a latent model can reach: the evaluator on world renders of the spec passed through the VAE
(encode, decode). If the autoencoder loses shapes or colours, no transformer can score above this. With
--latent-noise, also through latents with Gaussian noise of each given std added (in the scaled latent space, where
the transformer works): how precisely a transformer must hit the latents for the decoder to keep the shapes.

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
    parser.add_argument("--latent-noise", type=float, nargs="*", default=[])
    args = parser.parse_args()

    ae = load_autoencoder(args.autoencoder, dtype=torch.float32)
    entries = load_spec(args.spec)
    rng = np.random.default_rng(0)
    noise = torch.Generator().manual_seed(0)
    stds = [0.0] + args.latent_noise
    originals, decoded = [], {std: [] for std in stds}
    for entry in entries:
        images = [render(scene_from_spec(entry, rng, (args.size, args.size)))
                  for _ in range(args.images_per_prompt)]
        originals.append(images)
        with torch.inference_mode():
            z = ae.encode(torch.cat([image_to_tensor(im, args.size, args.size) for im in images]))
            for std in stds:
                decoded[std].append(tensor_to_images(ae.decode(z + std * torch.randn(z.shape, generator=noise))))
    print("world renders:\n" + format_table(evaluate(entries, originals)))
    print("through the VAE:\n" + format_table(evaluate(entries, decoded[0.0])))
    for std in args.latent_noise:
        print(f"through the VAE, latent noise std {std}:\n" + format_table(evaluate(entries, decoded[std])))


if __name__ == "__main__":
    main()
