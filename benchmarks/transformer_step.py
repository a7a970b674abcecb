"""One forward of fluxion's Flux vs diffusers' FluxTransformer2DModel with identical weights, on CPU.

Both models are built in this process (diffusers' loads our weights through checkpoints.to_diffusers), run under
torch.inference_mode on the same inputs, and are timed alternately (median of --repeats). Also timed: the same GEMM
and attention calls alone ("gemm+attn"), the floor no implementation on these kernels goes under.
Target (issue): ours <= 0.9x diffusers' time at every size in fp32.

    python benchmarks/transformer_step.py --threads 1 --repeats 7 --json transformer_step.json
"""

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from fluxion.checkpoints import diffusers_config, to_diffusers
from fluxion.model import TRANSFORMER_PRESETS, Flux, FluxParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# FLUX text dims (T5-XXL tokens, CLIP-L pooled vector) for the two larger sizes, so txt_in is realistic too.
SIZES: dict[str, FluxParams] = {
    "tiny": TRANSFORMER_PRESETS["debug"],
    "60m": FluxParams(vec_in_dim=768, context_in_dim=4096, hidden_size=512, num_heads=8, depth=4,
                      depth_single_blocks=6, axes_dim=[8, 28, 28], guidance_embed=True),
    "300m": FluxParams(vec_in_dim=768, context_in_dim=4096, hidden_size=1024, num_heads=8, depth=4,
                       depth_single_blocks=10, axes_dim=[16, 56, 56], guidance_embed=True),
}
TARGET_RATIO = 0.9


@dataclass
class Result:
    size: str
    dtype: str
    params: int
    ours_ms: float
    diffusers_ms: float
    ratio: float
    floor_ms: float | None  # the same GEMM and attention calls alone (fp32 only)
    max_abs_diff: float
    max_abs_out: float


def random_flux(params: FluxParams, seed: int = 0) -> Flux:
    """Our model in eval mode with seeded random weights."""
    ours = Flux(params).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            # std 1/sqrt(fan_in) keeps activations O(1) through the depth, so the output comparison means something
            std = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith(".scale") else 0.0))
    return ours


def build_pair(params: FluxParams, seed: int = 0):
    """Our model with random weights, and diffusers' model loaded with the same weights through the key map."""
    import diffusers  # test-only oracle: imported here so fluxion itself never needs it

    ours = random_flux(params, seed)
    config = {k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
    theirs = diffusers.FluxTransformer2DModel(**config).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), "transformer"), strict=True)
    return ours, theirs


def make_inputs(params: FluxParams, side: int, txt_len: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Batch 1: a side x side grid of packed image tokens (a 16*side px image) and txt_len text tokens."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "img": torch.randn(1, side * side, params.in_channels, generator=g),
        "txt": torch.randn(1, txt_len, params.context_in_dim, generator=g),
        "y": torch.randn(1, params.vec_in_dim, generator=g),
        "t": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(txt_len, 3),
    }


def run_ours(model: Flux, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"],
                 guidance=x["guidance"] if model.params.guidance_embed else None)


def run_theirs(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
                 img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                 guidance=x["guidance"] if model.config.guidance_embeds else None, return_dict=False)[0]


def _tokens(name: str, img_len: int, txt_len: int) -> int:
    """How many rows one forward feeds the nn.Linear called `name`."""
    if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1")) or name.startswith(
            ("time_in", "vector_in", "guidance_in")):
        return 1  # adaLN and conditioning: one vector per sample
    if name.startswith("single_blocks"):
        return img_len + txt_len
    return txt_len if name == "txt_in" or ".txt_" in name else img_len


def matmul_floor(model: Flux, img_len: int, txt_len: int, dtype: torch.dtype):
    """Every GEMM and attention call of one forward, alone and on random inputs: both implementations make these
    same calls, so no forward on these kernels can be faster than this."""
    p = model.params
    calls = [(m, torch.randn(1, _tokens(name, img_len, txt_len), m.in_features, dtype=dtype))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    qkv = [torch.randn(1, p.num_heads, img_len + txt_len, p.hidden_size // p.num_heads, dtype=dtype)
           for _ in range(3)]

    def run():
        for linear, x in calls:
            linear(x)
        for _ in range(p.depth + p.depth_single_blocks):
            torch.nn.functional.scaled_dot_product_attention(*qkv)
    return run


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench(size: str, dtype_name: str, side: int, txt_len: int, warmup: int, repeats: int) -> Result:
    params = SIZES[size]
    dtype = DTYPES[dtype_name]
    ours, theirs = build_pair(params)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    # t and guidance in the model dtype too, as sampling.denoise passes them; positions stay fp32
    x = {k: v if k.endswith("_ids") else v.to(dtype) for k, v in make_inputs(params, side, txt_len).items()}
    runs = {"ours": lambda: run_ours(ours, x), "theirs": lambda: run_theirs(theirs, x)}
    if dtype == torch.float32:  # where the target applies; in bf16 it would add minutes to the run
        runs["floor"] = matmul_floor(ours, side * side, txt_len, dtype)
    times = {who: [] for who in runs}
    with torch.inference_mode():
        got, expected = runs["ours"](), runs["theirs"]()
        for _ in range(warmup - 1):
            runs["ours"](), runs["theirs"]()
        runs.get("floor", lambda: None)()
        for r in range(repeats):
            # alternate who goes first: a burst of load from elsewhere on the machine hits both sides alike
            for who in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                times[who].append(_ms(runs[who]))
    ours_ms, theirs_ms = statistics.median(times["ours"]), statistics.median(times["theirs"])
    return Result(size=size, dtype=dtype_name, params=sum(p.numel() for p in ours.parameters()),
                  ours_ms=ours_ms, diffusers_ms=theirs_ms, ratio=ours_ms / theirs_ms,
                  floor_ms=statistics.median(times["floor"]) if "floor" in times else None,
                  max_abs_diff=(got.float() - expected.float()).abs().max().item(),
                  max_abs_out=expected.float().abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,60m,300m", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per model first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--side", type=int, default=16, help="image token grid side (16 -> 256 tokens, 256 px)")
    parser.add_argument("--txt-len", type=int, default=64, help="text tokens")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args()
    sizes, dtypes = args.sizes.split(","), args.dtypes.split(",")
    for name, allowed, what in ((sizes, SIZES, "--sizes"), (dtypes, DTYPES, "--dtypes")):
        unknown = [n for n in name if n not in allowed]
        if unknown:
            parser.error(f"{what}: unknown {unknown}; choose from {list(allowed)}")
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    torch.set_num_threads(args.threads)

    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # its warning about .to(bf16) concerns fp32-pinned modules it lacks
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"diffusers {diffusers.__version__}, {torch.get_num_threads()} threads")
    print(f"{machine}; batch 1, {args.side * args.side} image + {args.txt_len} text tokens, "
          f"median of {args.repeats} (after {args.warmup} warm-up), ours/diffusers interleaved; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'size':>5} {'dtype':>5} {'params':>12} {'ours ms':>10} {'diffusers ms':>13} {'ratio':>6} "
          f"{'gemm+attn ms':>13} {'max|diff|':>10} {'max|out|':>9}")
    results = []
    for dtype in dtypes:
        for size in sizes:
            r = bench(size, dtype, args.side, args.txt_len, args.warmup, args.repeats)
            results.append(r)
            flag = "" if dtype != "fp32" else ("  ok" if r.ratio <= TARGET_RATIO else f"  > {TARGET_RATIO}")
            floor = f"{r.floor_ms:13.1f}" if r.floor_ms is not None else f"{'-':>13}"
            print(f"{r.size:>5} {r.dtype:>5} {r.params:>12,} {r.ours_ms:>10.1f} {r.diffusers_ms:>13.1f} "
                  f"{r.ratio:>6.2f} {floor} {r.max_abs_diff:>10.2e} {r.max_abs_out:>9.2f}{flag}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews the timings)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
