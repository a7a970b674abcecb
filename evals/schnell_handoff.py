"""Where does tiny-schnell lose to tiny-dev? Sample with one model up to a point of tiny-schnell's 4-step schedule and
the other from there on, and score each hand-off on evals/shapes.jsonl (4 images per prompt, the spec's seeds).

    python evals/schnell_handoff.py --size 64x64 --out runs/eval/handoff/64x64.json

Arms: "dev" (its 20 shifted steps), "schnell" (its 4), "dev>k" (tiny-dev's own steps down to the schedule point
after schnell's step k, then tiny-schnell's remaining steps) and "schnell>k" (tiny-schnell's first k steps, then
tiny-dev's steps below that point). If "dev>1" recovers most of the gap, the first step (where the layout is drawn)
is what the student gets wrong.
"""

import argparse
import json
from pathlib import Path

import torch

from fluxion import Pipeline
from fluxion.eval import run_eval
from fluxion.files import atomic_write
from fluxion.pipeline import tensor_to_images
from fluxion.sampling import denoise, get_noise, get_schedule, image_ids, pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def hand_off(first: list[float], second: list[float], point: float) -> tuple[list[float], list[float]]:
    """`first`'s times down to `point`, then `second`'s from `point` on (both schedules run 1 -> 0)."""
    return [t for t in first if t > point] + [point], [point] + [t for t in second if t < point]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", default="tiny-dev")
    parser.add_argument("--schnell", default="tiny-schnell")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/eval/handoff.json"))
    args = parser.parse_args()

    dev, schnell = Pipeline.from_pretrained(args.dev), Pipeline.from_pretrained(args.schnell)
    width, height = map(int, args.size.split("x"))
    lat_h, lat_w = height // 8, width // 8
    tokens = (lat_h // 2) * (lat_w // 2)
    S = get_schedule(4, tokens, shift=schnell.defaults.shift, schedule=schnell.shift_schedule)
    D = get_schedule(20, tokens, shift=dev.defaults.shift, schedule=dev.shift_schedule)
    arms = {"dev": [(dev, D)], "schnell": [(schnell, S)]}
    for k in (1, 2, 3):
        a, b = hand_off(D, S, S[k])
        arms[f"dev>{k}"] = [(dev, a), (schnell, b)]
        a, b = hand_off(S, D, S[k])
        arms[f"schnell>{k}"] = [(schnell, a), (dev, b)]

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, parts in arms.items():
        if name in results:
            continue

        @torch.inference_mode()
        def generate(prompts, seeds, parts=parts):
            img = pack(get_noise(seeds, height, width))
            ids = image_ids(img.shape[0], lat_h, lat_w)
            for pipe, times in parts:
                cond = pipe.encode_prompt(prompts)
                img = denoise(pipe.transformer, img, ids, cond, times, guidance=dev.defaults.guidance_scale)
            return tensor_to_images(dev.decode(unpack(img.float(), lat_h, lat_w)))

        r = run_eval(generate, ROOT / "evals" / "shapes.jsonl", args.images_per_prompt,
                     args.out.parent / f"{args.out.stem}-{name}", seed=args.seed)
        results[name] = {"overall": r["overall"], "overall_se": r["overall_se"],
                         "tags": {tag: v["accuracy"] for tag, v in r["per_tag"].items()},
                         "schedule": [[p.name, [round(t, 4) for t in ts]] for p, ts in parts]}
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
        print(f"{name:12s} {r['overall']:.3f}", flush=True)


if __name__ == "__main__":
    main()
