"""Generation settings, checked once where they enter (Python API, CLI, image metadata, server): every refusal
names the argument, its CLI flag, the value given and what is accepted, in the same words everywhere."""

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .cache import CacheSpec
from .quant.schemes import SCHEMES
from .errors import InputError

MAX_PROMPT_CHARS = 10_000  # far beyond what T5 (512 tokens) or CLIP (77) read; refuses pasted files, not prompts
MAX_STEPS = 1000
MAX_IMAGES_PER_PROMPT = 1000
MAX_SCALE = 100.0  # guidance and CFG scales: FLUX uses 1-10; larger values only saturate
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; signed keeps them portable
OUTPUT_TYPES = ("pil", "latent", "pt")
VARIANT_NAMES = ("pro", "dev", "schnell")

# Python argument -> CLI flag: one message serves both entry points.
FLAGS = {
    "prompt": "PROMPT", "negative_prompt": "--negative-prompt", "height": "--height", "width": "--width",
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "true_cfg_scale": "--true-cfg",
    "seed": "--seed", "num_images_per_prompt": "--num-images", "image": "--init-image", "strength": "--strength",
    "mask_image": "--mask", "sigmas": "--sigmas", "max_memory": "--max-memory", "device": "--device",
    "dtype": "--dtype", "model": "--model", "images_per_prompt": "--images-per-prompt", "max_steps": "--max-steps",
    "cache": "--cache", "quantize": "--quantize", "offload": "--offload",
}
OFFLOAD_MODES = ("model", "sequential")


def label(name: str) -> str:
    flag = FLAGS.get(name.split("[")[0])  # "sigmas[2]" is still --sigmas
    return f"{name} ({flag})" if flag else name


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def invalid(name: str, value, accepted: str) -> InputError:
    return InputError(f"{label(name)}: expected {accepted}, got {_show(value)}")


# -- one check per kind of value; each returns the value normalised (int, float, list) -------------------------
def integer(name: str, value, low: int, high: int) -> int:
    accepted = f"an integer from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise invalid(name, value, accepted)
    if not low <= int(value) <= high:
        raise invalid(name, value, accepted)
    return int(value)


def number(name: str, value, low: float, high: float, *, low_open: bool = False, note: str = "") -> float:
    accepted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]{note}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(name, value, accepted)
    x = float(value)
    if not math.isfinite(x) or x > high or x < low or (low_open and x == low):
        raise invalid(name, value, accepted)
    return x


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise invalid(name, value, "a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{label(name)}: expected at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{label(name)}: expected text that UTF-8 can encode; character {e.start} is "
                         f"{value[e.start]!r} (a lone surrogate)") from None
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise invalid(name, value, "one of " + ", ".join(map(repr, options)))
    return value


def optional(check, name: str, value, *args, **kwargs):
    return None if value is None else check(name, value, *args, **kwargs)


MAX_LORA_SCALE = 10.0  # adapters are made for 0-1.5; negative scales subtract what an adapter learned


def lora_scale(name: str, value) -> float:
    return number(name, value, -MAX_LORA_SCALE, MAX_LORA_SCALE)


def lora_records(name: str, value) -> list[dict]:
    """The adapters an image was made with: [{"name", "file", "sha256", "scale"}, ...]."""
    if not isinstance(value, list):
        raise invalid(name, value, "a list of {name, file, sha256, scale} records")
    out = []
    for i, record in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(record, dict) or set(record) != {"name", "file", "sha256", "scale"}:
            raise invalid(where, record, "a record with exactly the keys name, file, sha256, scale")
        digest = text(f"{where}.sha256", record["sha256"])
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise invalid(f"{where}.sha256", digest, "64 lowercase hex digits")
        out.append({"name": text(f"{where}.name", record["name"]), "file": text(f"{where}.file", record["file"]),
                    "sha256": digest, "scale": lora_scale(f"{where}.scale", record["scale"])})
    return out


def texts(name: str, value, n: int | None = None, allow_none: bool = False) -> list:
    """A string (repeated n times) or a list of n strings (None entries allowed with allow_none)."""
    if isinstance(value, str) or (allow_none and value is None):
        return [value if value is None else text(name, value)] * (n or 1)
    if isinstance(value, (bytes, dict)) or not isinstance(value, Sequence):
        raise invalid(name, value, "a string or a list of strings")
    values = [None if (allow_none and v is None) else text(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not values:
        raise invalid(name, value, "at least one string")
    if n is not None and len(values) != n:
        raise InputError(f"{label(name)}: expected one entry per prompt ({n}), got {len(values)}")
    return values


def sigmas_list(name: str, value) -> list[float]:
    """Custom times: descending, in (0, 1]; the final 0 is appended by the sampler."""
    accepted = "a non-empty list of strictly descending numbers in (0, 1], e.g. [1.0, 0.75, 0.5, 0.25]"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise invalid(name, value, accepted)
    out = [number(f"{name}[{i}]", s, 0.0, 1.0, low_open=True) for i, s in enumerate(value)]
    for i in range(1, len(out)):
        if out[i] >= out[i - 1]:
            raise InputError(f"{label(name)}: expected strictly descending times, but entry {i} ({out[i]:g}) is "
                             f"not below entry {i - 1} ({out[i - 1]:g})")
    return out


def seeds(name: str, value) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Integral, Sequence)):
        raise invalid(name, value, f"an integer from 0 to {MAX_SEED} or a list of them")
    if isinstance(value, numbers.Integral):
        return integer(name, value, 0, MAX_SEED)
    if not value:
        raise invalid(name, value, "at least one seed")
    return [integer(f"{name}[{i}]", s, 0, MAX_SEED) for i, s in enumerate(value)]


def open_image(name: str, value) -> Image.Image:
    """A PIL image, or a path to one (read whole now, so a truncated file fails here, not mid-run)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise InputError(f"{label(name)}: no such file {path}")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{label(name)}: {path} is not an image PIL can read ({e})") from None
    else:
        raise invalid(name, value, "a PIL image or the path of an image file")
    if image.width < 1 or image.height < 1:
        raise invalid(name, image, "an image of at least 1x1 pixels")
    return image


def memory_budget(name: str, value) -> int | None:
    """Bytes from an int or a string like '8GB', '512MiB', '2.5G'."""
    if value is None:
        return None
    accepted = "a positive size such as 8GB, 512MiB or a number of bytes"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value <= 0:
            raise invalid(name, value, accepted)
        return int(value)
    if not isinstance(value, str):
        raise invalid(name, value, accepted)
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
             "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
    s = value.strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits):]
    try:
        amount = float(digits)
    except ValueError:
        raise invalid(name, value, accepted) from None
    if unit not in units or not math.isfinite(amount) or amount <= 0:
        raise invalid(name, value, accepted)
    return int(amount * units[unit])


@dataclass(frozen=True)
class ShiftSchedule:
    """FLUX's resolution-dependent shift: mu grows linearly with the number of image tokens, from `base_shift` at
    `base_seq_len` to `max_shift` at `max_seq_len` (diffusers' scheduler config names them base_image_seq_len,
    max_image_seq_len). FLUX.1 spans 256-4096 tokens (256-1024 px); a model trained on other sizes spans its own."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self):
        if not 0 < self.base_seq_len < self.max_seq_len:
            raise ValueError(f"shift schedule needs 0 < base_seq_len < max_seq_len, got {self.base_seq_len}, "
                             f"{self.max_seq_len}")


FLUX_SHIFT = ShiftSchedule()


@dataclass(frozen=True)
class SizeRange:
    """The image sizes a model supports: each side in [min_side, max_side], at most max_pixels in all."""

    min_side: int
    max_side: int
    max_pixels: int

    @classmethod
    def from_manifest(cls, data, source: str) -> "SizeRange":
        if not isinstance(data, dict) or not {"min_side", "max_side"} <= data.keys():
            raise InputError(f"{source}: 'sizes' must be an object with min_side, max_side (and max_pixels), "
                             f"got {_show(data)}")
        lo = integer("sizes.min_side", data["min_side"], 1, 1 << 20)
        hi = integer("sizes.max_side", data["max_side"], lo, 1 << 20)
        return cls(lo, hi, integer("sizes.max_pixels", data.get("max_pixels", hi * hi), 1, 1 << 40))

    def contains(self, height: int, width: int) -> bool:
        sides_ok = all(self.min_side <= s <= self.max_side for s in (height, width))
        return sides_ok and height * width <= self.max_pixels

    def describe(self) -> str:
        return (f"{self.min_side} to {self.max_side} px a side and at most {self.max_pixels / 1e6:.2g} megapixels "
                f"({self.max_pixels} pixels)")


# FLUX.1's own range, as BFL's API accepts it: 256-2048 px a side, up to about 2 megapixels.
FLUX1_SIZES = SizeRange(min_side=256, max_side=2048, max_pixels=2**21)


@dataclass
class GenerationRequest:
    """One call's settings, normalised and checked: prompts as a list, negatives one per prompt, numbers in range.
    The model-dependent checks (size multiple, supported sizes, memory) follow in `Pipeline.generate`."""

    prompt: list[str]
    negative_prompt: list[str | None] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    seed: int | list[int] | None = None
    num_images_per_prompt: int = 1
    image: Image.Image | None = None
    strength: float = 1.0
    mask_image: Image.Image | None = None
    sigmas: list[float] | None = None
    output_type: str = "pil"
    allow_any_size: bool = False
    max_memory: int | None = None
    cache: object = None  # a cache.CacheSpec or its text ("fbcache:0.1"); None = every step computed in full
    init_image_path: str | None = field(default=None, repr=False)  # recorded in the metadata when given as a path
    mask_image_path: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self.prompt = texts("prompt", self.prompt)
        self.negative_prompt = texts("negative_prompt", self.negative_prompt, len(self.prompt), allow_none=True)
        self.height = optional(integer, "height", self.height, 1, 1 << 20)
        self.width = optional(integer, "width", self.width, 1, 1 << 20)
        self.num_inference_steps = optional(integer, "num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        self.guidance_scale = optional(number, "guidance_scale", self.guidance_scale, 0.0, MAX_SCALE)
        self.true_cfg_scale = optional(number, "true_cfg_scale", self.true_cfg_scale, 0.0, MAX_SCALE)
        self.num_images_per_prompt = integer("num_images_per_prompt", self.num_images_per_prompt, 1,
                                             MAX_IMAGES_PER_PROMPT)
        self.seed = seeds("seed", self.seed)
        if isinstance(self.seed, list) and len(self.seed) != self.num_images:
            raise InputError(f"{label('seed')}: expected one seed per image ({len(self.prompt)} prompts x "
                             f"{self.num_images_per_prompt} = {self.num_images}), got {len(self.seed)}")
        if isinstance(self.seed, int) and self.seed + self.num_images - 1 > MAX_SEED:
            raise invalid("seed", self.seed, f"at most {MAX_SEED - self.num_images + 1} ({self.num_images} images "
                                             "take consecutive seeds)")
        if isinstance(self.image, (str, os.PathLike)):
            self.init_image_path = str(self.image)
        if isinstance(self.mask_image, (str, os.PathLike)):
            self.mask_image_path = str(self.mask_image)
        self.image = optional(open_image, "image", self.image)
        self.mask_image = optional(open_image, "mask_image", self.mask_image)
        self.strength = number("strength", self.strength, 0.0, 1.0, low_open=True,
                               note=" (0 would return the init image unchanged)")
        if self.mask_image is not None and self.image is None:
            raise InputError(f"{label('mask_image')}: inpainting needs {label('image')}, the image whose masked "
                             "part is redone")
        if self.image is None and self.strength != 1.0:
            raise InputError(f"{label('strength')}: {self.strength:g} needs {label('image')} (image-to-image "
                             "starts from a noised source image)")
        self.sigmas = optional(sigmas_list, "sigmas", self.sigmas)
        if self.sigmas is not None and self.num_inference_steps not in (None, len(self.sigmas)):
            raise InputError(f"{label('num_inference_steps')}: {self.num_inference_steps} conflicts with the "
                             f"{len(self.sigmas)} {label('sigmas')} (one step per sigma); give one of them")
        self.output_type = choice("output_type", self.output_type, OUTPUT_TYPES)
        if not isinstance(self.allow_any_size, bool):
            raise invalid("allow_any_size", self.allow_any_size, "True or False")
        self.max_memory = memory_budget("max_memory", self.max_memory)
        if self.cache is not None and not isinstance(self.cache, CacheSpec):
            self.cache = CacheSpec.parse(self.cache)

    @property
    def num_images(self) -> int:
        return len(self.prompt) * self.num_images_per_prompt


# Checks of the fields an image's metadata records (metadata.GenerationSettings), keyed by field name.
RECORD_CHECKS = {
    "prompt": lambda v: text("prompt", v),
    "negative_prompt": lambda v: optional(text, "negative_prompt", v),
    "seed": lambda v: integer("seed", v, 0, MAX_SEED),
    "height": lambda v: integer("height", v, 1, 1 << 20),
    "width": lambda v: integer("width", v, 1, 1 << 20),
    "num_inference_steps": lambda v: integer("num_inference_steps", v, 1, MAX_STEPS),
    "model": lambda v: text("model", v),
    "variant": lambda v: choice("variant", v, VARIANT_NAMES),
    "guidance_scale": lambda v: optional(number, "guidance_scale", v, 0.0, MAX_SCALE),
    "true_cfg_scale": lambda v: number("true_cfg_scale", v, 0.0, MAX_SCALE),
    "strength": lambda v: number("strength", v, 0.0, 1.0, low_open=True),
    "sigmas": lambda v: optional(sigmas_list, "sigmas", v),
    "init_image": lambda v: optional(text, "init_image", v),
    "mask_image": lambda v: optional(text, "mask_image", v),
    "device": lambda v: optional(text, "device", v),
    "dtype": lambda v: optional(choice, "dtype", v, ("fp32", "bf16", "fp16")),
    "loras": lambda v: optional(lora_records, "loras", v),
    "cache": lambda v: optional(lambda name, value: str(CacheSpec.parse(value, name)), "cache", v),
    "quantize": lambda v: optional(choice, "quantize", v, SCHEMES),
    "fluxion_version": lambda v: text("fluxion_version", v),
}
