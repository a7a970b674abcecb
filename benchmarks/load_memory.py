"""Peak resident memory of load_transformer on a ~1 GB random BFL checkpoint, as a ratio of the model size."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fluxion.checkpoints import export_diffusers, load_transformer, params_metadata, save_state_dict
from fluxion.model import Flux, FluxParams

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_RATIO = 1.3


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_params(size_gb: float, bytes_per_param: int) -> FluxParams:
    """A FLUX-shaped transformer (head dim 128, FLUX text dims) with depth chosen to reach ~size_gb on disk."""
    hidden = 1024
    double, single = 36 * hidden**2, 15 * hidden**2  # parameters per block, biases aside
    target = size_gb * 1e9 / bytes_per_param
    depth = max(1, round(target * 0.6 / double))
    depth_single = max(1, round((target - depth * double) / single))
    return FluxParams(hidden_size=hidden, num_heads=hidden // 128, depth=depth, depth_single_blocks=depth_single,
                      guidance_embed=True)


def write_checkpoint(path: Path, params: FluxParams, dtype: torch.dtype, layout: str) -> int:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.empty(s, dtype=torch.float32).uniform_(-0.05, 0.05, generator=g).to(dtype)
          for k, s in shapes.items()}
    if layout == "diffusers":  # a transformer/ folder: loading it merges q/k/v back into BFL's fused tensors
        export_diffusers(sd, params, path, component="transformer")
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    save_state_dict(sd, path, metadata=params_metadata(params))
    return path.stat().st_size


def child(path: str, load_dtype: str | None) -> None:
    """Runs in a fresh interpreter: only the load itself adds to its resident memory."""
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    model = load_transformer(path, dtype=DTYPES[load_dtype] if load_dtype else None)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    print(json.dumps({"rss_before_kb": before, "peak_kb": peak, "model_bytes": model_bytes, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size on disk")
    parser.add_argument("--file-dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--load-dtype", choices=DTYPES, default=None, help="default: as stored")
    parser.add_argument("--layout", choices=("bfl", "diffusers"), default="bfl")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.load_dtype)

    file_dtype = DTYPES[args.file_dtype]
    params = bench_params(args.size_gb, file_dtype.itemsize)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("flux.safetensors" if args.layout == "bfl" else "transformer")
        file_bytes = write_checkpoint(path, params, file_dtype, args.layout)
        cmd = [sys.executable, __file__, "--child", str(path)]
        if args.load_dtype:
            cmd += ["--load-dtype", args.load_dtype]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    delta = (result["peak_kb"] - result["rss_before_kb"]) * 1024
    ratio = delta / result["model_bytes"]
    print(f"checkpoint: depth {params.depth} + {params.depth_single_blocks} single blocks, "
          f"hidden {params.hidden_size}, "
          f"{args.layout} layout, {args.file_dtype} on disk, {file_bytes / 2**30:.3f} GiB")
    print(f"loaded as:  {args.load_dtype or 'stored dtype'}, model size {result['model_bytes'] / 2**30:.3f} GiB "
          f"in {result['seconds']:.1f} s")
    print(f"peak RSS:   {result['peak_kb'] / 2**20:.3f} GiB (before load {result['rss_before_kb'] / 2**20:.3f} GiB), "
          f"delta {delta / 2**30:.3f} GiB")
    print(f"ratio:      {ratio:.3f}x the model size (target <= {TARGET_RATIO}x): "
          f"{'OK' if ratio <= TARGET_RATIO else 'OVER'}")


if __name__ == "__main__":
    main()
