"""Result images on disk: written atomically (files.atomic_write), each carrying the settings that reproduce it
(PNG: the text chunk `fluxion generate --from-image` reads; JPEG/WebP: EXIF ImageDescription)."""

import io
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..files import atomic_write
from ..metadata import PNG_KEY

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
EXIF_IMAGE_DESCRIPTION = 0x010E


def result_name(index: int, output_format: str) -> str:
    return f"{index}.{EXTENSIONS[output_format]}"


def encode(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    settings = image.info.get(PNG_KEY)
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        if settings:
            info.add_text(PNG_KEY, settings)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        if settings:
            exif[EXIF_IMAGE_DESCRIPTION] = settings
        quality = 90 if compression is None else compression
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def write_result(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def media_type(path: str | os.PathLike) -> str:
    return MEDIA_TYPES.get(Path(path).suffix.lstrip(".").lower(), "application/octet-stream")
