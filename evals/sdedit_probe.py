"""Where along the trajectory a model loses the prompt: start from world renders of the spec, noised to t0, and
let the model finish (SDEdit). At small t0 the layout and shapes are given and only rendering is left to the
model; at t0 = 1 it is plain generation. A score that falls already at t0 = 0.4 means the model cannot redraw
shapes it is shown; one that holds until t0 = 0.8 means composition, not rendering, is what fails.

    python evals/sdedit_probe.py tiny-pro --t0 0.2 0.4 0.6 0.8 --cfg 4
"""

import argparse

import numpy as np
import torch

from fluxion import Pipeline, sampling
from fluxion.data.render import render
from fluxion.data.shapes import scene_from_spec
from fluxion.eval import evaluate, format_table, load_spec
from fluxion.pipeline import image_to_tensor, tensor_to_images

SIZE = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--spec", default="evals/shapes.jsonl")
    parser.add_argument("--t0", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--steps", type=int, default=20, help="steps of the full schedule; those below t0 are run")
    parser.add_argument("--cfg", type=float, help="true CFG scale (pro models; default: the model's)")
    parser.add_argument("--guidance", type=float, help="distilled guidance (dev models; default: the model's)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model, device="cpu", dtype="fp32")
    entries = load_spec(args.spec)
    k = args.images_per_prompt
    rng = np.random.default_rng(0)
    renders = [render(scene_from_spec(e, rng, (SIZE, SIZE))) for e in entries for _ in range(k)]
    prompts = [e["prompt"] for e in entries for _ in range(k)]
    cfg = pipe.defaults.true_cfg_scale if args.cfg is None else args.cfg
    guidance = pipe.defaults.guidance_scale if args.guidance is None else args.guidance
    with torch.inference_mode():
        x0 = sampling.pack(pipe.autoencoder.encode(torch.cat([image_to_tensor(im, SIZE, SIZE) for im in renders])))
    cond, negative = pipe.encode_prompt(prompts), pipe.encode_prompt([""] * len(prompts))
    ids = sampling.image_ids(len(prompts), SIZE // 8, SIZE // 8)
    schedule = sampling.get_schedule(args.steps, ids.shape[1], shift=pipe.defaults.shift)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for t0 in args.t0:
        times = [t0] + [t for t in schedule if t < t0]
        with torch.inference_mode():
            x = sampling.denoise(pipe.transformer, (1 - t0) * x0 + t0 * noise, ids, cond, times, guidance=guidance,
                                 negative=negative if cfg != 1.0 else None, true_cfg_scale=cfg)
            images = tensor_to_images(pipe.autoencoder.decode(sampling.unpack(x, SIZE // 8, SIZE // 8)))
        results = evaluate(entries, [images[i * k:(i + 1) * k] for i in range(len(entries))])
        print(f"t0 = {t0} ({len(times) - 1} steps, CFG {cfg}, guidance {guidance}):\n{format_table(results)}\n",
              flush=True)


if __name__ == "__main__":
    main()
