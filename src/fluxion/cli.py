"""The `fluxion` command: generate, models, info, convert, eval, lora, train, serve."""

import argparse
import json
import logging
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import FluxionError, InputError, ModelNotFoundError
from .registry import DEFAULT_MODEL

log = logging.getLogger("fluxion")

# Bad usage (a wrong option, file or model name) exits 2, as argparse does; anything else that fails exits 1.
USAGE_ERRORS = (InputError, ModelNotFoundError)
INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image (and image-to-image, inpainting)")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file / --from-image)")
    model = p.add_argument_group("model")
    model.add_argument("--model", help=f"built-in name, name under $FLUXION_HOME, or folder (default {DEFAULT_MODEL})")
    model.add_argument("--device", help="cuda, mps, cpu (default: the best available)")
    model.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    _lora_flag(model)
    _speed_flags(model)
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt-file", type=Path, help="one prompt per line")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int, help="number of inference steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="distilled guidance (dev models)")
    gen.add_argument("--true-cfg", type=float, help="classifier-free guidance scale (needs a negative prompt, "
                                                    "or a pro model)")
    gen.add_argument("--seed", type=int, nargs="+", help="one image per seed per prompt")
    gen.add_argument("--num-images", type=int, help="images per prompt (seeds seed, seed+1, ...)")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--sigmas", type=float, nargs="+", help="custom descending times, e.g. 1.0 0.75 0.5 0.25")
    i2i = p.add_argument_group("image-to-image and inpainting")
    i2i.add_argument("--init-image", type=Path)
    i2i.add_argument("--strength", type=float, help="how much of the init image to regenerate, in (0, 1]")
    i2i.add_argument("--mask", type=Path, help="white = regenerate (needs --init-image)")
    _cache_flag(gen)
    limits = p.add_argument_group("limits")
    limits.add_argument("--allow-any-size", action="store_true",
                        help="allow sizes outside the model's supported range (warns, with a time estimate)")
    limits.add_argument("--max-memory", help="memory budget for weights and work, e.g. 8GB (default: what the "
                                             "device has available)")
    limits.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                        help="decode in tiles (default: only when the whole image would not fit)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="fluxion.png",
                     help="a .png file (several images: -<n> before the suffix), or a folder (an existing one, a "
                          "path ending in / or without a suffix): <prompt>-<seed>.png, never overwriting")
    out.add_argument("--from-image", type=Path, help="reproduce a PNG written by fluxion (flags given override)")


def _lora_flag(group) -> None:
    group.add_argument("--lora", action="append", metavar="PATH_OR_NAME[:SCALE]",
                       help="apply a LoRA file (or a name: built-in, e.g. star, or under $FLUXION_HOME/loras) at "
                            "SCALE (default 1); repeat to stack adapters")


def _speed_flags(group) -> None:
    group.add_argument("--quantize", metavar="SCHEME", help="quantize the transformer: int8, int8-weight, fp8 or "
                                                           "int4 (kept under $FLUXION_HOME/quantized after the "
                                                           "first start)")
    group.add_argument("--offload", choices=["model", "sequential"],
                       help="keep the weights on the CPU and move each model (or block) to the GPU while it runs")
    group.add_argument("--compile", action="store_true", help="torch.compile the transformer (pays off over many "
                                                              "steps or images; the first call compiles)")
    group.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")


def load_pipeline(args, model: str, *, device=None, dtype=None, quantize=None, lora_records=None):
    """The pipeline with the flags' speed and memory options, and its --lora adapters (or an image's)."""
    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, quantize=quantize, offload=args.offload,
                                    vae_slicing=args.vae_slicing)
    apply_loras(pipe, args.lora, lora_records)
    if args.compile:
        pipe.compile()  # after the adapters: their hooks are compiled in
    return pipe


def _cache_flag(group) -> None:
    group.add_argument("--cache", metavar="KIND[:VALUE]",
                       help="step caching: fbcache[:THRESHOLD] (First-Block Cache, default 0.2) skips most of the "
                            "transformer on steps whose input barely changed; teacache[:THRESHOLD] (default 0.1) "
                            "skips while the summed change of its input stays small; taylorseer[:N] (default 3) "
                            "runs it in full every N steps and extrapolates in between")


def parse_lora(raw: str) -> tuple[str, float]:
    """'star', 'star:0.8', 'path/to/file.safetensors:1.2' -> (name or path, scale)."""
    from .settings import lora_scale

    spec, sep, tail = raw.rpartition(":")
    if not sep:
        return raw, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return raw, 1.0  # a ':' inside the path
    if not spec:
        raise InputError(f"--lora: expected PATH_OR_NAME[:SCALE], got {raw!r}")
    return spec, lora_scale(f"--lora {spec} scale", scale)


def apply_loras(pipe, specs: list[str] | None, records: list[dict] | None = None) -> None:
    """Load --lora adapters into the pipeline; without any, the adapters an image recorded (--from-image), each
    found by its file name with the recorded sha256."""
    from .registry import find_lora

    if specs:
        for spec, scale in map(parse_lora, specs):
            pipe.load_lora(spec, scale=scale)
        return
    for record in records or []:
        try:
            path = find_lora(record["file"], sha256=record["sha256"])
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"--from-image: the image was made with LoRA {record['name']!r} "
                                     f"(scale {record['scale']:g}), which is missing: {e}. Pass it with --lora "
                                     "PATH:SCALE") from None
        pipe.load_lora(path, name=record["name"], scale=record["scale"])


# generate's flags, by the name GenerationRequest and the image record give them
_RECORD_FLAGS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "model": "model",
                 "num_inference_steps": "steps", "guidance_scale": "guidance", "true_cfg_scale": "true_cfg",
                 "width": "width", "height": "height", "init_image": "init_image", "strength": "strength",
                 "mask_image": "mask", "sigmas": "sigmas", "dtype": "dtype", "device": "device", "cache": "cache",
                 "quantize": "quantize"}


def _resolve_generate_args(args) -> dict:
    """Merge --from-image settings with explicit flags into one dict of settings, keyed by flag."""
    from .metadata import read_settings

    s = {}
    if args.from_image:
        record = read_settings(args.from_image)
        s = {flag: getattr(record, name) for name, flag in _RECORD_FLAGS.items()}
        s["seed"] = [record.seed]
        s["loras"] = record.loras
    for key in (*_RECORD_FLAGS.values(), "seed", "num_images"):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    prompts = [s["prompt"]] if s.get("prompt") is not None else []
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise InputError(f"--prompt-file: no such file {args.prompt_file}")
        try:
            lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"--prompt-file: {args.prompt_file} is not UTF-8 text ({e})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError("give a PROMPT, --prompt-file or --from-image")
    s["prompts"] = prompts
    return s


def generation_request(s: dict, args):
    """The checked request for generate's settings: every refusal names the flag, before any model loads."""
    from .settings import GenerationRequest

    seeds, num_images = s.get("seed"), s.get("num_images")
    if seeds and len(seeds) > 1:  # one image per seed per prompt
        if num_images not in (None, len(seeds)):
            raise InputError(f"num_images_per_prompt (--num-images): {num_images} conflicts with the {len(seeds)} "
                             "seeds given (one image per seed)")
        num_images, seeds = len(seeds), seeds * len(s["prompts"])
    elif seeds:
        seeds = seeds[0]
    return GenerationRequest(
        prompt=s["prompts"], negative_prompt=s.get("negative_prompt"), height=s.get("height"), width=s.get("width"),
        num_inference_steps=s.get("steps"), guidance_scale=s.get("guidance"), true_cfg_scale=s.get("true_cfg"),
        seed=seeds, num_images_per_prompt=1 if num_images is None else num_images, image=s.get("init_image"),
        strength=1.0 if s.get("strength") is None else s["strength"], mask_image=s.get("mask"),
        sigmas=s.get("sigmas"), max_memory=args.max_memory, cache=s.get("cache"),
        # reproducing an image at its recorded size: that size was accepted when the image was made
        allow_any_size=args.allow_any_size or bool(args.from_image and args.width is None and args.height is None))


@dataclass
class OutputTarget:
    """Where generate writes: one PNG path (several images numbered -<n>), or a folder of <slug>-<seed>.png
    files that never replace an earlier run's."""

    path: Path
    folder: bool

    @classmethod
    def parse(cls, raw: str) -> "OutputTarget":
        path = Path(raw)
        if raw.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
            if path.exists() and not path.is_dir():
                raise InputError(f"--out: {path} exists and is not a folder")
            return cls(path, folder=True)
        if path.suffix.lower() != ".png":
            raise InputError(f"--out: expected a .png file or a folder, got {raw!r} (fluxion writes PNG, whose "
                             "text chunk keeps the settings)")
        if path.parent.exists() and not path.parent.is_dir():
            raise InputError(f"--out: {path.parent} is not a folder")
        return cls(path, folder=False)

    def name(self, index: int, count: int, prompt: str, seed: int) -> Path:
        if self.folder:
            return self.path / f"{slug(prompt)}-{seed}.png"
        if count == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}-{index}{self.path.suffix}")


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe rendering of a prompt: ASCII letters and digits joined by '-', at most `limit` long."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    return "-".join(words)[:limit].strip("-") or "image"


def cmd_generate(args) -> None:
    from .metadata import GenerationSettings, PNG_KEY, save_png
    from .pipeline import check_options
    from .registry import find_lora

    target = OutputTarget.parse(args.out)
    s = _resolve_generate_args(args)
    request = generation_request(s, args)
    if args.lora:
        for spec, _ in map(parse_lora, args.lora):  # a wrong name fails before the model loads
            find_lora(spec)
    check_options(s.get("quantize"), args.offload)
    pipe = load_pipeline(args, s.get("model") or DEFAULT_MODEL, device=s.get("device"), dtype=s.get("dtype"),
                         quantize=s.get("quantize"), lora_records=s.get("loras"))
    images = (image for batch in pipe.generate_batches(request, progress=True, vae_tiling=args.vae_tiling)
              for image in batch)
    for i, image in enumerate(images):  # saved as each batch finishes: Ctrl-C keeps the images already made
        settings = GenerationSettings.from_json(image.info[PNG_KEY])
        path = target.name(i, request.num_images, settings.prompt, settings.seed)
        path = save_png(image, path, settings, overwrite=not target.folder)
        print(f"{path}  seed={settings.seed}", flush=True)


def cmd_models(args) -> None:
    from .registry import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no models found (built-in folder empty, nothing under $FLUXION_HOME)")
        return
    header = ("name", "source", "variant", "layout", "parameters", "size", "path")
    table = [header] + [(r["name"], r["source"], r.get("variant") or "?", r.get("layout") or "?",
                         f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "?",
                         f"{r['bytes'] / 1e6:.1f} MB", r["path"] + (f"  ({r['error']})" if r.get("error") else ""))
                        for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def describe(path: Path) -> dict:
    """What `fluxion info` prints: component, layout, variant, sizes, dtypes and a summary of the keys."""
    from dataclasses import asdict

    from .checkpoints import open_checkpoint

    from .quant import is_quantized_file

    if is_quantized_file(path):  # its quantized layers have no .weight to infer sizes from: the header has them
        return describe_quantized(path)
    source = open_checkpoint(path)
    params = source.params()
    info = {"path": str(path), "component": source.component, "layout": source.layout}
    if source.component == "transformer":
        kind = {64: "", 384: " (fill: image + mask conditioning)", 128: " (control: depth/canny conditioning)"}
        variant = "dev (guidance-distilled)" if params.guidance_embed else "schnell or pro (no guidance input)"
        info["variant"] = variant + kind.get(params.in_channels, f" (img_in width {params.in_channels})")
    info["params"] = asdict(params)
    info["num_parameters"] = sum(i.num_params for i in source.infos)
    info["bytes"] = sum(i.total_bytes for i in source.infos)
    dtypes: dict[str, int] = {}
    for i in source.infos:
        for name, count in i.dtype_counts().items():
            dtypes[name] = dtypes.get(name, 0) + count
    info["dtypes"] = dtypes
    groups: dict[str, int] = {}
    for key in source.shapes:
        top = key[len(source.prefix):].split(".")[0]
        groups[top] = groups.get(top, 0) + 1
    info["keys"] = {"total": len(source.shapes), "by_prefix": groups}
    fluxion_meta = {k: v for k, v in source.metadata.items() if k.startswith("fluxion.")}
    if fluxion_meta:
        info["metadata"] = fluxion_meta
    return info


def describe_quantized(path: Path) -> dict:
    from .checkpoints.io import read_checkpoint_info
    from .quant.storage import DTYPE_KEY, PARAMS_KEY, QUANT_METADATA_KEY

    header = read_checkpoint_info(path)
    meta = header.metadata
    return {"path": str(path), "component": "transformer", "layout": "fluxion quantized",
            "quantization": meta.get(QUANT_METADATA_KEY), "compute_dtype": meta.get(DTYPE_KEY),
            "params": json.loads(meta.get(PARAMS_KEY, "{}")), "bytes": path.stat().st_size,
            "keys": {"total": len(header.tensors)}}


def cmd_info(args) -> None:
    print(json.dumps(describe(args.checkpoint), indent=2))


def cmd_convert(args) -> None:
    from .checkpoints import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, to=args.to)
    print(f"wrote {out}")


def cmd_eval(args) -> None:
    from .eval import format_table, run_eval
    from .pipeline import check_options
    from .settings import GenerationRequest, integer

    images_per_prompt = integer("images_per_prompt", args.images_per_prompt, 1, 1000)
    seed = integer("seed", args.seed, 0, 2**62)
    GenerationRequest(prompt="check", num_inference_steps=args.steps, guidance_scale=args.guidance,
                      true_cfg_scale=args.true_cfg, cache=args.cache)  # refuse bad settings before the model loads
    if not args.spec.is_file():
        raise InputError(f"--spec: no such file {args.spec}")
    check_options(args.quantize, args.offload)
    pipe = load_pipeline(args, args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    size = pipe.defaults.size
    height, width = args.height or size, args.width or size
    pipe.check_size(height, width, args.allow_any_size)  # before any image is made

    def generate(prompts, seeds):
        return pipe(prompts, seed=seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    true_cfg_scale=args.true_cfg, cache=args.cache, height=height, width=width,
                    allow_any_size=args.allow_any_size)

    results = run_eval(generate, args.spec, images_per_prompt, args.out, seed=seed)
    print(f"{args.model} at {width}x{height} (width x height), spec {args.spec}, seed {seed}")
    print(format_table(results))
    print(f"generation: {1000 * results['seconds_per_image']:.1f} ms per image, in batches of "
          f"{images_per_prompt}; report: {args.out}/results.json and contact sheets")


def cmd_fit_teacache(args) -> None:
    from .cache import fit_teacache
    from .files import atomic_write
    from .pipeline import Pipeline
    from .registry import MANIFEST, read_json, resolve
    from .settings import integer

    count = integer("prompts", args.prompts, 2, 10_000)
    degree = integer("degree", args.degree, 1, 6)
    if not args.spec.is_file():
        raise InputError(f"--spec: no such file {args.spec}")
    prompts = [json.loads(line)["prompt"] for line in args.spec.read_text().splitlines() if line.strip()]
    prompts = prompts[:: max(len(prompts) // count, 1)][:count]  # spread over the spec's kinds of prompt
    files = resolve(args.model)
    if args.write and files.layout != "fluxion":
        raise InputError(f"--write: {files.root} has no {MANIFEST} to record the polynomial in")
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    cfg = {"negative_prompt": ""} if pipe.variant == "pro" else {}  # fit on both CFG halves, as they are cached
    fit = fit_teacache(pipe, prompts, steps=args.steps, degree=degree, **cfg)
    print(json.dumps({"model": pipe.name, "teacache": fit.polynomial, "r_squared": round(fit.r_squared, 4),
                      "pairs": fit.pairs, "input_range": fit.input_range}))
    if args.write:
        manifest = files.root / MANIFEST
        data = {**read_json(manifest), "teacache": [float(f"{c:.6g}") for c in fit.polynomial]}
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
        print(f"wrote the polynomial to {manifest}")


def _lora_base(path: Path, model: str | None):
    """The transformer a LoRA file is read against: --model, else the base model its header names (on the meta
    device: only the module shapes matter)."""
    import torch

    from .checkpoints import open_checkpoint
    from .checkpoints.io import read_checkpoint_info
    from .model import Flux
    from .registry import resolve

    name = model or read_checkpoint_info(path).metadata.get("fluxion.base_model")
    if not name:
        raise InputError(f"{path} does not name its base model: pass --model (the model it was trained for)")
    with torch.device("meta"):
        return Flux(open_checkpoint(resolve(name).transformer).params())


def cmd_lora(args) -> None:
    from .lora import convert_lora, describe_lora
    from .registry import find_lora

    path = find_lora(str(args.file))
    if args.lora_command == "info":
        model = _lora_base(path, args.model) if args.model else None
        print(json.dumps(describe_lora(path, model), indent=2))
    else:
        out = convert_lora(path, args.out, to=args.to, model=_lora_base(path, args.model))
        print(f"wrote {out}")


def cmd_train(args) -> None:
    from .settings import integer
    from .training import run_recipe

    max_steps = None if args.max_steps is None else integer("max_steps", args.max_steps, 1, 10**9)
    if not args.config.is_file():
        raise InputError(f"config: no such recipe {args.config}")
    for out in run_recipe(args.config, stage=args.stage, resume=not args.no_resume, max_steps=max_steps,
                          out_dir=args.out_dir):
        print(f"run folder: {out}")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: the OpenAI and BFL image APIs, with batching (fluxion[server])")
    p.add_argument("--model", action="append", help=f"a model to serve (repeat for more; default {DEFAULT_MODEL}); "
                                                    "the first is loaded at start, the others on first use")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, help="jobs database, results, adapters (default $FLUXION_HOME/server)")
    p.add_argument("--max-batch", type=int, default=16, help="images sharing one forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="how long a request may wait for companions")
    p.add_argument("--queue-size", type=int, default=256, help="jobs waiting or running beyond which requests get 429")
    p.add_argument("--api-key", action="append", help="accept this key (repeatable; 'sha256:HEX' gives its hash "
                                                      "instead); without any key the server is open")
    p.add_argument("--api-key-file", type=Path, help="keys (or sha256:HEX hashes), one a line")
    p.add_argument("--quantize", help="quantize the weights at load (fluxion.quant), e.g. int8")
    _cache_flag(p)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    for flag, kind, help_text in (
            ("--workers", int, "groups generated at once, each on cores/workers torch threads (default 1)"),
            ("--model-cache-size", int, "models kept loaded (LRU, default 2)"),
            ("--lora-cache-size", int, "adapters kept loaded per model (default 8)"),
            ("--adapters-dir", Path, "LoRA files requests may name by path (default DATA_DIR/adapters)"),
            ("--result-ttl", float, "seconds finished jobs and their images are kept (default 86400)"),
            ("--max-body-bytes", int, None), ("--max-prompt-chars", int, None), ("--max-steps", int, None),
            ("--max-images", int, "n per request (default 10)"),
            ("--max-job-seconds", float, "refuse jobs estimated to take longer"),
            ("--rate-limit", float, "requests per minute per key (default 0: none)"), ("--rate-burst", int, None),
            ("--request-timeout", float, "seconds a synchronous request waits for its images (default 600)"),
            ("--public-url", str, "the base of result and polling URLs behind a proxy"),
            ("--webhook-retries", int, "default 5"), ("--webhook-backoff", float, "seconds before the first retry, "
                                                                                   "doubling each time (default 1)")):
        p.add_argument(flag, type=kind, help=help_text)
    p.add_argument("--no-preload", action="store_true", help="load even the first model on first use")
    ray = p.add_argument_group("Ray Serve (fluxion[ray]): one gateway with the job store, N renderer replicas")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve (see fluxion.server.ray_app)")
    ray.add_argument("--replicas", type=int, default=1, help="renderer replicas (default 1)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0; 1 on a GPU cluster)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    ray.add_argument("--ray-address", help="a running Ray cluster (default: start Ray on this machine)")
    ray.add_argument("--ray-num-cpus", type=int, help="CPUs of the Ray started here (default: all)")


def cmd_serve(args) -> None:
    from .server.config import ServerConfig, read_key_file
    from .server.run import serve

    keys = list(args.api_key or []) + (read_key_file(args.api_key_file) if args.api_key_file else [])
    optional = {"data_dir": args.data_dir, "workers": args.workers, "model_cache_size": args.model_cache_size,
                "lora_cache_size": args.lora_cache_size, "adapters_dir": args.adapters_dir,
                "result_ttl_s": args.result_ttl, "max_body_bytes": args.max_body_bytes,
                "max_prompt_chars": args.max_prompt_chars, "max_steps": args.max_steps, "max_images": args.max_images,
                "max_job_seconds": args.max_job_seconds, "rate_limit": args.rate_limit, "rate_burst": args.rate_burst,
                "request_timeout_s": args.request_timeout, "public_url": args.public_url,
                "webhook_retries": args.webhook_retries, "webhook_backoff_s": args.webhook_backoff}
    config = ServerConfig(models=args.model or [DEFAULT_MODEL], host=args.host, port=args.port,
                          max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size,
                          api_keys=keys, quantize=args.quantize, cache=args.cache, device=args.device,
                          dtype=args.dtype, preload=not args.no_preload,
                          log_level="info" if args.verbose else "warning",
                          **{k: v for k, v in optional.items() if v is not None})
    print(f"fluxion serve: http://{config.host}:{config.port} (models: {', '.join(config.models)}; data: "
          f"{config.data_dir})", flush=True)
    if args.ray:
        from .server.ray_run import serve_ray

        serve_ray(config, replicas=args.replicas, num_gpus=args.num_gpus, replica_cpus=args.replica_cpus,
                  address=args.ray_address, num_cpus=args.ray_num_cpus)
        return
    serve(config)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fluxion", description="FLUX.1 text-to-image, in pure PyTorch")
    parser.add_argument("--version", action="version", version=f"fluxion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)

    p = sub.add_parser("models", help="list the models fluxion can find (built-in and under $FLUXION_HOME)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("info", help="describe a checkpoint: variant, parameters, dtypes, keys")
    p.add_argument("checkpoint", type=Path)

    p = sub.add_parser("convert", help="convert a transformer/VAE checkpoint between BFL and diffusers layouts")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=["diffusers", "bfl"], required=True)

    p = sub.add_parser("eval", help="GenEval-style evaluation on the shapes world")
    p.add_argument("--model", required=True)
    p.add_argument("--spec", type=Path, default=Path("evals/shapes.jsonl"))
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--true-cfg", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, help="image width (default: the model's size)")
    p.add_argument("--height", type=int, help="image height (default: the model's size)")
    p.add_argument("--allow-any-size", action="store_true", help="also sizes outside the model's supported range")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    _lora_flag(p)
    _speed_flags(p)
    _cache_flag(p)
    p.add_argument("--out", type=Path, default=Path("eval-out"))

    p = sub.add_parser("fit-teacache", help="fit TeaCache's polynomial (--cache teacache) for a model")
    p.add_argument("model")
    p.add_argument("--spec", type=Path, default=Path("evals/shapes.jsonl"), help="prompts to generate (JSON lines)")
    p.add_argument("--prompts", type=int, default=16, help="how many of the spec's prompts, spread over it")
    p.add_argument("--degree", type=int, default=1)
    p.add_argument("--steps", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--write", action="store_true", help="record it in the model folder's fluxion.json")

    p = sub.add_parser("lora", help="inspect and convert LoRA files")
    lora = p.add_subparsers(dest="lora_command", required=True)
    q = lora.add_parser("info", help="format, rank, alpha, targets and what maps where")
    q.add_argument("file", help="a LoRA file, or a built-in adapter's name")
    q.add_argument("--model", help="also map the file onto this model's modules")
    q = lora.add_parser("convert", help="rewrite a LoRA file in another layout")
    q.add_argument("file", help="a LoRA file, or a built-in adapter's name")
    q.add_argument("out", type=Path)
    q.add_argument("--to", choices=["peft", "kohya", "comfy"], required=True)
    q.add_argument("--model", help="the model it applies to (default: the base model its header names)")

    p = sub.add_parser("train", help="train a model from a TOML recipe (resumes by default; a recipe's [[stages]] "
                                      "run in order, those finished earlier skipped)")
    p.add_argument("config", type=Path)
    p.add_argument("--stage", help="run only this stage (its run.name) of a recipe with [[stages]]")
    p.add_argument("--no-resume", action="store_true", help="start over (every stage, finished or not)")
    p.add_argument("--max-steps", type=int, help="stop each run at this step (resume later)")
    p.add_argument("--out-dir", type=Path, help="put the run (and its model or adapter) here instead of the "
                                                "recipe's run.out_dir; the recipe's export.dir is then skipped "
                                                "(one-run recipes only)")
    _serve_parser(sub)
    return parser


COMMANDS = {"generate": cmd_generate, "models": cmd_models, "info": cmd_info, "convert": cmd_convert,
            "eval": cmd_eval, "fit-teacache": cmd_fit_teacache, "lora": cmd_lora, "train": cmd_train,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fluxion {args.command}: interrupted (no partial file was left)", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        known = isinstance(e, (FluxionError, OSError))
        message = " ".join(str(e).split()) or type(e).__name__
        kind = "error" if known else f"internal error ({type(e).__name__})"
        hint = "" if known else "; run with --debug for the traceback"
        print(f"fluxion {args.command}: {kind}: {message}{hint}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
