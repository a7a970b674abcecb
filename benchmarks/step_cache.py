"""Step caching (fluxion.cache): time per image and GenEval-shapes score for each cache setting, and the plot.

Target (issue #25): at most 0.6x the uncached time per image with the score within 0.02 of uncached, on tiny-dev
and tiny-pro (true CFG) at 28 steps.

    python benchmarks/step_cache.py --models tiny-dev tiny-pro \\
        --caches fbcache:0.1 fbcache:0.15 fbcache:0.2 fbcache:0.3 taylorseer:2 taylorseer:3 \\
        --json runs/step_cache.json --plot docs/step-cache.png
"""

import argparse
import json
import time
from pathlib import Path


def measure(model: str, caches: list[str], spec: str, steps: int, images_per_prompt: int) -> list[dict]:
    """One eval uncached, then one per cache setting, timing generation alone."""
    from fluxion import Pipeline
    from fluxion.eval import run_eval

    pipe = Pipeline.from_pretrained(model, device="cpu")
    rows = []
    for cache in [None, *caches]:
        def generate(prompts, seeds):
            return pipe(prompts, seed=seeds, num_inference_steps=steps, cache=cache)

        start = time.perf_counter()
        results = run_eval(generate, spec, images_per_prompt, Path("runs/step-cache") / f"{model}-{cache or 'off'}",
                           seed=0)
        rows.append({"model": model, "cache": cache or "off", "score": results["overall"],
                     "ms_per_image": 1000 * results["seconds_per_image"], "wall_s": time.perf_counter() - start,
                     "steps": steps})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from fluxion.files import atomic_write

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next(r for r in rows if r["model"] == model and r["cache"] == "off")
        for kind, marker in (("fbcache", "o"), ("teacache", "^"), ("taylorseer", "s")):
            mine = [base] + [r for r in rows if r["model"] == model and r["cache"].startswith(kind)]
            if len(mine) == 1:
                continue
            x = [r["ms_per_image"] / base["ms_per_image"] for r in mine]
            y = [r["score"] for r in mine]
            ax.plot(x, y, marker=marker, label=f"{model} {kind}")
            for r, xi, yi in zip(mine[1:], x[1:], y[1:]):
                ax.annotate(r["cache"].split(":")[1], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("time per image / uncached")
    ax.set_ylabel("GenEval-shapes overall")
    ax.set_title("Step caching: speed against quality (labels: threshold or interval)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-dev", "tiny-pro"])
    parser.add_argument("--caches", nargs="+", default=["fbcache:0.1", "fbcache:0.15", "fbcache:0.2", "taylorseer:2"],
                        help="cache settings to compare with the uncached run")
    parser.add_argument("--spec", default="evals/shapes.jsonl")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    rows = [r for model in args.models for r in measure(model, args.caches, args.spec, args.steps,
                                                        args.images_per_prompt)]
    print("| model | cache | score | ms per image | vs uncached |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["cache"] == "off")
        print(f"| {r['model']} | {r['cache']} | {r['score']:.3f} | {r['ms_per_image']:.1f} | "
              f"{r['ms_per_image'] / base['ms_per_image']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
