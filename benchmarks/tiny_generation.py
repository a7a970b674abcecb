"""Latency of the in-house models on this machine: model load, then one 64x64 image end to end.

End to end = text encoding (cache cleared, so the encoder really runs) + all sampling steps + VAE decode + PIL.
Targets (issue: the embedded default): tiny-schnell <= 150 ms per image, load <= 3 s, on the 2-core CPU.

    python benchmarks/tiny_generation.py --model tiny-schnell --steps 4
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPTS = ["a red circle left of a blue square", "two green triangles", "a photo of a yellow square",
           "a small purple circle above a large orange triangle", "three blue circles on a black background"]


def measure_load(model: str, device: str) -> float:
    """Import + load in a fresh interpreter, as a user's first command pays it."""
    code = ("import time; t = time.perf_counter(); from fluxion import Pipeline; "
            f"Pipeline.from_pretrained({model!r}, device={device!r}); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-schnell")
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch

    from fluxion import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    loads = [measure_load(args.model, args.device) for _ in range(3)]
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    steps = args.steps or pipe.defaults.num_inference_steps
    clear = getattr(pipe.text_encoder, "cache_clear", lambda: None)
    pipe(PROMPTS[0], num_inference_steps=steps, seed=0)  # warm-up
    times = []
    for i in range(args.repeats):
        clear()
        t = time.perf_counter()
        pipe(PROMPTS[i % len(PROMPTS)], num_inference_steps=steps, seed=i)
        times.append(time.perf_counter() - t)
    result = {"model": args.model, "steps": steps, "device": args.device, "threads": torch.get_num_threads(),
              "load_s_min": min(loads), "load_s_median": statistics.median(loads),
              "image_ms_median": 1000 * statistics.median(times), "image_ms_min": 1000 * min(times)}
    print(f"{args.model}: load {result['load_s_min']:.2f} s (min of 3 fresh processes), "
          f"one {pipe.defaults.size}px image with {steps} steps: {result['image_ms_median']:.1f} ms median "
          f"({result['image_ms_min']:.1f} min) over {args.repeats} runs, {result['threads']} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
