"""LoRA adapters on a tiny model: what switching between two loaded adapters costs, against fusing and reloading,
and what unfused adapters add to each image.

Target (issue #24): switching between two loaded adapters under 5 ms on the tiny models.

    python benchmarks/lora_switch.py --model tiny-dev --lora star
"""

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-dev")
    parser.add_argument("--lora", default="star", help="a LoRA file or name; a second, random adapter of the same "
                                                       "targets and rank is made beside it")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--images", type=int, default=10, help="64x64 images timed with and without adapters")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fluxion import Pipeline
    from fluxion.lora import Adapter, LowRank, add_adapter
    from fluxion.registry import find_lora

    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    path = find_lora(args.lora)
    first = pipe.load_lora(path, name="first")
    state = pipe.transformer._fluxion_lora
    generator = torch.Generator().manual_seed(0)
    other = Adapter("second", {p: LowRank(torch.randn(u.down.shape, generator=generator) * 0.01,
                                          torch.randn(u.up.shape, generator=generator) * 0.01, 1.0)
                               for p, u in state.adapters[first].updates.items()})
    add_adapter(pipe.transformer, other, 1.0)
    which = iter(range(10**9))

    def switch():
        pipe.set_loras({"first": 1.0} if next(which) % 2 else {"second": 0.8})

    def fused_switch():  # a fused model must restore its weights and merge the other adapter
        pipe.unfuse_loras()
        switch()
        pipe.fuse_loras()

    def reload():  # what switching costs without adapters kept loaded
        pipe.unload_loras()
        pipe.load_lora(path, name="first")

    figures = {"switch_ms": 1000 * timed(switch, args.repeats)}
    pipe.fuse_loras()
    figures["fused_switch_ms"] = 1000 * timed(fused_switch, args.repeats)
    pipe.unfuse_loras()
    figures["reload_ms"] = 1000 * timed(reload, max(5, args.repeats // 5))

    prompts = ["two yellow stars"] * args.images
    image = lambda: pipe(prompts, seed=list(range(args.images)))  # noqa: E731
    pipe.unload_loras()
    figures["image_ms_without"] = 1000 * timed(image, 3) / args.images
    pipe.load_lora(path, name="first")
    figures["image_ms_unfused"] = 1000 * timed(image, 3) / args.images
    pipe.fuse_loras()
    figures["image_ms_fused"] = 1000 * timed(image, 3) / args.images

    print(f"{args.model} + {path.name}, {torch.get_num_threads()} threads")
    print("| what | ms |\n| --- | ---: |")
    for key, label in (("switch_ms", "switch between two loaded adapters (set_loras)"),
                       ("fused_switch_ms", "switch while fused (unfuse, set_loras, fuse)"),
                       ("reload_ms", "unload and load the file again"),
                       ("image_ms_without", "one 64x64 image, no adapter"),
                       ("image_ms_unfused", "one 64x64 image, adapter unfused (hooks)"),
                       ("image_ms_fused", "one 64x64 image, adapter fused")):
        print(f"| {label} | {figures[key]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
