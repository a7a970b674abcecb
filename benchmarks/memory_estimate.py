"""The memory estimate (fluxion.memory) against the peak RSS growth of real jobs, one fresh process per job.

    python benchmarks/memory_estimate.py                 # the table of the README
    python benchmarks/memory_estimate.py --job 512 4 latent --json   # one job (what tests/test_memory.py runs)
    python benchmarks/memory_estimate.py --decode 1024   # the VAE decode alone: peak RSS growth and seconds
"""

import argparse
import json
import os
import resource
import subprocess
import sys

# (size, batch, output): "pil" jobs peak in the VAE decode, "latent" jobs in the transformer
JOBS = [(256, 1, "pil"), (512, 1, "pil"), (768, 1, "pil"), (1024, 1, "pil"),
        (512, 4, "latent"), (768, 4, "latent"), (1024, 2, "latent"), (1024, 4, "latent")]


def measure(size: int, batch: int, output: str, model: str = "tiny-schnell") -> dict:
    """Run one job in this process (which must be fresh: ru_maxrss is a lifetime maximum)."""
    from fluxion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")
    # The warm-up pays the one-time costs (imports such as the FLOP counter behind --allow-any-size's time
    # estimate, thread pools) so that what is measured is the job itself.
    pipe("warm up", num_inference_steps=1, height=96, width=96, allow_any_size=True)
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    pipe(["a red circle"] * batch, height=size, width=size, num_inference_steps=1, output_type=output,
         allow_any_size=True, seed=0)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    est = pipe.estimate_memory(size, size, batch)
    predicted = est.working if output == "pil" else est.transformer
    return {"size": size, "batch": batch, "output": output, "growth": growth, "predicted": predicted,
            "ratio": predicted / growth}


def measure_decode(size: int, model: str = "tiny-schnell") -> dict:
    """Decode one random latent of size x size pixels (in this fresh process)."""
    import time

    import torch

    from fluxion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")
    z = torch.randn(1, 16, size // 8, size // 8)
    pipe.decode(z[..., :8, :8])
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    pipe.decode(z)
    seconds = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"size": size, "growth_mib": growth / 2**20, "seconds": seconds}


def run_fresh(size: int, batch: int, output: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, "--job", str(size), str(batch), output, "--json"],
                       capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", nargs=3, metavar=("SIZE", "BATCH", "OUTPUT"), help="run one job here")
    parser.add_argument("--decode", type=int, metavar="SIZE", help="time and measure one VAE decode here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.decode:
        print(json.dumps(measure_decode(args.decode)))
        return
    if args.job:
        print(json.dumps(measure(int(args.job[0]), int(args.job[1]), args.job[2])))
        return
    print("| job | measured | estimated | ratio |\n| --- | ---: | ---: | ---: |")
    for size, batch, output in JOBS:
        m = run_fresh(size, batch, output)
        what = "whole job" if output == "pil" else "latents only"
        print(f"| {size}x{size}, batch {batch}, {what} | {m['growth'] / 1e6:.0f} MB | {m['predicted'] / 1e6:.0f} MB "
              f"| {m['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
