"""Generation settings: the record every output image carries (PNG text chunk) and that reproduces it."""

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from . import __version__
from .errors import InputError
from .files import atomic_write
from .settings import RECORD_CHECKS

PNG_KEY = "fluxion"


@dataclass
class GenerationSettings:
    """Everything needed to regenerate one image exactly (on the same device and dtype)."""

    prompt: str
    seed: int
    height: int
    width: int
    num_inference_steps: int
    model: str
    variant: str
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float = 1.0
    strength: float = 1.0
    sigmas: list[float] | None = None
    init_image: str | None = None
    mask_image: str | None = None
    device: str | None = None
    dtype: str | None = None
    cache: str | None = None  # step caching, e.g. "fbcache:0.1" (fluxion.cache)
    quantize: str | None = None  # the transformer's weight quantization, e.g. "int8" (fluxion.quant)
    loras: list[dict] | None = None  # active adapters: name, file (its name), sha256 of its bytes, scale
    fluxion_version: str = field(default=__version__)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "image metadata") -> "GenerationSettings":
        """Parse and check a record with the same checks as a request (settings.RECORD_CHECKS), so an edited or
        damaged record is refused with the field's name instead of failing mid-run."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{source}: the '{PNG_KEY}' settings are not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise InputError(f"{source}: the '{PNG_KEY}' settings must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown settings keys {unknown}")
        required = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
        missing = [k for k in required if k not in data]
        if missing:
            raise InputError(f"{source}: settings keys {missing} are missing")
        try:
            checked = {k: RECORD_CHECKS[k](v) for k, v in data.items()}
        except InputError as e:
            raise InputError(f"{source}: {e}") from None
        return cls(**checked)


def save_png(image: Image.Image, path: str | os.PathLike, settings: GenerationSettings, *,
             overwrite: bool = True) -> Path:
    """Write a PNG with its settings as JSON in a text chunk, atomically (temp file, then rename); with
    overwrite=False an existing file is kept and the new one numbered (-1, -2, ...). Returns the path written."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, settings.to_json())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite)


def read_settings(path: str | os.PathLike) -> GenerationSettings:
    """The settings recorded in a PNG written by fluxion."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--from-image: no such file {path}")
    try:
        with Image.open(path) as im:
            text = im.info.get(PNG_KEY)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"--from-image: {path} is not an image PIL can read ({e})") from None
    if text is None:
        raise InputError(f"{path} carries no fluxion settings (no '{PNG_KEY}' PNG text chunk)")
    return GenerationSettings.from_json(text, source=str(path))
