"""A finished run as a model folder (BFL-layout safetensors + fluxion.json), and its export for shipping."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from ..checkpoints.io import load_state_dict, read_checkpoint_info, save_state_dict
from ..devices import DTYPES
from ..files import atomic_folder, atomic_write, write_json
from ..pipeline import VARIANTS
from ..registry import MANIFEST
from .config import TrainConfig

log = logging.getLogger(__name__)

TRANSFORMER_FILE = "transformer.safetensors"
AUTOENCODER_FILE = "ae.safetensors"


def copy_file(src: Path, dst: Path) -> Path:
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def trained_sizes(buckets: list[list[int]]) -> dict:
    """The sizes a model supports: the range of the (height, width) buckets it was trained on."""
    sides = [side for bucket in buckets for side in bucket]
    return {"min_side": min(sides), "max_side": max(sides), "max_pixels": max(h * w for h, w in buckets)}


def manifest(cfg: TrainConfig) -> dict:
    """fluxion.json as registry._from_manifest reads it; defaults are the variant's, overridden by the recipe."""
    defaults = {**VARIANTS[cfg.export.variant].__dict__, **cfg.export.defaults}
    return {"name": cfg.run.name, "variant": cfg.export.variant, "transformer": TRANSFORMER_FILE,
            "autoencoder": AUTOENCODER_FILE, "text_encoder": "minilm", "text_length": cfg.data.text_length,
            "text_positions": cfg.model.text_positions, "defaults": defaults,
            "sizes": trained_sizes(cfg.data.buckets),
            **({"schedule": dataclasses.asdict(cfg.shift_schedule())} if cfg.model.shift_schedule else {}),
            "training": {"stage": cfg.run.stage, "steps": cfg.run.steps, "batch_size": cfg.run.batch_size,
                         "recipe": cfg.source}}


def write_manifest(cfg: TrainConfig, folder: Path) -> Path:
    return write_json(manifest(cfg), folder / MANIFEST)


def export_model(src: Path, dst: Path, dtype: str = "bf16") -> Path:
    """Copy a model folder's safetensors (floating tensors cast to `dtype`, metadata kept) and its manifest. The
    new folder replaces dst whole, so an interrupted export leaves the previous model intact."""
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"nothing to export: {src} holds no .safetensors files (has the run finished?)")
    target = DTYPES[dtype]

    def build(folder: Path) -> None:
        total = 0
        for f in files:
            sd = load_state_dict(f)
            if all(v.dtype == target for v in sd.values() if v.is_floating_point()):
                # nothing to cast: copy the bytes, since re-serialising orders the metadata at random and would
                # give every export of the same VAE a different file (a new blob in git each time)
                out = copy_file(f, folder / f.name)
            else:
                sd = {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}
                out = save_state_dict(sd, folder / f.name, metadata=read_checkpoint_info(f).metadata)
            size = out.stat().st_size
            total += size
            log.info("exported %s: %d tensors, %.1f MB (%s)", f.name, len(sd), size / 1e6, dtype)
        if (src / MANIFEST).is_file():
            copy_file(src / MANIFEST, folder / MANIFEST)
        log.info("exported %s -> %s: %.1f MB of safetensors", src, dst, total / 1e6)

    return atomic_folder(dst, build)


def base_model_name(transformer_path: str) -> str:
    """The name in the manifest beside a transformer file (a built-in model's), else the file's path."""
    manifest_path = Path(transformer_path).parent / MANIFEST
    if manifest_path.is_file():
        try:
            return str(json.loads(manifest_path.read_text())["name"])
        except (ValueError, KeyError):
            pass
    return str(transformer_path)


def export_adapter(src: Path, dst_dir: Path, dtype: str = "bf16") -> Path:
    """Copy a finished LoRA file into a folder of adapters (floating tensors cast to `dtype`, header kept)."""
    if not src.is_file():
        raise FileNotFoundError(f"nothing to export: {src} does not exist (has the run finished?)")
    target = DTYPES[dtype]
    sd = {k: v.to(target) if v.is_floating_point() else v for k, v in load_state_dict(src).items()}
    out = save_state_dict(sd, dst_dir / src.name, metadata=read_checkpoint_info(src).metadata)
    log.info("exported %s -> %s: %.1f kB (%s)", src, out, out.stat().st_size / 1e3, dtype)
    return out


def export_run(cfg: TrainConfig, folder: Path, dest: Path) -> Path:
    """A finished run's shipped form: the model folder, or for a LoRA run its adapter file into `dest`."""
    if cfg.run.stage == "lora":
        return export_adapter(folder / f"{cfg.run.name}.safetensors", dest, cfg.export.dtype)
    return export_model(folder, dest, cfg.export.dtype)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

