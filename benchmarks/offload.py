"""Offload (fluxion.offload) on CUDA: peak GPU memory and time with no offload, model offload and sequential
offload, for a FLUX.1-sized transformer (12B parameters, random weights) and the FLUX VAE. Prints one JSON line per
mode, then a summary line. About 2 minutes on one H100 (building the 24 GB of bf16 weights and pinning their CPU
copies included); it needs about 60 GB of host memory.

    python benchmarks/offload.py                       # flux, bf16, 1024x1024, 4 steps
    python benchmarks/offload.py --size 300m --steps 8 # a quick look with a smaller transformer
    python benchmarks/offload.py --cpu                 # no GPU: the hooks' (and copies') cost on tiny-dev jobs

A "job" here is `--steps` transformer forwards (batch 1, 512 text tokens) then one VAE decode, as a generation
runs them; the text encoder is left out (model offload treats it like the VAE). Timings are wall time after
torch.cuda.synchronize; peaks are torch.cuda.max_memory_allocated (all live tensors: resident weights included)
over the transformer steps and over the decode.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_step import SIZES  # noqa: E402

from fluxion.model import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoder, Flux  # noqa: E402
from fluxion.offload import disable_offload, enable_offload  # noqa: E402

GIB = 2**30
DEVICE = "cuda"  # a module constant so a CPU dry run of this script can swap it


@torch.no_grad()
def build(size: str, dtype: torch.dtype) -> tuple[Flux, AutoEncoder]:
    """Random weights made on the GPU (seconds, not the minutes of 12B CPU draws), then sent home to the CPU."""
    params = TRANSFORMER_PRESETS["flux-dev"] if size == "flux" else SIZES[size]
    with torch.device("meta"):
        transformer, vae = Flux(params), AutoEncoder(AUTOENCODER_PRESETS["flux"])
    models = []
    for model in (transformer, vae):
        model.to(dtype).to_empty(device=DEVICE)  # in the target dtype from the start: 24 GB, not 48 + 24
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # std 1/sqrt(fan_in): activations stay O(1) through the depth
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:  # norm scales 1, biases 0
                p.fill_(1.0 if name.endswith(".scale") or ("norm" in name and name.endswith("weight")) else 0.0)
        models.append(model.eval().to("cpu"))
    torch.cuda.empty_cache()
    return models[0], models[1]


def inputs(params, height: int, width: int, txt_len: int, dtype: torch.dtype) -> dict:
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    g = torch.Generator().manual_seed(0)
    x = {"img": torch.randn(1, h * w, params.in_channels, generator=g), "img_ids": ids.reshape(1, h * w, 3),
         "txt": torch.randn(1, txt_len, params.context_in_dim, generator=g), "txt_ids": torch.zeros(1, txt_len, 3),
         "timesteps": torch.tensor([0.7]), "y": torch.randn(1, params.vec_in_dim, generator=g),
         "guidance": torch.tensor([3.5]) if params.guidance_embed else None}
    return {k: None if v is None else v.to(DEVICE, v.dtype if k.endswith("_ids") else dtype) for k, v in x.items()}


def job(transformer: Flux, vae: AutoEncoder, x: dict, steps: int, latent_hw: tuple[int, int]) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step_times, out = [], None
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            t0 = time.perf_counter()
            pred = transformer(**x)
            torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            out = pred[0, :4].float().cpu() if out is None else out
        steps_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        z = torch.randn(1, 16, *latent_hw, device=DEVICE, dtype=x["img"].dtype)
        t0 = time.perf_counter()
        vae.decode(z)
        torch.cuda.synchronize()
        decode = time.perf_counter() - t0
    decode_peak = torch.cuda.max_memory_allocated()
    return {"job_s": time.perf_counter() - start, "first_step_s": step_times[0],
            "step_s": statistics.median(step_times[1:] or step_times), "decode_s": decode,
            "peak_gib": max(steps_peak, decode_peak) / GIB, "steps_peak_gib": steps_peak / GIB,
            "decode_peak_gib": decode_peak / GIB, "first_pred": out}


def run_cuda(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/offload.py measures GPU memory and needs CUDA (torch.cuda.is_available() is "
                         "False here); --cpu reports the hooks' overhead on tiny-dev instead")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    transformer, vae = build(args.size, dtype)
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters()) / GIB
               for name, m in (("transformer", transformer), ("vae", vae))}
    print(json.dumps({"device": torch.cuda.get_device_name(), "size": args.size, "dtype": args.dtype,
                      "height": args.height, "width": args.width, "steps": args.steps, "weights_gib": weights,
                      "build_s": time.perf_counter() - t0}), flush=True)
    x = inputs(transformer.params, args.height, args.width, args.txt_len, dtype)
    latent_hw = (args.height // 8, args.width // 8)
    results, preds = {}, {}
    for mode in ("sequential", "model", None):  # no offload last: it leaves the weights on the GPU
        models = {"transformer": transformer, "autoencoder": vae}
        t0 = time.perf_counter()
        if mode is None:
            transformer.to(DEVICE)
            vae.to(DEVICE)
        else:
            enable_offload(mode, models, DEVICE)  # pins the CPU copies the first time
        setup = time.perf_counter() - t0
        job(transformer, vae, x, 1, latent_hw)  # warm-up: cuDNN/cuBLAS handles, allocator
        if mode is not None:
            for m in models.values():
                getattr(m, "_fluxion_offload").evict()
        r = job(transformer, vae, x, args.steps, latent_hw)
        preds[mode or "none"] = r.pop("first_pred")
        r = {"mode": mode or "none", "setup_s": setup, **r}
        results[r["mode"]] = r
        print(json.dumps(r), flush=True)
        if mode is not None:
            for m in models.values():
                disable_offload(m)
    print(json.dumps({"summary": {m: {"steps_peak_gib": round(r["steps_peak_gib"], 2),
                                      "decode_peak_gib": round(r["decode_peak_gib"], 2),
                                      "step_s": round(r["step_s"], 3), "job_s": round(r["job_s"], 2)}
                                  for m, r in results.items()},
                      "max_abs_diff_vs_none": {m: (p - preds["none"]).abs().max().item() for m, p in preds.items()}}),
          flush=True)


def run_cpu(args) -> None:
    """tiny-dev jobs on the CPU with the "device" the CPU too: every move is a real copy, so this is the cost of
    the hooks and copies, not of a transfer over a bus."""
    from fluxion.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained("tiny-dev", device="cpu", dtype="fp32")
    models = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "autoencoder": pipe.autoencoder}
    kwargs = dict(seed=0, num_inference_steps=args.steps, output_type="pt")
    reference = None
    for mode in (None, "model", "sequential"):
        if mode is not None:
            enable_offload(mode, models, "cpu")
        pipe("a red circle", **kwargs)
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            out = pipe("a red circle", **kwargs)
            times.append(time.perf_counter() - start)
        reference = out if mode is None else reference
        print(json.dumps({"device": "cpu", "model": "tiny-dev", "mode": mode or "none", "steps": args.steps,
                          "job_s": statistics.median(times), "identical": bool(torch.equal(out, reference))}),
              flush=True)
        for m in models.values():
            disable_offload(m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="flux", choices=["flux", *SIZES], help="flux: FLUX.1-dev's 12B shape")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--txt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="transformer forwards per job")
    parser.add_argument("--cpu", action="store_true", help="no GPU: the hooks' overhead on tiny-dev jobs")
    parser.add_argument("--repeats", type=int, default=5, help="with --cpu: jobs per mode (median)")
    parser.add_argument("--threads", type=int, default=2, help="with --cpu: torch threads")
    args = parser.parse_args()
    if args.cpu:
        run_cpu(args)
    else:
        run_cuda(args)


if __name__ == "__main__":
    main()
