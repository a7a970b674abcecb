"""The `fluxion` command: generate, info, convert, eval, train."""

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import FluxionError
from .registry import DEFAULT_MODEL

log = logging.getLogger("fluxion")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image (and image-to-image, inpainting)")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file / --from-image)")
    model = p.add_argument_group("model")
    model.add_argument("--model", help=f"built-in name, name under $FLUXION_HOME, or folder (default {DEFAULT_MODEL})")
    model.add_argument("--device", help="cuda, mps, cpu (default: the best available)")
    model.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
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
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("fluxion.png"),
                     help="output PNG; with several images, -<n> is added before the suffix")
    out.add_argument("--from-image", type=Path, help="reproduce a PNG written by fluxion (flags given override)")


def _resolve_generate_args(args) -> dict:
    """Merge --from-image settings with explicit flags into one dict of settings."""
    from .metadata import read_settings

    s = {}
    if args.from_image:
        rec = read_settings(args.from_image)
        s = dict(prompt=rec.prompt, negative_prompt=rec.negative_prompt, model=rec.model, steps=rec.num_inference_steps,
                 guidance=rec.guidance_scale, true_cfg=rec.true_cfg_scale, seed=[rec.seed], width=rec.width,
                 height=rec.height, init_image=rec.init_image, strength=rec.strength, mask=rec.mask_image,
                 sigmas=rec.sigmas, dtype=rec.dtype, device=rec.device)
    for key in ("prompt", "negative_prompt", "model", "steps", "guidance", "true_cfg", "seed", "width", "height",
                "init_image", "strength", "mask", "sigmas", "dtype", "device", "num_images"):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    prompts = [s["prompt"]] if s.get("prompt") else []
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise FluxionError(f"--prompt-file: no such file {args.prompt_file}")
        prompts += [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise FluxionError("give a PROMPT, --prompt-file or --from-image")
    s["prompts"] = prompts
    return s


def _output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def cmd_generate(args) -> None:
    from PIL import Image

    from .metadata import GenerationSettings, PNG_KEY, save_png
    from .pipeline import Pipeline

    s = _resolve_generate_args(args)
    seeds = s.get("seed")
    num_images = s.get("num_images")
    if seeds and len(seeds) > 1 and num_images not in (None, len(seeds)):
        raise FluxionError(f"--num-images {num_images} conflicts with {len(seeds)} seeds (one image per seed)")
    per_prompt = len(seeds) if seeds and len(seeds) > 1 else (num_images or 1)
    if seeds is None:
        seed_list = None
    elif len(seeds) > 1:
        seed_list = seeds * len(s["prompts"])
    else:
        seed_list = [seeds[0] + i for i in range(per_prompt * len(s["prompts"]))]

    pipe = Pipeline.from_pretrained(s.get("model") or DEFAULT_MODEL, device=s.get("device"), dtype=s.get("dtype"))
    init = Image.open(s["init_image"]) if s.get("init_image") else None
    mask = Image.open(s["mask"]) if s.get("mask") else None
    images = pipe(
        s["prompts"], negative_prompt=s.get("negative_prompt"), height=s.get("height"), width=s.get("width"),
        num_inference_steps=s.get("steps"), guidance_scale=s.get("guidance"), true_cfg_scale=s.get("true_cfg"),
        seed=seed_list, num_images_per_prompt=per_prompt, image=init, strength=s.get("strength") or 1.0,
        mask_image=mask, sigmas=s.get("sigmas"), progress=True,
    )
    for image, path in zip(images, _output_paths(args.out, len(images))):
        settings = GenerationSettings.from_json(image.info[PNG_KEY])
        settings.init_image = str(s["init_image"]) if s.get("init_image") else None
        settings.mask_image = str(s["mask"]) if s.get("mask") else None
        save_png(image, path, settings)
        print(f"{path}  seed={settings.seed}")


def describe(path: Path) -> dict:
    """What `fluxion info` prints: component, layout, variant, sizes, dtypes and a summary of the keys."""
    from dataclasses import asdict

    from .checkpoints import open_checkpoint

    source = open_checkpoint(path)
    params = source.params()
    info = {"path": str(path), "component": source.component, "layout": source.layout}
    if source.component == "transformer":
        kind = {64: "", 384: " (fill: image + mask conditioning)", 128: " (control: depth/canny conditioning)"}
        info["variant"] = ("dev (guidance-distilled)" if params.guidance_embed else "schnell or pro (no guidance input)") \
            + kind.get(params.in_channels, f" (img_in width {params.in_channels})")
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


def cmd_info(args) -> None:
    print(json.dumps(describe(args.checkpoint), indent=2))


def cmd_convert(args) -> None:
    from .checkpoints import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, to=args.to)
    print(f"wrote {out}")


def cmd_eval(args) -> None:
    from .eval import format_table, run_eval
    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)

    def generate(prompts, seeds):
        return pipe(prompts, seed=seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    true_cfg_scale=args.true_cfg)

    results = run_eval(generate, args.spec, args.images_per_prompt, args.out, seed=args.seed)
    print(format_table(results))
    print(f"generation: {1000 * results['seconds_per_image']:.1f} ms per image, in batches of "
          f"{args.images_per_prompt}; report: {args.out}/results.json and contact sheets")


def cmd_train(args) -> None:
    from .training import run

    out = run(args.config, resume=not args.no_resume, max_steps=args.max_steps)
    print(f"run folder: {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxion", description="FLUX.1 text-to-image, in pure PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)

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
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--out", type=Path, default=Path("eval-out"))

    p = sub.add_parser("train", help="train a model from a TOML recipe (resumes by default)")
    p.add_argument("config", type=Path)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--max-steps", type=int)
    return parser


COMMANDS = {"generate": cmd_generate, "info": cmd_info, "convert": cmd_convert, "eval": cmd_eval,
            "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        COMMANDS[args.command](args)
    except (FluxionError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        print(f"fluxion {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
