"""Training throughput of a recipe's transformer on this machine, in fp32 and under bf16 autocast.

One step = forward + an MSE loss (costs what the flow-matching one does) + backward + AdamW update, at the
recipe's batch size and text length, on a 64x64 image (16 packed tokens), with random inputs: the rate the recipe's
`run.precision` choice buys. bf16 pays only on CPUs with bf16 instructions (AVX512-BF16, AMX); elsewhere it is
several times slower than fp32.

    python benchmarks/train_step.py recipes/history/tiny-pro-cycle8.toml --threads 2
"""

import argparse
import json
import statistics
import time


def steps_per_second(model, batch, precision: str, steps: int, warmup: int) -> float:
    import torch

    x0, img_ids, txt, txt_ids, t, vec = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(x0, img_ids, txt, txt_ids, t, vec).float() - x0).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a transformer recipe (its model params, batch size and text length)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is reported")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch

    from fluxion.model import Flux
    from fluxion.sampling import image_ids, text_ids
    from fluxion.training import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe)
    params = cfg.model_params()
    torch.manual_seed(0)
    model = Flux(params).initialize_weights().train()
    B, L = cfg.run.batch_size, cfg.data.text_length
    batch = (torch.randn(B, 16, params.in_channels), image_ids(B, 8, 8), torch.randn(B, L, params.context_in_dim),
             text_ids(B, L), torch.rand(B), torch.randn(B, params.vec_in_dim))  # an 8x8 latent: 16 tokens
    precisions = args.precisions.split(",")
    rates = {p: [] for p in precisions}
    for r in range(args.repeats):
        for p in precisions if r % 2 == 0 else precisions[::-1]:
            rates[p].append(steps_per_second(model, batch, p, args.steps, warmup=3))
    result = {"recipe": args.recipe, "parameters": sum(p.numel() for p in model.parameters()), "batch_size": B,
              "text_length": L, "threads": torch.get_num_threads(),
              "steps_per_s": {p: statistics.median(v) for p, v in rates.items()}}
    print(f"{args.recipe}: {result['parameters'] / 1e6:.2f}M parameters, batch {B}, {L} text tokens, "
          f"{result['threads']} threads")
    for p, v in result["steps_per_s"].items():
        ratio = v / result["steps_per_s"][precisions[0]]
        print(f"  {p}: {v:.2f} steps/s ({v * B:.0f} images/s), {ratio:.2f}x {precisions[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
