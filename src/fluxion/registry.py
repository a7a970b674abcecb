"""Resolve a model name or path to local files; nothing here ever touches the network."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, ModelFolderError, ModelNotFoundError
from .settings import FLUX1_SIZES, FLUX_SHIFT, VARIANT_NAMES, ShiftSchedule, SizeRange

BUILTIN_MODELS = Path(__file__).parent / "models"
BUILTIN_LORAS = Path(__file__).parent / "loras"
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
    sizes: SizeRange | None = None  # the sizes it supports; None: any (fluxion manifests without `sizes`)
    teacache_polynomial: tuple[float, ...] | None = None  # fitted by cache.fit_teacache (manifest "teacache")
    shift_schedule: ShiftSchedule = FLUX_SHIFT  # the resolution shift's token range (manifest "schedule")


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


def lora_paths(name: str) -> list[Path]:
    file = name if name.endswith(".safetensors") else f"{name}.safetensors"
    return [Path(name).expanduser(), fluxion_home() / "loras" / file, BUILTIN_LORAS / file]


def find_lora(name_or_path: str, sha256: str | None = None) -> Path:
    """A LoRA file: an existing path, else $FLUXION_HOME/loras/<name>.safetensors, else a built-in adapter. With
    `sha256` (a record's), only a file with those bytes counts."""
    from .files import sha256_file

    looked = lora_paths(name_or_path)
    for path in looked:
        if path.is_file() and (sha256 is None or sha256_file(path) == sha256):
            return path
    available = sorted(p.stem for p in BUILTIN_LORAS.glob("*.safetensors"))
    which = f" with sha256 {sha256}" if sha256 else ""
    raise ModelNotFoundError(f"LoRA {name_or_path!r}{which} not found; looked in: {', '.join(map(str, looked))}. "
                             f"Built-in adapters: {', '.join(available) or 'none'}")


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


def read_json(path: Path) -> dict:
    """A JSON object from a model folder, with the file's name in every complaint."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _manifest_field(m: dict, key: str, kind: type, path: Path, required: bool = False):
    if key not in m:
        if required:
            raise ModelFolderError(f"{path}: the key {key!r} is missing")
        return None
    if not isinstance(m[key], kind) or isinstance(m[key], bool) and kind is not bool:
        raise ModelFolderError(f"{path}: {key!r} must be a {kind.__name__}, got {m[key]!r:.80}")
    return m[key]


def _from_manifest(root: Path, name: str) -> ModelFiles:
    path = root / MANIFEST
    m = read_json(path)
    for key in ("transformer", "autoencoder"):
        _manifest_field(m, key, str, path, required=True)
    for key in ("name", "text_encoder", "variant"):
        _manifest_field(m, key, str, path)
    _manifest_field(m, "text_length", int, path)
    _manifest_field(m, "defaults", dict, path)
    schedule = _manifest_field(m, "schedule", dict, path)
    try:
        shift_schedule = FLUX_SHIFT if schedule is None else ShiftSchedule(**schedule)
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{path}: 'schedule': {e} (fields: {', '.join(ShiftSchedule.__dataclass_fields__)})") \
            from None
    polynomial = _manifest_field(m, "teacache", list, path)
    numbers = polynomial and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in polynomial)
    if polynomial is not None and not numbers:
        raise ModelFolderError(f"{path}: 'teacache' must be a list of numbers (polynomial coefficients, highest "
                               f"power first), got {polynomial!r:.80}")
    if m.get("variant") not in (None, *VARIANT_NAMES):
        raise ModelFolderError(f"{path}: 'variant' must be one of {', '.join(VARIANT_NAMES)}, got {m['variant']!r:.80}")
    if m.get("text_encoder", "minilm") not in ("minilm", "t5+clip"):
        raise ModelFolderError(f"{path}: 'text_encoder' must be 'minilm' or 't5+clip', got {m['text_encoder']!r:.80}")
    try:
        sizes = SizeRange.from_manifest(m["sizes"], str(path)) if "sizes" in m else None
    except InputError as e:
        raise ModelFolderError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    files = ModelFiles(
        name=m.get("name", name), root=root, layout="fluxion",
        transformer=_require(root / m["transformer"], "transformer weights"),
        autoencoder=_require(root / m["autoencoder"], "autoencoder weights"),
        text_encoder=m.get("text_encoder", "minilm"), text_length=m.get("text_length"),
        text_positions=bool(m.get("text_positions", False)), variant=m.get("variant"), defaults=m.get("defaults", {}),
        sizes=sizes, teacache_polynomial=None if polynomial is None else tuple(map(float, polynomial)),
        shift_schedule=shift_schedule,
    )
    if files.text_encoder == "t5+clip":
        _add_t5_clip(files, root)
    return files


def _from_diffusers(root: Path, name: str) -> ModelFiles:
    read_json(root / "model_index.json")
    files = ModelFiles(name=name, root=root, layout="diffusers",
                       transformer=_require(root / "transformer", "diffusers transformer folder"),
                       autoencoder=_require(root / "vae", "diffusers vae folder"), text_encoder="t5+clip",
                       sizes=FLUX1_SIZES)
    _add_t5_clip(files, root)
    # schnell is the model sampled without the resolution shift; with it, the guidance input tells dev from pro
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        dynamic = read_json(scheduler).get("use_dynamic_shifting", True)
        transformer_config = root / "transformer" / "config.json"
        guidance = transformer_config.is_file() and read_json(transformer_config).get("guidance_embeds")
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
                       autoencoder=_require(root / "ae.safetensors", "autoencoder weights"), text_encoder="t5+clip",
                       sizes=FLUX1_SIZES)
    files.variant = "schnell" if "schnell" in transformer.name else None
    _add_t5_clip(files, root)
    return files


def _add_t5_clip(files: ModelFiles, root: Path) -> None:
    files.t5 = _first_dir(root, T5_DIRS, "T5 text encoder")
    files.clip = _first_dir(root, CLIP_DIRS, "CLIP text encoder")
    files.t5_tokenizer = _tokenizer_dir(root, files.t5, "tokenizer_2")
    files.clip_tokenizer = _tokenizer_dir(root, files.clip, "tokenizer")


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def list_models() -> list[dict]:
    """Every model folder fluxion can find: built-in first, then under $FLUXION_HOME, with variant, layout,
    transformer parameters (read from the safetensors headers only), size on disk and path. A folder that cannot
    be read is listed with its error."""
    from .checkpoints import open_checkpoint
    from .errors import FluxionError

    rows = []
    sources = [("built-in", BUILTIN_MODELS), ("$FLUXION_HOME", fluxion_home())]
    for source, base in sources:
        if not base.is_dir():
            continue
        for root in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            row = {"name": root.name, "source": source, "path": str(root), "bytes": _folder_bytes(root)}
            try:
                files = describe_folder(root, root.name)
                checkpoint = open_checkpoint(files.transformer, "transformer")
                guidance = checkpoint.params().guidance_embed
                row.update(layout=files.layout, variant=files.variant or ("dev" if guidance else "schnell"),
                           parameters=sum(info.num_params for info in checkpoint.infos))
                if files.sizes is not None:
                    row["sizes"] = files.sizes.describe()
            except (FluxionError, OSError) as e:
                row["error"] = " ".join(str(e).split())
            rows.append(row)
    return rows
