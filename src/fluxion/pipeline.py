"""Text-to-image pipeline: prompts -> conditioning -> noise -> Euler sampling -> VAE decode -> PIL images."""

import logging
import os
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
from .memory import (MEMORY_HEADROOM, MemoryEstimate, available_memory, estimate_memory, gib, job_flops,
                     matmul_flops_per_second)
from .metadata import PNG_KEY, GenerationSettings
from .model import AutoEncoder, Flux
from .registry import DEFAULT_MODEL, resolve
from .settings import GenerationRequest, SizeRange, label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantDefaults:
    num_inference_steps: int
    guidance_scale: float | None  # distilled guidance input (dev only)
    true_cfg_scale: float  # real classifier-free guidance (two forwards' worth per step)
    shift: bool  # resolution-dependent schedule shift
    size: int = 1024  # default height and width


# The share of the matmul pace (memory.matmul_flops_per_second) a whole job keeps (attention, norms and the VAE's
# convolutions run below the GEMM peak): 0.45-0.8 measured with tiny-schnell at 256-1024 px and tiny-pro at 512 px
# on the 2-core CPU.
JOB_EFFICIENCY = 0.5

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


def check_options(quantize: str | None, offload: str | None) -> None:
    from .quant.schemes import SCHEMES
    from .settings import OFFLOAD_MODES, choice, optional

    optional(choice, "quantize", quantize, SCHEMES)
    optional(choice, "offload", offload, OFFLOAD_MODES)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@dataclass
class Job:
    """A request resolved against a model: what runs, image by image, and in batches of what size."""

    height: int
    width: int
    steps: int
    guidance: float | None
    true_cfg: float
    use_cfg: bool
    prompts: list[str]  # one per output image
    negatives: list[str | None]
    seeds: list[int]
    batch_size: int = 1
    tiled: bool = False

    @property
    def num_images(self) -> int:
        return len(self.prompts)


class Pipeline:
    """A FLUX model with its autoencoder and text encoder, ready to generate images."""

    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoder, *, variant: str | None = None,
                 name: str = "custom", defaults: dict | None = None, text_positions: bool = False,
                 sizes: SizeRange | None = None, teacache_polynomial: tuple[float, ...] | None = None,
                 shift_schedule: sampling.ShiftSchedule = sampling.FLUX_SHIFT,
                 quantize: str | None = None, offload: str | None = None, compile: bool = False,
                 vae_slicing: bool = False, device=None, dtype=None):
        """quantize: "int8", "int8-weight", "fp8" or "int4" (fluxion.quant), the transformer's linears in place.
        offload: "model" or "sequential" (fluxion.offload): the weights stay on the CPU and visit `device` while
        they run. compile: torch.compile the transformer's blocks (fluxion.compile; see `compile()` for LoRA
        hot-swap). vae_slicing: decode a batch one image at a time."""
        from .quant import quantize as quantize_linears
        from .quant import quantized_scheme

        check_options(quantize, offload)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        home = torch.device("cpu") if offload else self.device  # offloaded weights live on the CPU
        self.transformer = transformer.to(home, self.dtype).eval()
        self.autoencoder = autoencoder.to(home, self.dtype).eval()
        # the text encoder keeps its own dtype (MiniLM stays fp32, T5 loads as asked); outputs are cast below
        self.text_encoder = text_encoder.to(device=home)
        if quantize is not None and quantized_scheme(self.transformer) != quantize:
            quantize_linears(self.transformer, quantize)  # (refuses a model quantized with another scheme)
        self.quantization = quantized_scheme(self.transformer)  # also set for a model loaded quantized
        self.offload = offload
        self._offloads = []
        if offload is not None:
            from .offload import enable_offload

            self._offloads = enable_offload(offload, self._models(), self.device)
        if compile:
            self.compile()
        self.vae_slicing = vae_slicing
        self.variant = variant or ("dev" if transformer.params.guidance_embed else "schnell")
        if self.variant not in VARIANTS:
            raise InputError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        self.defaults = VARIANTS[self.variant]
        if defaults:
            self.defaults = VariantDefaults(**{**self.defaults.__dict__, **defaults})
        self.name = name
        self.sizes = sizes  # the sizes the model supports (None: any multiple of 16)
        self.text_positions = text_positions  # number the prompt's tokens in RoPE (sampling.text_ids)
        self.lora_files: dict[str, tuple[str, str]] = {}  # loaded adapter -> (file name, sha256), for the record
        self.teacache_polynomial = teacache_polynomial  # fitted for this model (cache.fit_teacache); None: identity
        self.shift_schedule = shift_schedule  # the token range of the resolution shift (sampling.ShiftSchedule)
        self.last_cache = None

    @classmethod
    def random_tiny(cls, *, device=None, dtype=None, **options) -> "Pipeline":
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
                   defaults={"size": 64}, device=device, dtype=dtype, **options)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, device=None, dtype=None, quantize: str | None = None,
                        offload: str | None = None, compile: bool = False, vae_slicing: bool = False) -> "Pipeline":
        """Load a model from local files: a built-in name, a name under $FLUXION_HOME, or a folder path. With
        `quantize`, the quantized transformer is saved under $FLUXION_HOME/quantized the first time and loaded from
        there afterwards (no re-quantizing at every start); a folder whose transformer file is already quantized
        (fluxion.quant.save_quantized) loads as it is. Other options: see __init__."""
        options = dict(quantize=quantize, offload=offload, compile=compile, vae_slicing=vae_slicing)
        check_options(quantize, offload)  # before anything loads
        if name_or_path == RANDOM_MODEL:
            return cls.random_tiny(device=device, dtype=dtype, **options)
        from .checkpoints import load_autoencoder
        from .quant.startup import load_transformer_quantized
        from .text import load_text_encoder

        files = resolve(name_or_path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        load_to = "cpu" if offload else device
        transformer = load_transformer_quantized(files.transformer, quantize, dtype=dtype, device=load_to)
        autoencoder = load_autoencoder(files.autoencoder, dtype=dtype, device=load_to)
        variant = files.variant or ("dev" if transformer.params.guidance_embed else "schnell")
        text_encoder = load_text_encoder(files, variant=variant, dtype=dtype, device=load_to)
        return cls(transformer, autoencoder, text_encoder, variant=variant, name=files.name,
                   defaults=files.defaults, text_positions=files.text_positions, sizes=files.sizes,
                   teacache_polynomial=files.teacache_polynomial, shift_schedule=files.shift_schedule,
                   device=device, dtype=dtype, **options)

    # -- speed and memory options (fluxion.quant, fluxion.offload, fluxion.compile) -----------------------------
    def _models(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "transformer": self.transformer, "autoencoder": self.autoencoder}

    def compile(self, lora_rank: int | None = None, freezing: bool = False) -> None:
        """torch.compile the transformer (regionally: each block kind and the final layer compile once per input
        shape). lora_rank=R reserves LoRA hot-swap slots of rank R first, so that adapters up to that rank load,
        switch and change scale without recompiling; without it, a LoRA change recompiles."""
        from .compile import compile_transformer

        compile_transformer(self.transformer, lora_rank=lora_rank, freezing=freezing)

    def _release_device(self) -> None:
        """After a job: offloaded weights go home, so the device holds nothing between jobs."""
        for handle in self._offloads:
            handle.evict()

    # -- LoRA adapters (fluxion.lora): applied to the transformer, switchable per call without a reload -----------
    def load_lora(self, path, name: str | None = None, scale: float = 1.0, strict: bool = True) -> str:
        """Apply a LoRA file (a path, or a name under $FLUXION_HOME/loras or built in, e.g. "star"), unfused and
        active at `scale`; returns its name. Its text-encoder part goes to FLUX's CLIP-L and T5 (a model reading
        MiniLM has none: strict refuses such a file, strict=False skips that part). Images made with it record
        its file name, sha256 and scale."""
        from .checkpoints.io import read_checkpoint_info
        from .files import sha256_file
        from .lora import load_lora
        from .registry import find_lora
        from .settings import lora_scale

        scale = lora_scale("scale", scale)
        file = find_lora(str(path))
        base = read_checkpoint_info(file).metadata.get("fluxion.base_model")
        if base and base != self.name:
            log.warning("LoRA %s was trained for %s; applying it to %s", file.name, base, self.name)
        name = load_lora(self.transformer, file, scale=scale, name=name, strict=strict,
                         text_encoders=self._text_encoder_modules())
        self.lora_files[name] = (file.name, sha256_file(file))
        return name

    def _text_encoder_modules(self) -> dict[str, torch.nn.Module]:
        """The Hugging Face models a LoRA's text-encoder part may target (FLUX's CLIP-L and T5)."""
        te = self.text_encoder
        return {part: getattr(te, attr).hf_module for part, attr in (("clip_l", "clip"), ("t5", "t5"))
                if hasattr(getattr(te, attr, None), "hf_module")}

    def _lora_carriers(self) -> list[torch.nn.Module]:
        """The modules holding adapters: the transformer, and text encoders a file reached."""
        return [self.transformer] + [m for m in self._text_encoder_modules().values() if hasattr(m, "_fluxion_lora")]

    def set_loras(self, scales: dict[str, float]) -> None:
        """Make exactly these loaded adapters active, at these scales (the others stay loaded, at 0)."""
        from .lora import loaded_adapters, set_loras
        from .settings import lora_scale

        scales = {name: lora_scale(f"scales[{name!r}]", s) for name, s in scales.items()}
        set_loras(self.transformer, scales)
        for encoder in self._lora_carriers()[1:]:
            set_loras(encoder, {n: s for n, s in scales.items() if n in loaded_adapters(encoder)})

    def fuse_loras(self) -> None:
        from .lora import fuse_loras

        for module in self._lora_carriers():
            fuse_loras(module)

    def unfuse_loras(self) -> None:
        from .lora import unfuse_loras

        for module in self._lora_carriers():
            unfuse_loras(module)

    def unload_loras(self) -> None:
        from .lora import unload_loras

        for module in self._lora_carriers():
            unload_loras(module)
        self.lora_files = {}

    def lora_records(self) -> list[dict] | None:
        """The active adapters as images record them (settings.lora_records), or None without any."""
        from .lora import loaded_adapters

        active = {name: scale for name, scale in loaded_adapters(self.transformer).items() if scale != 0.0}
        return [{"name": name, "file": self.lora_files[name][0], "sha256": self.lora_files[name][1], "scale": scale}
                for name, scale in active.items() if name in self.lora_files] or None

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
        if self.vae_slicing and latents.shape[0] > 1:
            from .slicing import decode_sliced

            return decode_sliced(self.autoencoder, latents, tiled)
        return self.autoencoder.decode_tiled(latents) if tiled else self.autoencoder.decode(latents)

    def check_size(self, height: int, width: int, allow_any_size: bool = False) -> None:
        """Refuse sizes the model cannot take (not a multiple of 16) or was not made for (outside `self.sizes`)."""
        multiple = 2 * self.autoencoder.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise InputError(f"{label(name)}: expected a positive multiple of {multiple} (the VAE down-samples "
                                 f"by {multiple // 2}, then tokens pack 2x2), got {value}; try {lower} or "
                                 f"{lower + multiple}")
        if self.sizes is None or self.sizes.contains(height, width):
            return
        if not allow_any_size:
            raise InputError(f"width x height (--width, --height): {self.name} supports {self.sizes.describe()}, "
                             f"got {width}x{height}; pass allow_any_size=True (--allow-any-size) to try it anyway")
        log.warning("%dx%d is outside the sizes %s supports (%s): expect poorer images", width, height, self.name,
                    self.sizes.describe())

    def estimate_memory(self, height: int, width: int, batch: int, cfg: bool = False,
                        tiled: bool = False) -> MemoryEstimate:
        return estimate_memory(self.transformer, self.autoencoder, self.text_encoder, height=height, width=width,
                               batch=batch, text_tokens=self.text_encoder.max_length, cfg=cfg, tiled=tiled,
                               # on the CPU, offloaded weights stay in the same memory
                               offload=self.offload if self.device.type != "cpu" else None, sliced=self.vae_slicing)

    def estimate_seconds(self, height: int, width: int, batch: int, steps: int, cfg: bool = False) -> float:
        """A rough time for a job: its FLOPs at the pace this device's matrix multiply reaches, over the share of
        that pace a whole job keeps (measured on the CPU: JOB_EFFICIENCY)."""
        flops = job_flops(self.transformer, self.autoencoder, height=height, width=width, batch=batch, steps=steps,
                          text_tokens=self.text_encoder.max_length, cfg=cfg)
        return flops / (matmul_flops_per_second(self.device, self.dtype) * JOB_EFFICIENCY)

    # -- the call ----------------------------------------------------------------------------------------------
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
        image: Image.Image | str | os.PathLike | None = None,
        strength: float = 1.0,
        mask_image: Image.Image | str | os.PathLike | None = None,
        sigmas: Sequence[float] | None = None,
        callback: sampling.StepCallback | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        progress: bool = False,
        allow_any_size: bool = False,
        max_memory: int | str | None = None,
        vae_tiling: bool | None = None,
        cache: str | None = None,
    ):
        """Generate images; returns PIL images (each with its settings in `.info["fluxion"]`), or the final
        latents (B, 16, H/8, W/8) with output_type="latent", or pixels (B, 3, H, W) in [-1, 1] with "pt".
        Every argument is checked first (settings.GenerationRequest): bad input raises InputError naming it.
        `cache` ("fbcache" or "fbcache:THRESHOLD", fluxion.cache) skips most of the transformer on steps whose
        input barely changed."""
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            seed=seed, num_images_per_prompt=num_images_per_prompt, image=image, strength=strength,
            mask_image=mask_image, sigmas=sigmas, output_type=output_type, allow_any_size=allow_any_size,
            max_memory=max_memory, cache=cache)
        return self.generate(request, callback=callback, latents=latents, progress=progress, vae_tiling=vae_tiling)

    def plan(self, request: GenerationRequest, vae_tiling: bool | None = None) -> Job:
        """Resolve the request against this model: defaults, size checks, the schedule, and batches that fit in
        memory. Raises InputError before any work is done."""
        r = request
        height, width = r.height, r.width
        if r.image is not None:  # the source image's size, down to the nearest multiple the model takes
            multiple = 2 * self.autoencoder.downsample_factor
            height = height or max(multiple, r.image.height // multiple * multiple)
            width = width or max(multiple, r.image.width // multiple * multiple)
        height, width = height or self.defaults.size, width or self.defaults.size
        self.check_size(height, width, r.allow_any_size)

        guidance = r.guidance_scale if r.guidance_scale is not None else self.defaults.guidance_scale
        if r.guidance_scale is not None and not self.transformer.params.guidance_embed:
            log.warning("guidance_scale is ignored: %s has no guidance input (use true_cfg_scale for real CFG)",
                        self.name)
        true_cfg = r.true_cfg_scale if r.true_cfg_scale is not None else self.defaults.true_cfg_scale
        negatives = list(r.negative_prompt)
        if self.variant == "pro" and true_cfg != 1.0:
            negatives = [n if n is not None else "" for n in negatives]  # the teacher's CFG: against the empty prompt
        use_cfg = true_cfg != 1.0 and any(n is not None for n in negatives)
        if use_cfg:
            negatives = [n if n is not None else "" for n in negatives]
        elif true_cfg != 1.0:
            log.warning("true_cfg_scale=%g is ignored without a negative_prompt (--negative-prompt)", true_cfg)

        if r.sigmas is not None:
            steps = len(r.sigmas)
        else:
            steps = r.num_inference_steps or self.defaults.num_inference_steps

        K = r.num_images_per_prompt  # one entry per output image: prompt p, copy k -> index p*K + k
        job = Job(height=height, width=width, steps=steps, guidance=guidance, true_cfg=true_cfg, use_cfg=use_cfg,
                  prompts=[p for p in r.prompt for _ in range(K)], negatives=[n for n in negatives for _ in range(K)],
                  seeds=self._seeds(r.seed, r.num_images))
        self._fit_in_memory(job, r.max_memory, vae_tiling)
        if r.allow_any_size and self.sizes is not None and not self.sizes.contains(height, width):
            seconds = self.estimate_seconds(height, width, job.num_images, steps, use_cfg)
            log.warning("estimated time for %d image(s) at %dx%d: about %s on %s", job.num_images, width, height,
                        _duration(seconds), self.device)
        return job

    def _fit_in_memory(self, job: Job, max_memory: int | None, vae_tiling: bool | None) -> None:
        """Choose the batch size (and VAE tiling, when not forced) so the job's peak fits the budget: max_memory
        for weights + work, else the memory still available on the device for the work."""
        tiling_options = [vae_tiling] if vae_tiling is not None else [job.height * job.width > 2048 * 2048, True]
        if max_memory is not None:
            budget, counted = max_memory, "total"
            where = f"the max_memory (--max-memory) budget of {gib(max_memory)}"
        else:
            available = available_memory(self.device)
            budget, counted = int(available * MEMORY_HEADROOM), "working"
            where = f"{gib(budget)} usable on {self.device} ({MEMORY_HEADROOM:.0%} of the {gib(available)} available)"

        def need(batch: int, tiled: bool) -> int:
            return getattr(self.estimate_memory(job.height, job.width, batch, job.use_cfg, tiled), counted)

        for tiled in dict.fromkeys(tiling_options):  # untiled first unless forced: tiling costs time
            if need(1, tiled) <= budget:
                lo, hi = 1, job.num_images  # largest batch that fits (the estimate grows with the batch)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if need(mid, tiled) <= budget else (lo, mid - 1)
                job.batch_size, job.tiled = lo, tiled
                if lo < job.num_images:
                    log.info("running %d images in batches of %d to fit %s", job.num_images, lo, where)
                return
        tiled = tiling_options[-1]
        est = self.estimate_memory(job.height, job.width, 1, job.use_cfg, tiled)
        advice = []
        fitting = self._largest_fitting_size(job, lambda h, w: getattr(
            self.estimate_memory(h, w, 1, job.use_cfg, tiled), counted) <= budget)
        if fitting:
            advice.append(f"a smaller size (up to about {fitting[1]}x{fitting[0]} at this aspect ratio)")
        if est.vae >= est.transformer and not tiled:
            advice.append("VAE tiling (vae_tiling=True, --vae-tiling)")
        if self.dtype == torch.float32:
            advice.append("bf16 (dtype='bf16', --dtype bf16), about half the activations")
        if max_memory is not None:
            advice.append("a larger max_memory (--max-memory)")
        parts = f"transformer {gib(est.transformer)}, VAE decode {gib(est.vae)}"
        needs = (f"{gib(est.total)} in all (weights {gib(est.weights)}, {parts})" if max_memory is not None else
                 f"{gib(est.working)} beyond its {gib(est.weights)} of loaded weights ({parts})")
        raise InputError(f"one {job.width}x{job.height} image needs about {needs}, more than {where}; try "
                         + ", or ".join(advice))

    def _largest_fitting_size(self, job: Job, fits) -> tuple[int, int] | None:
        """The largest (height, width) at the job's aspect ratio, in multiples of 16, that `fits`."""
        multiple = 2 * self.autoencoder.downsample_factor

        def size(scale: float) -> tuple[int, int]:
            return (max(multiple, int(job.height * scale) // multiple * multiple),
                    max(multiple, int(job.width * scale) // multiple * multiple))

        if not fits(*size(0.0)):
            return None
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(*size(mid)) else (lo, mid)
        return size(lo)

    def generate(self, request: GenerationRequest, *, callback: sampling.StepCallback | None = None,
                 latents: Tensor | None = None, progress: bool = False, vae_tiling: bool | None = None):
        """Run a checked request (see __call__), in batches that fit in memory."""
        outputs = list(self.generate_batches(request, callback=callback, latents=latents, progress=progress,
                                             vae_tiling=vae_tiling))
        if request.output_type != "pil":
            return torch.cat(outputs)
        return [image for batch in outputs for image in batch]

    def generate_batches(self, request: GenerationRequest, *, callback: sampling.StepCallback | None = None,
                         latents: Tensor | None = None, progress: bool = False, vae_tiling: bool | None = None):
        """generate(), one batch at a time as each finishes (so a caller can save them while the rest run)."""
        job = self.plan(request, vae_tiling)
        lat_h = job.height // self.autoencoder.downsample_factor
        lat_w = job.width // self.autoencoder.downsample_factor
        if latents is not None:
            expected = (job.num_images, self.transformer.in_channels // 4, lat_h, lat_w)
            if tuple(latents.shape) != expected:
                raise InputError(f"latents: expected shape {expected}, got {tuple(latents.shape)}")
        try:
            for start in range(0, job.num_images, job.batch_size):
                part = slice(start, start + job.batch_size)
                with torch.inference_mode():
                    yield self._generate_batch(request, job, part, None if latents is None else latents[part],
                                               callback, progress)
        finally:
            self._release_device()

    def _generate_batch(self, r: GenerationRequest, job: Job, part: slice, latents: Tensor | None,
                        callback, progress: bool):
        prompts, negatives, seeds = job.prompts[part], job.negatives[part], job.seeds[part]
        lat_h = job.height // self.autoencoder.downsample_factor
        lat_w = job.width // self.autoencoder.downsample_factor
        if latents is None:
            noise = sampling.get_noise(seeds, job.height, job.width, downsample=self.autoencoder.downsample_factor,
                                       device=self.device, dtype=self.dtype)
        else:
            noise = latents.to(self.device, self.dtype)
        img = sampling.pack(noise)
        img_ids = sampling.image_ids(img.shape[0], lat_h, lat_w, self.device)

        if r.sigmas is not None:
            timesteps = list(r.sigmas) + [0.0]
        else:
            timesteps = sampling.get_schedule(job.steps, img.shape[1], shift=self.defaults.shift,
                                              schedule=self.shift_schedule)

        inpainting = None
        if r.image is not None:
            source = sampling.pack(self.encode_image(r.image, job.height, job.width)).expand(img.shape[0], -1, -1)
            timesteps = timesteps[int(max(job.steps - job.steps * r.strength, 0)):]
            t0 = timesteps[0]
            img = (t0 * img + (1 - t0) * source).to(self.dtype)
            if r.mask_image is not None:
                inpainting = sampling.Inpainting(source=source, noise=sampling.pack(noise),
                                                 mask=self._packed_mask(r.mask_image, lat_h, lat_w, img.shape[0]))

        cond = self.encode_prompt(prompts)
        negative = self.encode_prompt(negatives) if job.use_cfg else None
        model = self.transformer if r.cache is None else r.cache.wrap(self.transformer, self.teacache_polynomial)
        self.last_cache = None if r.cache is None else model  # its step counts (and TeaCache's trace), to inspect
        img = sampling.denoise(model, img, img_ids, cond, timesteps, guidance=job.guidance,
                               negative=negative, true_cfg_scale=job.true_cfg, inpainting=inpainting,
                               callback=callback, progress=progress)
        if r.cache is not None:
            log.info("%s: %d of %d steps computed in full", r.cache, model.computed, model.computed + model.skipped)
        final = sampling.unpack(img.float(), lat_h, lat_w)
        if r.output_type == "latent":
            return final
        pixels = self.decode(final, tiled=job.tiled)
        if r.output_type == "pt":
            return pixels
        images = tensor_to_images(pixels)
        loras = self.lora_records()
        for i, im in enumerate(images):
            settings = GenerationSettings(
                prompt=prompts[i], negative_prompt=negatives[i] if job.use_cfg else None, seed=seeds[i],
                height=job.height, width=job.width, num_inference_steps=job.steps,
                guidance_scale=job.guidance if self.transformer.params.guidance_embed else None,
                true_cfg_scale=job.true_cfg if job.use_cfg else 1.0, strength=r.strength, sigmas=r.sigmas,
                init_image=r.init_image_path, mask_image=r.mask_image_path,
                model=self.name, variant=self.variant, device=self.device.type, dtype=dtype_name(self.dtype),
                loras=loras, cache=None if r.cache is None else str(r.cache), quantize=self.quantization)
            im.info[PNG_KEY] = settings.to_json()
        return images

    def _seeds(self, seed: int | list[int] | None, n: int) -> list[int]:
        if seed is None:
            base = secrets.randbelow(2**31)
            log.info("no seed given: using %d", base)
            return [base + i for i in range(n)]
        if isinstance(seed, int):
            return [seed + i for i in range(n)]
        return list(seed)

    def _packed_mask(self, mask_image: Image.Image, lat_h: int, lat_w: int, batch: int) -> Tensor:
        """White = regenerate. Resized to the latent grid, binarised, repeated over channels, packed like latents."""
        mask = mask_image.convert("L").resize((lat_w, lat_h), Image.Resampling.BILINEAR)
        m = torch.from_numpy((np.asarray(mask, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))
        m = m[None, None].expand(batch, self.transformer.in_channels // 4, -1, -1)
        return sampling.pack(m.contiguous()).to(self.device, self.dtype)
