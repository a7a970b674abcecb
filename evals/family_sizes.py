"""The tiny family's scores at every size (issue #27's targets): `fluxion eval` for each model, size, seed set and
spec (evals/shapes.jsonl, and evals/shapes-phrasings.jsonl: the same scenes in held-out wordings), 4 images per
prompt, written to one JSON file and printed as tables with the targets checked.

    python evals/family_sizes.py --out runs/eval/family-sizes.json             # everything (long on a CPU)
    python evals/family_sizes.py --models tiny-schnell --sizes 64x64 --seeds 0  # a part
    python evals/family_sizes.py --models runs/old-models/tiny-schnell --out runs/eval/old-models.json

Results are kept per (model, size, seed, spec) in the JSON file, and a rerun skips the ones it holds, so a long run
can be stopped and resumed. Sizes are WIDTHxHEIGHT.
"""

import argparse
import json
from pathlib import Path

from fluxion import Pipeline
from fluxion.eval import run_eval
from fluxion.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"shapes": ROOT / "evals" / "shapes.jsonl", "phrasings": ROOT / "evals" / "shapes-phrasings.jsonl"}
STEPS = {"tiny-pro": 20, "tiny-dev": 20, "tiny-schnell": 4}  # as the README's table: the spec's samplers
SIZES = ["64x64", "128x128", "128x64", "64x128"]


def steps_for(model: str) -> int:
    """The sampler steps for a model name or folder (runs/old-models/tiny-dev is a tiny-dev)."""
    return STEPS[Path(model).name]


def key(model: str, size: str, seed: int, spec: str) -> str:
    return f"{model} {size} seed={seed} {spec}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(STEPS))
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 100000, 200000])
    parser.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--phrasing-seeds", type=int, nargs="+", default=[0],
                        help="seed sets on which the held-out phrasings are scored")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/eval/family-sizes.json"))
    args = parser.parse_args()

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for model in args.models:
        pipe = Pipeline.from_pretrained(model)
        for size in args.sizes:
            width, height = map(int, size.split("x"))
            for spec in args.specs:
                for seed in args.seeds if spec == "shapes" else args.phrasing_seeds:
                    name = key(Path(model).name, size, seed, spec)  # a folder counts as the model it holds
                    if name in results:
                        continue

                    def generate(prompts, seeds):
                        return pipe(prompts, seed=seeds, num_inference_steps=steps_for(model), height=height,
                                    width=width, allow_any_size=True)  # also a model made for other sizes

                    r = run_eval(generate, SPECS[spec], args.images_per_prompt,
                                 args.out.parent / "family-sizes" / name.replace(" ", "_"), seed=seed)
                    results[name] = {"overall": r["overall"], "overall_se": r["overall_se"],
                                     "held_out": r["held_out"]["accuracy"],
                                     "per_tag": {t: v["accuracy"] for t, v in r["per_tag"].items()},
                                     "binding": r["color_binding"], "ms_per_image": 1000 * r["seconds_per_image"]}
                    print(f"{name}: {r['overall']:.3f} (held-out pairs {r['held_out']['accuracy']:.2f})", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    report(results)


def report(results: dict) -> None:
    """Tables (model x size) of the overall score per seed set, then the targets of issue #27."""
    models = sorted({k.split()[0] for k in results}, key=lambda m: list(STEPS).index(m) if m in STEPS else 9)
    sizes = [s for s in SIZES if any(f" {s} " in k for k in results)]
    get = lambda m, s, seed, spec="shapes": results.get(key(m, s, seed, spec))  # noqa: E731
    seeds = sorted({int(k.split("seed=")[1].split()[0]) for k in results if k.endswith("shapes")})
    print("\n| model | size | " + " | ".join(f"seed {s}" for s in seeds) + " | held-out pairs | phrasings (seed 0) |")
    print("| --- | --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |")
    for m in models:
        for s in sizes:
            cells = [f"{get(m, s, seed)['overall']:.3f}" if get(m, s, seed) else "" for seed in seeds]
            first, phrased = get(m, s, 0), get(m, s, 0, "phrasings")
            held = f"{first['held_out']:.2f}" if first else ""
            print(f"| {m} | {s} | {' | '.join(cells)} | {held} | {phrased['overall']:.3f} |" if phrased else
                  f"| {m} | {s} | {' | '.join(cells)} | {held} | |")
    checks = []
    for s in sizes:
        for m in ("tiny-pro", "tiny-dev"):
            if get(m, s, 0):
                checks.append((f"{m} {s} >= 0.85", get(m, s, 0)["overall"] >= 0.85))
        for seed in seeds:
            if get("tiny-schnell", s, seed) and get("tiny-dev", s, seed):
                gap = get("tiny-dev", s, seed)["overall"] - get("tiny-schnell", s, seed)["overall"]
                checks.append((f"tiny-schnell {s} seed {seed} within 0.03 of tiny-dev (gap {gap:+.3f})", gap <= 0.03))
        for m in models:
            if get(m, s, 0) and get(m, s, 0, "phrasings"):
                gap = get(m, s, 0)["overall"] - get(m, s, 0, "phrasings")["overall"]
                checks.append((f"{m} {s} phrasings within 0.03 (gap {gap:+.3f})", gap <= 0.03))
            if get(m, s, 0):
                checks.append((f"{m} {s} held-out pairs >= 0.75 ({get(m, s, 0)['held_out']:.2f})",
                               get(m, s, 0)["held_out"] >= 0.75))
    print("\n" + "\n".join(f"[{'met' if ok else 'NOT met'}] {name}" for name, ok in checks))


if __name__ == "__main__":
    main()
