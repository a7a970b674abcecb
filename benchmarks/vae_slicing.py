"""VAE slicing (fluxion.slicing.decode_sliced) against the batched decode: peak RSS growth, time and the estimate,
each variant in a fresh process (tiny-schnell's VAE, fp32, CPU), measured as benchmarks/memory_estimate.py does.

    python benchmarks/vae_slicing.py                    # batch 4 at 512x512
    python benchmarks/vae_slicing.py --size 1024 --batch 2
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_estimate import peak_growth, start_measuring  # noqa: E402


def measure(size: int, batch: int, sliced: bool, model: str = "tiny-schnell") -> dict:
    import torch

    from fluxion.memory import vae_bytes
    from fluxion.pipeline import Pipeline
    from fluxion.slicing import decode_sliced, sliced_vae_bytes

    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")
    vae = pipe.autoencoder
    z = torch.randn(batch, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        vae.decode(z[:1, :, :8, :8])  # warm-up: thread pools, kernels
        before = start_measuring()
        start = time.perf_counter()
        pixels = decode_sliced(vae, z) if sliced else vae.decode(z)
        seconds = time.perf_counter() - start
        growth = peak_growth(before)
    estimate = (sliced_vae_bytes if sliced else vae_bytes)(vae.params, size, size, batch, 4)
    return {"size": size, "batch": batch, "sliced": sliced, "growth_mib": growth / 2**20,
            "estimate_mib": estimate / 2**20, "seconds": seconds, "checksum": float(pixels.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--one", choices=["sliced", "batched"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.size, args.batch, args.one == "sliced")))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    rows = {}
    for variant in ("batched", "sliced"):
        r = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--batch", str(args.batch), "--one",
                            variant], capture_output=True, text=True, env=env, timeout=1200, check=True)
        rows[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[variant]), flush=True)
    b, s = rows["batched"], rows["sliced"]
    print(f"batch {args.batch} at {args.size}x{args.size}: batched {b['growth_mib']:.0f} MiB (estimate "
          f"{b['estimate_mib']:.0f}) in {b['seconds']:.2f} s, sliced {s['growth_mib']:.0f} MiB (estimate "
          f"{s['estimate_mib']:.0f}) in {s['seconds']:.2f} s: {s['growth_mib'] / b['growth_mib']:.2f}x the memory")


if __name__ == "__main__":
    main()
