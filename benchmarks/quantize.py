"""Weight quantization (fluxion.quant): speed, output error and weight bytes of one transformer forward per scheme,
and GenEval-shapes quality of the tiny models per scheme.

Speed: the 60m and 300m models of benchmarks/transformer_step.py (random weights, std 1/sqrt(fan_in)), batch 1,
side*side image tokens + --txt-len text tokens, fp32 vs each scheme, forwards alternating in order (median of
--repeats). Error: ||y_q - y|| / ||y|| against the fp32 output. Bytes: of the tensors the model stores (its state
dict: what save_quantized writes); "resident" adds the fbgemm-packed copy int8 keeps while it runs on the CPU.
Targets (issue #25): int8 at most 0.75x the fp32 time at both sizes with error at most 0.05.
Quality: `fluxion eval`'s GenEval-shapes score (evals/shapes.jsonl) of each tiny model, its transformer quantized.

    python benchmarks/quantize.py speed --sizes 60m,300m --txt-len 64 --repeats 5 --json runs/quant_speed.json
    python benchmarks/quantize.py speed --sizes 60m --txt-len 512 --torchao      # also torchao's configs
    python benchmarks/quantize.py quality --models tiny-dev --json runs/quant_quality_dev.json
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from transformer_step import SIZES, make_inputs, random_flux, run_ours  # noqa: E402

from fluxion.quant import SCHEMES, QuantLinear, quantizable, quantize  # noqa: E402

TARGET_RATIO, TARGET_ERROR = 0.75, 0.05
DEFAULT_STEPS = {"tiny-schnell": 4, "tiny-dev": 20, "tiny-pro": 20}  # as the README's shipped scores


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def stored_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def resident_bytes(model: torch.nn.Module) -> int:
    """Stored bytes plus, for int8 layers that have run on the CPU, their fbgemm-packed int8 copy."""
    packed = sum(m.qweight.numel() for m in model.modules() if isinstance(m, QuantLinear) and m._packed is not None
                 and m._packed[1] is not None)
    return stored_bytes(model) + packed


def torchao_variants(model: torch.nn.Module) -> dict:
    """The same layers quantized by torchao's configs (int4 has no CPU path in torchao 0.18)."""
    from fluxion.quant._torchao import import_torchao

    import_torchao()
    from torchao.quantization import (Float8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, quantize_)
    out = {}
    for name, config in (("torchao-int8", Int8DynamicActivationInt8WeightConfig()),
                         ("torchao-int8-weight", Int8WeightOnlyConfig()), ("torchao-fp8", Float8WeightOnlyConfig())):
        m = copy.deepcopy(model)
        quantize_(m, config, filter_fn=lambda module, fqn: quantizable(fqn, module))
        out[name] = m
    return out


def speed(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch 1, {args.side ** 2} image + {args.txt_len} text tokens; median of {args.repeats}, alternating; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for size in args.sizes.split(","):
        params = SIZES[size]
        base = random_flux(params)
        models = {"fp32": base, **{s: quantize(copy.deepcopy(base), s) for s in args.schemes.split(",")}}
        if args.torchao:
            models.update(torchao_variants(base))
        x = make_inputs(params, args.side, args.txt_len)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            outputs = {name: run_ours(m, x) for name, m in models.items()}  # warm-up (packs int8 weights)
            for r in range(args.repeats):
                for name in list(models) if r % 2 == 0 else list(models)[::-1]:
                    start = time.perf_counter()
                    run_ours(models[name], x)
                    times[name].append((time.perf_counter() - start) * 1e3)
        y = outputs["fp32"].float()
        fp32_ms, fp32_bytes = statistics.median(times["fp32"]), stored_bytes(base)
        for name, m in models.items():
            ms = statistics.median(times[name])
            err = ((outputs[name].float() - y).norm() / y.norm()).item()
            row = {"size": size, "scheme": name, "ms": ms, "ratio": ms / fp32_ms, "rel_error": err,
                   "bytes": stored_bytes(m), "bytes_ratio": stored_bytes(m) / fp32_bytes,
                   "resident_bytes": resident_bytes(m), "side": args.side, "txt_len": args.txt_len}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del models, outputs
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("\n| size | scheme | ms | vs fp32 | rel. error | weights MiB | vs fp32 | resident MiB |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        flag = ""
        if r["scheme"] == "int8":
            flag = " ok" if r["ratio"] <= TARGET_RATIO and r["rel_error"] <= TARGET_ERROR else " MISSED"
        print(f"| {r['size']} | {r['scheme']} | {r['ms']:.0f} | {r['ratio']:.2f}x{flag} | {r['rel_error']:.4f} | "
              f"{r['bytes'] / 2**20:.1f} | {r['bytes_ratio']:.3f} | {r['resident_bytes'] / 2**20:.1f} |")
    return rows


def quality(args) -> list[dict]:
    from fluxion import Pipeline
    from fluxion.eval import run_eval

    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        steps = args.steps or DEFAULT_STEPS.get(model, 20)
        for scheme in ["fp32", *args.schemes.split(",")]:
            pipe = Pipeline.from_pretrained(model, device="cpu")
            if scheme != "fp32":
                quantize(pipe.transformer, scheme)

            def generate(prompts, seeds):
                return pipe(prompts, seed=seeds, num_inference_steps=steps, progress=False)

            start = time.perf_counter()
            results = run_eval(generate, args.spec, args.images_per_prompt, Path(args.out) / f"{model}-{scheme}",
                               seed=0)
            rows.append({"model": model, "scheme": scheme, "steps": steps, "score": results["overall"],
                         "ms_per_image": 1000 * results["seconds_per_image"], "wall_s": time.perf_counter() - start,
                         "weights_bytes": stored_bytes(pipe.transformer)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | scheme | steps | GenEval-shapes | vs fp32 | ms per image | transformer MiB |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["scheme"] == "fp32")
        print(f"| {r['model']} | {r['scheme']} | {r['steps']} | {r['score']:.3f} | {r['score'] - base['score']:+.3f} | "
              f"{r['ms_per_image']:.0f} | {r['weights_bytes'] / 2**20:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sp = sub.add_parser("speed", help="one forward per scheme: time, error, bytes")
    sp.add_argument("--sizes", default="60m,300m", help=f"comma-separated, from {', '.join(SIZES)}")
    sp.add_argument("--side", type=int, default=32, help="image token grid side (32 -> 1024 tokens)")
    sp.add_argument("--txt-len", type=int, default=64)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--torchao", action="store_true", help="also time torchao's int8/int8-weight/fp8 configs")
    qp = sub.add_parser("quality", help="GenEval-shapes of the tiny models per scheme")
    qp.add_argument("--models", nargs="+", default=["tiny-schnell", "tiny-dev", "tiny-pro"])
    qp.add_argument("--steps", type=int, help="default: 4 for tiny-schnell, 20 for the others")
    qp.add_argument("--spec", default="evals/shapes.jsonl")
    qp.add_argument("--images-per-prompt", type=int, default=4)
    qp.add_argument("--out", default="runs/quant-eval")
    for p in (sp, qp):
        p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated, from " + ", ".join(SCHEMES))
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
    args = parser.parse_args()
    unknown = [s for s in args.schemes.split(",") if s not in SCHEMES]
    if unknown:
        parser.error(f"--schemes: unknown {unknown}; choose from {list(SCHEMES)}")
    rows = speed(args) if args.part == "speed" else quality(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
