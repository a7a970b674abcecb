"""Generation settings: the record every output image carries (PNG text chunk) and that reproduces it."""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import __version__
from .errors import InputError
from .files import atomic_write

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
    fluxion_version: str = field(default=__version__)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GenerationSettings":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown settings keys in image metadata: {unknown}")
        return cls(**data)


def save_png(image: Image.Image, path: str | os.PathLike, settings: GenerationSettings) -> Path:
    """Write a PNG with its settings as JSON in a text chunk, atomically (temp file, then rename)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, settings.to_json())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_settings(path: str | os.PathLike) -> GenerationSettings:
    """The settings recorded in a PNG written by fluxion."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--from-image: no such file {path}")
    with Image.open(path) as im:
        text = im.info.get(PNG_KEY)
    if text is None:
        raise InputError(f"{path} carries no fluxion settings (no '{PNG_KEY}' PNG text chunk)")
    return GenerationSettings.from_json(text)
