"""Resolve a model name or path to local files; nothing here ever touches the network."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelNotFoundError

BUILTIN_MODELS = Path(__file__).parent / "models"
MANIFEST = "fluxion.json"
# The shipped model with the best eval score per second of generation (measured in the README).
DEFAULT_MODEL = "tiny-schnell"
T5_DIRS = ("text_encoder_2", "t5")
CLIP_DIRS = ("text_encoder", "clip")


def fluxion_home() -> Path:
    return Path(os.environ.get("FLUXION_HOME", Path.home() / ".cache" / "fluxion"))


@dataclass
class ModelFiles:
    """Where each component of a model lives, and what kind of model it is."""

    name: str
    root: Path
    layout: str  # "fluxion" (manifest), "diffusers" or "bfl"
    transformer: Path
    autoencoder: Path
    text_encoder: str  # "minilm" or "t5+clip"
    text_length: int | None = None  # MiniLM tokens per prompt (fluxion manifests); None: the encoder's default
    text_positions: bool = False  # text tokens numbered in RoPE (fluxion manifests; FLUX itself: all at 0)
    t5: Path | None = None
    t5_tokenizer: Path | None = None
    clip: Path | None = None
    clip_tokenizer: Path | None = None
    variant: str | None = None  # "pro" / "dev" / "schnell"; None: infer from the weights
    defaults: dict = field(default_factory=dict)


def search_paths(name: str) -> list[Path]:
    return [Path(name).expanduser(), fluxion_home() / name, BUILTIN_MODELS / name]


def resolve(name_or_path: str) -> ModelFiles:
    """Find a model: an existing path, else FLUXION_HOME/<name>, else a model shipped with fluxion."""
    looked = search_paths(name_or_path)
    for root in looked:
        if root.is_dir():
            return describe_folder(root, name_or_path)
    available = sorted(p.name for p in BUILTIN_MODELS.glob("*") if p.is_dir()) if BUILTIN_MODELS.is_dir() else []
    raise ModelNotFoundError(
        f"model {name_or_path!r} not found; looked in: {', '.join(str(p) for p in looked)}. "
        f"Give a diffusers folder, a folder with BFL files (flux1-*.safetensors, ae.safetensors, t5/, clip/), "
        f"or a name under $FLUXION_HOME. Built-in models: {', '.join(available) or 'none'}"
    )


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelNotFoundError(f"{what}: expected {path}, which does not exist")
    return path


def _first_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise ModelNotFoundError(f"{what}: expected one of the folders {', '.join(str(root / n) for n in names)}")


def _tokenizer_dir(root: Path, encoder_dir: Path, name: str) -> Path:
    # diffusers keeps tokenizers beside the encoders (tokenizer/, tokenizer_2/); BFL-style folders keep them inside
    sibling = root / name
    return sibling if sibling.is_dir() else encoder_dir


def describe_folder(root: Path, name: str) -> ModelFiles:
    if (root / MANIFEST).is_file():
        return _from_manifest(root, name)
    if (root / "model_index.json").is_file():
        return _from_diffusers(root, name)
    return _from_bfl(root, name)


def _from_manifest(root: Path, name: str) -> ModelFiles:
    m = json.loads((root / MANIFEST).read_text())
    files = ModelFiles(
        name=m.get("name", name), root=root, layout="fluxion",
        transformer=_require(root / m["transformer"], "transformer weights"),
        autoencoder=_require(root / m["autoencoder"], "autoencoder weights"),
        text_encoder=m.get("text_encoder", "minilm"), text_length=m.get("text_length"),
        text_positions=bool(m.get("text_positions", False)), variant=m.get("variant"), defaults=m.get("defaults", {}),
    )
    if files.text_encoder == "t5+clip":
        _add_t5_clip(files, root)
    return files


def _from_diffusers(root: Path, name: str) -> ModelFiles:
    files = ModelFiles(name=name, root=root, layout="diffusers",
                       transformer=_require(root / "transformer", "diffusers transformer folder"),
                       autoencoder=_require(root / "vae", "diffusers vae folder"), text_encoder="t5+clip")
    _add_t5_clip(files, root)
    # schnell is the model sampled without the resolution shift; with it, the guidance input tells dev from pro
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        dynamic = json.loads(scheduler.read_text()).get("use_dynamic_shifting", True)
        transformer_config = root / "transformer" / "config.json"
        guidance = transformer_config.is_file() and json.loads(transformer_config.read_text()).get("guidance_embeds")
        files.variant = "dev" if guidance else ("pro" if dynamic else "schnell")
    return files


def _from_bfl(root: Path, name: str) -> ModelFiles:
    candidates = sorted(p for p in root.glob("flux1-*.safetensors"))
    if not candidates:
        raise ModelNotFoundError(
            f"{root} is neither a diffusers folder (model_index.json) nor a BFL folder: expected a transformer file "
            f"{root / 'flux1-<variant>.safetensors'} beside {root / 'ae.safetensors'}"
        )
    transformer = candidates[0]
    files = ModelFiles(name=name, root=root, layout="bfl", transformer=transformer,
                       autoencoder=_require(root / "ae.safetensors", "autoencoder weights"), text_encoder="t5+clip")
    files.variant = "schnell" if "schnell" in transformer.name else None
    _add_t5_clip(files, root)
    return files


def _add_t5_clip(files: ModelFiles, root: Path) -> None:
    files.t5 = _first_dir(root, T5_DIRS, "T5 text encoder")
    files.clip = _first_dir(root, CLIP_DIRS, "CLIP text encoder")
    files.t5_tokenizer = _tokenizer_dir(root, files.t5, "tokenizer_2")
    files.clip_tokenizer = _tokenizer_dir(root, files.clip, "tokenizer")
