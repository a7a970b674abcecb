"""torch.compile (fluxion.compile, inductor, regional) against eager on the CPU: one transformer forward at the
three sizes of transformer_step.py, the first call's compile time, and a whole tiny-dev generation.

    python benchmarks/compile.py --json compile.json                  # tiny, 60m, 300m in fp32, 2 threads
    python benchmarks/compile.py --sizes 60m --dtypes fp32,bf16 --freezing both
    python benchmarks/compile.py --generation --json generation.json  # 28-step tiny-dev images, eager vs compiled

Each forward case runs in a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary
folder), so its first call is a cold compile; the case then runs again in another fresh process on the cache the
first one left ("warm": what the second run of a program pays). Eager and compiled forwards alternate (median of
--repeats). The models are transformer_step.py's (build_pair's random weights, make_inputs' batch of 256 image and
64 text tokens).
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_step import DTYPES, SIZES, build_pair, make_inputs, run_ours  # noqa: E402


def cpu_name() -> str:
    """Model name, family/model numbers and the vector extensions that matter to inductor's CPU code."""
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; " \
           f"{', '.join(isa) or 'no AVX2'})"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_case(size: str, dtype_name: str, freezing: bool, repeats: int, side: int, txt_len: int) -> dict:
    """Eager and compiled forwards of one size in this (fresh) process."""
    from torch._dynamo.utils import counters

    from fluxion.compile import compile_transformer

    dtype = DTYPES[dtype_name]
    params = SIZES[size]
    eager = build_pair(params)[0].to(dtype)
    compiled = compile_transformer(copy.deepcopy(eager), freezing=freezing)
    x = {k: v if k.endswith("_ids") else v.to(dtype) for k, v in make_inputs(params, side, txt_len).items()}
    with torch.inference_mode():
        expected = run_ours(eager, x)
        first = _seconds(lambda: run_ours(compiled, x))
        got = run_ours(compiled, x)
        times = {"eager": [], "compiled": []}
        for r in range(repeats):
            for who in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                model = eager if who == "eager" else compiled
                times[who].append(_seconds(lambda: run_ours(model, x)))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"size": size, "dtype": dtype_name, "freezing": freezing,
            "params": sum(p.numel() for p in eager.parameters()), "eager_ms": eager_s * 1e3,
            "compiled_ms": compiled_s * 1e3, "speedup": eager_s / compiled_s,
            "first_call_s": first, "compile_s": first - compiled_s,
            "graphs": counters["stats"]["unique_graphs"],
            "max_abs_diff": (got.float() - expected.float()).abs().max().item(),
            "max_abs_out": expected.float().abs().max().item()}


def generation_case(model: str, steps: int, repeats: int, caches: list[str | None]) -> list[dict]:
    """Whole generations (text encoder, `steps` transformer steps, VAE decode) eager, then compiled."""
    from fluxion.compile import compile_transformer
    from fluxion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")
    eager = pipe.transformer
    compiled = compile_transformer(copy.deepcopy(eager))
    rows = []
    for cache in caches:
        def job(seed: int):
            return pipe("a red circle left of a blue square", seed=seed, num_inference_steps=steps,
                        output_type="pt", cache=cache)

        pipe.transformer = eager
        job(0)
        expected = job(1)
        pipe.transformer = compiled
        first = _seconds(lambda: job(0))
        got = job(1)
        times = {"eager": [], "compiled": []}
        for r in range(repeats):
            for who in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                pipe.transformer = eager if who == "eager" else compiled
                times[who].append(_seconds(lambda: job(2 + r)))
        diff = (got - expected).abs().max().item()
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows.append({"model": model, "steps": steps, "cache": cache or "none", "eager_s": e, "compiled_s": c,
                     "speedup": e / c, "first_compiled_job_s": first, "max_abs_diff_pixels": diff,
                     "max_abs_diff_8bit": diff * 127.5})
    return rows


def run_worker(args: list[str], cache_dir: str, threads: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True, text=True,
                       env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,60m,300m", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--dtypes", default="fp32", help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--freezing", choices=["off", "on", "both"], default="off", help="inductor freezing")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards (or jobs) per variant; median")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--side", type=int, default=16, help="image token grid side (16 -> 256 tokens)")
    parser.add_argument("--txt-len", type=int, default=64, help="text tokens")
    parser.add_argument("--generation", action="store_true", help="time whole tiny-dev generations instead")
    parser.add_argument("--model", default="tiny-dev", help="with --generation")
    parser.add_argument("--steps", type=int, default=28, help="with --generation")
    parser.add_argument("--caches", default="none,fbcache", help="with --generation: step caches to try")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--case", nargs=3, metavar=("SIZE", "DTYPE", "FREEZING"), help=argparse.SUPPRESS)
    parser.add_argument("--generation-case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:  # a worker: one case, one JSON line
        size, dtype, freezing = args.case
        print(json.dumps(forward_case(size, dtype, freezing == "on", args.repeats, args.side, args.txt_len)))
        return
    caches = [None if c == "none" else c for c in args.caches.split(",")]
    if args.generation_case:
        print(json.dumps(generation_case(args.model, args.steps, max(args.repeats // 2, 1), caches)))
        return

    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    print(f"{machine}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results: list = []
    if args.generation:
        with tempfile.TemporaryDirectory() as cache_dir:
            rows = run_worker(["--generation-case", "--model", args.model, "--steps", str(args.steps), "--caches",
                               args.caches, "--repeats", str(args.repeats)], cache_dir, args.threads)
        print(f"{'cache':>12} {'eager s':>8} {'compiled s':>10} {'speed-up':>8} {'1st compiled job s':>18} "
              f"{'max|diff| 8-bit':>15}")
        for r in rows:
            print(f"{r['cache']:>12} {r['eager_s']:>8.2f} {r['compiled_s']:>10.2f} {r['speedup']:>8.2f} "
                  f"{r['first_compiled_job_s']:>18.1f} {r['max_abs_diff_8bit']:>15.3f}")
        results = rows
    else:
        print(f"batch 1, {args.side ** 2} image + {args.txt_len} text tokens; median of {args.repeats}, eager and "
              "compiled alternating; first call: cold (empty inductor cache) / warm (its cache, a new process)")
        print(f"{'size':>5} {'dtype':>5} {'freeze':>6} {'eager ms':>9} {'compiled ms':>11} {'speed-up':>8} "
              f"{'1st call s cold/warm':>21} {'graphs':>6} {'max|diff|':>9} {'max|out|':>8}")
        freezings = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.freezing]
        for dtype in args.dtypes.split(","):
            for size in args.sizes.split(","):
                for freezing in freezings:
                    case = ["--case", size, dtype, freezing, "--repeats", str(args.repeats), "--side",
                            str(args.side), "--txt-len", str(args.txt_len)]
                    with tempfile.TemporaryDirectory() as cache_dir:
                        cold = run_worker(case, cache_dir, args.threads)
                        warm = run_worker(case + ["--repeats", "1"], cache_dir, args.threads)
                    cold["first_call_warm_s"] = warm["first_call_s"]
                    results.append(cold)
                    r = cold
                    print(f"{size:>5} {dtype:>5} {freezing:>6} {r['eager_ms']:>9.1f} {r['compiled_ms']:>11.1f} "
                          f"{r['speedup']:>8.2f} {r['first_call_s']:>10.1f} /{warm['first_call_s']:>9.1f} "
                          f"{r['graphs']:>6} {r['max_abs_diff']:>9.1e} {r['max_abs_out']:>8.2f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews the timings)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
