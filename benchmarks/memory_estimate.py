"""The memory estimate (fluxion.memory) against the peak RSS growth of real jobs, one fresh process per job.

    python benchmarks/memory_estimate.py                 # the table in benchmarks/README.md
    python benchmarks/memory_estimate.py --job 512 4 latent --json   # one job (what tests/test_memory.py runs)
    python benchmarks/memory_estimate.py --decode 1024   # the VAE decode alone: peak RSS growth and seconds
    python benchmarks/memory_estimate.py --tiling 2048   # the tiled decode against the whole one: memory, seams
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

# (size, batch, output): "pil" jobs peak in the VAE decode, "latent" jobs in the transformer
JOBS = [(256, 1, "pil"), (512, 1, "pil"), (768, 1, "pil"), (1024, 1, "pil"),
        (512, 4, "latent"), (768, 4, "latent"), (1024, 2, "latent"), (1024, 4, "latent")]


def _status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def start_measuring() -> int:
    """Resident bytes now, after freeing what can be freed, with the peak (VmHWM) reset to them. Without the trim,
    glibc keeps memory freed by loading and warm-up resident and the job reuses it unseen; without the reset, a
    loading peak above the job's would be measured instead of the job's (Linux >= 4.0)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_growth(before: int) -> int:
    return _status_bytes("VmHWM") - before


def measure(size: int, batch: int, output: str, model: str = "tiny-schnell") -> dict:
    """Run one job in this process (which must be fresh: ru_maxrss is a lifetime maximum)."""
    from fluxion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")
    # The warm-up pays the one-time costs (thread pools; importing the FLOP counter behind --allow-any-size's time
    # estimate, ~70 MB, called by name since 96x96 may lie inside the model's sizes) so that what is measured is
    # the job itself.
    pipe("warm up", num_inference_steps=1, height=96, width=96, allow_any_size=True)
    pipe.estimate_seconds(96, 96, batch=1, steps=1)
    before = start_measuring()
    pipe(["a red circle"] * batch, height=size, width=size, num_inference_steps=1, output_type=output,
         allow_any_size=True, seed=0)
    growth = peak_growth(before)
    est = pipe.estimate_memory(size, size, batch)
    predicted = est.working if output == "pil" else est.transformer + est.base
    return {"size": size, "batch": batch, "output": output, "growth": growth, "predicted": predicted,
            "ratio": predicted / growth}


def measure_decode(size: int, model: str = "tiny-schnell", tiled: bool = False, save: str | None = None) -> dict:
    """Decode one random latent (seed 0) of size x size pixels in this fresh process, whole or in tiles; `save`
    keeps the pixels (safetensors) for a comparison."""
    import time

    import torch

    from fluxion.checkpoints.io import save_state_dict
    from fluxion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")
    z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    pipe.decode(z[..., :8, :8], tiled=tiled)
    before = start_measuring()
    start = time.perf_counter()
    pixels = pipe.decode(z, tiled=tiled)
    seconds = time.perf_counter() - start
    growth = peak_growth(before)
    if save:
        save_state_dict({"pixels": pixels.contiguous()}, save)
    return {"size": size, "tiled": tiled, "growth_mib": growth / 2**20, "seconds": seconds}


def compare_tiling(size: int) -> dict:
    """The whole decode and the tiled one, each in a fresh process: peak memory, time, and the pixel difference
    in 8-bit units (what a seam would show as)."""
    import tempfile

    from fluxion.checkpoints.io import load_state_dict

    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for tiled in (False, True):
            out = os.path.join(tmp, f"{tiled}.safetensors")
            r = subprocess.run([sys.executable, __file__, "--decode", str(size), "--save", out]
                               + (["--tiled"] if tiled else []), capture_output=True, text=True, env=env,
                               timeout=1200, check=True)
            runs[tiled] = (json.loads(r.stdout.strip().splitlines()[-1]), load_state_dict(out)["pixels"])
    (whole, a), (tiles, b) = runs[False], runs[True]
    diff = ((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5).abs()
    return {"size": size, "whole_mib": whole["growth_mib"], "tiled_mib": tiles["growth_mib"],
            "ratio": tiles["growth_mib"] / whole["growth_mib"], "whole_s": whole["seconds"],
            "tiled_s": tiles["seconds"], "max_abs_diff_8bit": float(diff.max()),
            "mean_abs_diff_8bit": float(diff.mean())}


def run_fresh(size: int, batch: int, output: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, "--job", str(size), str(batch), output, "--json"],
                       capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", nargs=3, metavar=("SIZE", "BATCH", "OUTPUT"), help="run one job here")
    parser.add_argument("--decode", type=int, metavar="SIZE", help="time and measure one VAE decode here")
    parser.add_argument("--tiled", action="store_true", help="with --decode: decode in tiles")
    parser.add_argument("--save", help="with --decode: keep the pixels in this safetensors file")
    parser.add_argument("--tiling", type=int, metavar="SIZE", help="the tiled decode against the whole one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.decode:
        print(json.dumps(measure_decode(args.decode, tiled=args.tiled, save=args.save)))
        return
    if args.tiling:
        print(json.dumps(compare_tiling(args.tiling)))
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
