"""Text-to-image pipeline: prompts -> conditioning -> noise -> Euler sampling -> VAE decode -> PIL images."""

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import sampling
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import InputError
from .metadata import PNG_KEY, GenerationSettings
from .model import AutoEncoder, Flux
from .registry import DEFAULT_MODEL, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantDefaults:
    num_inference_steps: int
    guidance_scale: float | None  # distilled guidance input (dev only)
    true_cfg_scale: float  # real classifier-free guidance (two forwards' worth per step)
    shift: bool  # resolution-dependent schedule shift
    size: int = 1024  # default height and width


RANDOM_MODEL = "random-tiny"  # built from a seed, never trained: see Pipeline.random_tiny

VARIANTS = {
    "pro": VariantDefaults(num_inference_steps=28, guidance_scale=None, true_cfg_scale=4.0, shift=True),
    "dev": VariantDefaults(num_inference_steps=28, guidance_scale=3.5, true_cfg_scale=1.0, shift=True),
    "schnell": VariantDefaults(num_inference_steps=4, guidance_scale=None, true_cfg_scale=1.0, shift=False),
}


def image_to_tensor(image: Image.Image, height: int, width: int) -> Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized to the target size."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tensor_to_images(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def _as_list(value, n: int, name: str) -> list:
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise InputError(f"{name}: got {len(value)} entries for {n} prompts")
    return value


class Pipeline:
    """A FLUX model with its autoencoder and text encoder, ready to generate images."""

    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoder, *, variant: str | None = None,
                 name: str = "custom", defaults: dict | None = None, text_positions: bool = False, device=None,
                 dtype=None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.transformer = transformer.to(self.device, self.dtype).eval()
        self.autoencoder = autoencoder.to(self.device, self.dtype).eval()
        # the text encoder keeps its own dtype (MiniLM stays fp32, T5 loads as asked); outputs are cast below
        self.text_encoder = text_encoder.to(device=self.device)
        self.variant = variant or ("dev" if transformer.params.guidance_embed else "schnell")
        if self.variant not in VARIANTS:
            raise InputError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        self.defaults = VARIANTS[self.variant]
        if defaults:
            self.defaults = VariantDefaults(**{**self.defaults.__dict__, **defaults})
        self.name = name
        self.text_positions = text_positions  # number the prompt's tokens in RoPE (sampling.text_ids)

    @classmethod
    def random_tiny(cls, *, device=None, dtype=None) -> "Pipeline":
        """An UNTRAINED miniature model with random weights (fixed seed): exercises the whole machinery in tests
        and quick checks without loading weights; its images are noise-like."""
        from .model import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS
        from .text import load_minilm

        log.warning("model %r is untrained (random weights): its images are not meant to look like anything",
                    RANDOM_MODEL)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer = Flux(TRANSFORMER_PRESETS["tiny-schnell"])
            autoencoder = AutoEncoder(AUTOENCODER_PRESETS["tiny"])
        return cls(transformer, autoencoder, load_minilm(), variant="schnell", name=RANDOM_MODEL,
                   defaults={"size": 64}, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, device=None, dtype=None) -> "Pipeline":
        """Load a model from local files: a built-in name, a name under $FLUXION_HOME, or a folder path."""
        if name_or_path == RANDOM_MODEL:
            return cls.random_tiny(device=device, dtype=dtype)
        from .checkpoints import load_autoencoder, load_transformer
        from .text import load_text_encoder

        files = resolve(name_or_path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        transformer = load_transformer(files.transformer, dtype=dtype, device=device)
        autoencoder = load_autoencoder(files.autoencoder, dtype=dtype, device=device)
        variant = files.variant or ("dev" if transformer.params.guidance_embed else "schnell")
        text_encoder = load_text_encoder(files, variant=variant, dtype=dtype, device=device)
        return cls(transformer, autoencoder, text_encoder, variant=variant, name=files.name,
                   defaults=files.defaults, text_positions=files.text_positions, device=device, dtype=dtype)

    # -- pieces, usable one by one ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> sampling.Conditioning:
        txt, vec = self.text_encoder.encode(prompts)
        return sampling.Conditioning.from_encoded(txt.to(self.device, self.dtype), vec.to(self.device, self.dtype),
                                                  numbered=self.text_positions)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image, height: int, width: int) -> Tensor:
        x = image_to_tensor(image, height, width).to(self.device, self.dtype)
        return self.autoencoder.encode(x)

    @torch.inference_mode()
    def decode(self, latents: Tensor, tiled: bool = False) -> Tensor:
        latents = latents.to(self.device, self.dtype)
        return self.autoencoder.decode_tiled(latents) if tiled else self.autoencoder.decode(latents)

    def check_size(self, height: int, width: int) -> None:
        multiple = 2 * self.autoencoder.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise InputError(f"{name}={value} must be a positive multiple of {multiple} "
                                 f"(the VAE down-samples by {multiple // 2}, then tokens pack 2x2); "
                                 f"try {lower} or {lower + multiple}")

    # -- the call ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | Sequence[int] | None = None,
        num_images_per_prompt: int = 1,
        image: Image.Image | None = None,
        strength: float = 1.0,
        mask_image: Image.Image | None = None,
        sigmas: Sequence[float] | None = None,
        callback: sampling.StepCallback | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        progress: bool = False,
    ):
        """Generate images; returns PIL images (each with its settings in `.info["fluxion"]`), or the final
        latents (B, 16, H/8, W/8) with output_type="latent"."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompt must be a string or a non-empty list of strings")
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "latent", "pt"):
            raise InputError(f"output_type must be 'pil', 'latent' or 'pt', got {output_type!r}")
        negatives = _as_list(negative_prompt, len(prompts), "negative_prompt")
        if height is None:
            height = image.height if image is not None else self.defaults.size
        if width is None:
            width = image.width if image is not None else self.defaults.size
        self.check_size(height, width)
        if not 0.0 < strength <= 1.0:
            raise InputError(f"strength must be in (0, 1], got {strength}")
        if mask_image is not None and image is None:
            raise InputError("mask_image needs `image`: inpainting regenerates the masked part of a source image")
        if image is None and strength != 1.0:
            raise InputError("strength < 1 needs `image` (image-to-image starts from a noised source image)")

        steps = num_inference_steps or self.defaults.num_inference_steps
        guidance = guidance_scale if guidance_scale is not None else self.defaults.guidance_scale
        true_cfg = true_cfg_scale if true_cfg_scale is not None else self.defaults.true_cfg_scale
        if self.variant == "pro" and true_cfg != 1.0:
            negatives = [n if n is not None else "" for n in negatives]  # the teacher's CFG: against the empty prompt
        use_cfg = true_cfg != 1.0 and any(n is not None for n in negatives)
        if use_cfg:
            negatives = [n if n is not None else "" for n in negatives]

        # one entry per output image: prompt p, copy k -> index p*K + k
        K = num_images_per_prompt
        batch_prompts = [p for p in prompts for _ in range(K)]
        batch_negatives = [n for n in negatives for _ in range(K)]
        seeds = self._seeds(seed, len(batch_prompts))

        lat_h, lat_w = height // self.autoencoder.downsample_factor, width // self.autoencoder.downsample_factor
        if latents is None:
            noise = sampling.get_noise(seeds, height, width, downsample=self.autoencoder.downsample_factor,
                                       device=self.device, dtype=self.dtype)
        else:
            expected = (len(batch_prompts), self.transformer.in_channels // 4, lat_h, lat_w)
            if tuple(latents.shape) != expected:
                raise InputError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
            noise = latents.to(self.device, self.dtype)
        img = sampling.pack(noise)
        img_ids = sampling.image_ids(img.shape[0], lat_h, lat_w, self.device)

        if sigmas is not None:
            timesteps = [float(s) for s in sigmas] + [0.0]
            steps = len(timesteps) - 1
        else:
            timesteps = sampling.get_schedule(steps, img.shape[1], shift=self.defaults.shift)

        inpainting = None
        if image is not None:
            source = sampling.pack(self.encode_image(image, height, width)).expand(img.shape[0], -1, -1)
            t_start = int(max(steps - steps * strength, 0))
            timesteps = timesteps[t_start:]
            if len(timesteps) < 2:
                raise InputError(f"strength={strength} with {steps} steps leaves no step to run")
            t0 = timesteps[0]
            img = (t0 * img + (1 - t0) * source).to(self.dtype)
            if mask_image is not None:
                inpainting = sampling.Inpainting(source=source, noise=sampling.pack(noise),
                                                 mask=self._packed_mask(mask_image, lat_h, lat_w, img.shape[0]))

        cond = self.encode_prompt(batch_prompts)
        negative = self.encode_prompt(batch_negatives) if use_cfg else None
        img = sampling.denoise(self.transformer, img, img_ids, cond, timesteps, guidance=guidance,
                               negative=negative, true_cfg_scale=true_cfg, inpainting=inpainting,
                               callback=callback, progress=progress)
        final = sampling.unpack(img.float(), lat_h, lat_w)
        if output_type == "latent":
            return final
        pixels = self.decode(final, tiled=height * width > 2048 * 2048)
        if output_type == "pt":
            return pixels
        images = tensor_to_images(pixels)
        for i, im in enumerate(images):
            settings = GenerationSettings(
                prompt=batch_prompts[i], negative_prompt=batch_negatives[i] if use_cfg else None, seed=seeds[i],
                height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance if self.transformer.params.guidance_embed else None,
                true_cfg_scale=true_cfg if use_cfg else 1.0, strength=strength,
                sigmas=[float(s) for s in sigmas] if sigmas is not None else None,
                model=self.name, variant=self.variant, device=self.device.type, dtype=dtype_name(self.dtype))
            im.info[PNG_KEY] = settings.to_json()
        return images

    def _seeds(self, seed, n: int) -> list[int]:
        if seed is None:
            base = secrets.randbelow(2**31)
            log.info("no seed given: using %d", base)
            return [base + i for i in range(n)]
        if isinstance(seed, int):
            return [seed + i for i in range(n)]
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise InputError(f"seed: got {len(seeds)} seeds for {n} images (prompts x num_images_per_prompt)")
        return seeds

    def _packed_mask(self, mask_image: Image.Image, lat_h: int, lat_w: int, batch: int) -> Tensor:
        """White = regenerate. Resized to the latent grid, binarised, repeated over channels, packed like latents."""
        mask = mask_image.convert("L").resize((lat_w, lat_h), Image.Resampling.BILINEAR)
        m = torch.from_numpy((np.asarray(mask, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))
        m = m[None, None].expand(batch, self.transformer.in_channels // 4, -1, -1)
        return sampling.pack(m.contiguous()).to(self.device, self.dtype)
