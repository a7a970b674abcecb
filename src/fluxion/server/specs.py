"""A job's settings (JobSpec): checked once at submission, through fluxion's own checks (settings.GenerationRequest,
Pipeline.check_size and the memory estimate), then stored as JSON with the job. Which jobs may share forward passes
is decided by `batch_key`."""

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from ..errors import InputError
from ..settings import MAX_SEED, GenerationRequest, integer, number, text
from .errors import OPENAI_PARAMS, APIError, bad_request, input_error

OUTPUT_FORMATS = ("png", "jpeg", "webp")
_CLI_FLAG = re.compile(r"^([\w\[\].]+) \((?:--[\w-]+|PROMPT)\): ")
MAX_LORAS = 4
MAX_PARTIAL_IMAGES = 3


@dataclass
class JobSpec:
    """Everything a job runs with; seeds are fixed here, so a retried job makes the same images."""

    model: str
    prompt: str
    seeds: list[int]  # one per image
    width: int
    height: int
    steps: int
    kind: str = "generate"  # or "edit" (image-to-image, inpainting)
    negative_prompt: str | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    loras: list[dict] = field(default_factory=list)  # [{"name", "file", "sha256", "scale"}], applied in this order
    output_format: str = "png"
    output_compression: int | None = None  # jpeg / webp quality, 0-100
    image: str | None = None  # edits: the source image, a file under DATA_DIR
    image_sha256: str | None = None
    mask: str | None = None  # edits: white = redo (already converted from the API's transparent = redo)
    mask_sha256: str | None = None
    strength: float = 1.0
    partial_images: int = 0  # step previews a streaming client asked for

    @property
    def n(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        return cls(**data)

    def batch_key(self) -> str:
        """Jobs with the same key run in one pipeline call: same model, size, steps, guidance, CFG mode, adapters
        (in order: updates add up in that order) and, for edits, the same source, mask and strength."""
        adapters = [(a["sha256"], a["scale"]) for a in self.loras]
        key = [self.model, self.kind, self.width, self.height, self.steps, self.guidance, self.true_cfg,
               self.negative_prompt is None, adapters, self.image_sha256, self.mask_sha256, self.strength]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def request_hash(payload: dict) -> str:
    """What makes two requests "the same" for Idempotency-Key: their parameters, canonically ordered."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class SpecLimits:
    max_prompt_chars: int
    max_steps: int
    max_images: int


class _Checks:
    """Field checks that answer 400 with the API's parameter name (OpenAI "size", BFL "width", ...)."""

    def __init__(self, names: dict[str, str]):
        self.names = names

    def param(self, name: str) -> str:
        return self.names.get(name, name)

    def run(self, name: str, check, *args):
        try:
            return check(self.param(name), *args)
        except InputError as e:  # fluxion labels known names with their CLI flag: "seed (--seed): ..."
            message = _CLI_FLAG.sub(r"\1: ", " ".join(str(e).split()), count=1)
            raise bad_request(message, self.param(name)) from None


def build_spec(fields: dict, *, model: str, info, limits: SpecLimits, pipe=None, names: dict[str, str] = OPENAI_PARAMS,
               kind: str = "generate", max_job_seconds: float | None = None) -> JobSpec:
    """Check a request's fields (fluxion names: prompt, negative_prompt, n, width, height, steps, guidance,
    true_cfg, seed, output_format, output_compression, strength, partial_images; `loras` already resolved) against
    the server's limits and the model (`info`: models.ModelInfo; `pipe`: the loaded pipeline when resident, for
    the memory estimate). Raises APIError (400) naming the parameter."""
    c = _Checks(names)
    prompt = fields.get("prompt")
    if prompt is None:
        raise bad_request(f"{c.param('prompt')}: required", c.param("prompt"), code="missing_required_parameter")
    prompt = c.run("prompt", text, prompt)
    if len(prompt) > limits.max_prompt_chars:
        raise bad_request(f"{c.param('prompt')}: expected at most {limits.max_prompt_chars} characters, got "
                          f"{len(prompt)}", c.param("prompt"), code="prompt_too_long")
    negative = fields.get("negative_prompt")
    if negative is not None:
        negative = c.run("negative_prompt", text, negative)
        if len(negative) > limits.max_prompt_chars:
            raise bad_request(f"{c.param('negative_prompt')}: expected at most {limits.max_prompt_chars} characters",
                              c.param("negative_prompt"), code="prompt_too_long")
    n = c.run("n", integer, 1 if fields.get("n") is None else fields["n"], 1, limits.max_images)
    steps = fields.get("steps")
    steps = info.default_steps if steps is None else c.run("steps", integer, steps, 1, limits.max_steps)
    steps = min(steps, limits.max_steps)
    width = info.default_size if fields.get("width") is None else c.run("width", integer, fields["width"], 1, 1 << 16)
    height = info.default_size if fields.get("height") is None else c.run("height", integer, fields["height"], 1,
                                                                          1 << 16)
    guidance = fields.get("guidance")
    if guidance is not None:
        guidance = c.run("guidance", number, guidance, 0.0, 100.0)
        if not info.guidance:
            guidance = None  # the model has no guidance input: ignoring it keeps such jobs batchable together
    elif info.guidance:
        guidance = info.default_guidance
    true_cfg = fields.get("true_cfg")
    if true_cfg is not None:
        true_cfg = c.run("true_cfg", number, true_cfg, 0.0, 100.0)
    seed = fields.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)  # fixed now, stored with the job: a retry makes the same images
    seed = c.run("seed", integer, seed, 0, MAX_SEED - n + 1)
    seeds = [seed + i for i in range(n)]
    output_format = fields.get("output_format") or "png"
    if output_format == "jpg":
        output_format = "jpeg"
    if output_format not in OUTPUT_FORMATS:
        raise bad_request(f"{c.param('output_format')}: expected one of {', '.join(OUTPUT_FORMATS)}, got "
                          f"{output_format!r:.40}", c.param("output_format"))
    compression = fields.get("output_compression")
    if compression is not None:
        compression = c.run("output_compression", integer, compression, 0, 100)
    partial = c.run("partial_images", integer, fields.get("partial_images") or 0, 0, MAX_PARTIAL_IMAGES)
    strength = fields.get("strength")
    spec = JobSpec(model=model, prompt=prompt, seeds=seeds, width=width, height=height, steps=steps, kind=kind,
                   negative_prompt=negative, guidance=guidance, true_cfg=true_cfg, loras=fields.get("loras") or [],
                   output_format=output_format, output_compression=compression,
                   strength=1.0 if strength is None else c.run("strength", number, strength, 0.0, 1.0),
                   partial_images=partial, image=fields.get("image"), image_sha256=fields.get("image_sha256"),
                   mask=fields.get("mask"), mask_sha256=fields.get("mask_sha256"))
    check_against_model(spec, info, pipe, names, max_job_seconds, images=fields.get("images"))
    return spec


def generation_request(spec: JobSpec, *, images: dict | None = None, cache=None) -> GenerationRequest:
    """The fluxion request for one job alone (images: {"image", "mask_image"} PIL images for edits)."""
    images = images or {}
    return GenerationRequest(
        prompt=[spec.prompt], negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
        num_inference_steps=spec.steps, guidance_scale=spec.guidance, true_cfg_scale=spec.true_cfg,
        seed=list(spec.seeds), num_images_per_prompt=spec.n, image=images.get("image"),
        mask_image=images.get("mask_image"), strength=spec.strength, cache=cache)


def check_against_model(spec: JobSpec, info, pipe, names: dict[str, str], max_job_seconds: float | None,
                        images: dict | None = None) -> None:
    """fluxion's checks of the whole request, the supported sizes and, when the model is in memory, whether one
    image fits (the memory estimate) and the time cap."""
    try:
        request = generation_request(spec, images=images)
        if pipe is not None:
            job = pipe.plan(request)  # size rules, then the memory estimate: refuses what cannot fit
            if max_job_seconds is not None:
                seconds = pipe.estimate_seconds(job.height, job.width, job.num_images, job.steps, job.use_cfg)
                if seconds > max_job_seconds:
                    raise APIError(400, f"{names.get('num_inference_steps', 'steps')}: this job would take about "
                                   f"{seconds:.0f} s, over the server's limit of {max_job_seconds:g} s; ask for "
                                   "fewer steps, images or pixels", param=names.get("num_inference_steps", "steps"),
                                   code="job_too_large")
        else:
            info.check_size(spec.height, spec.width)
    except InputError as e:
        raise input_error(e, names) from None


def size_rules(name: str, sizes, downsample: int = 8):
    """A stand-in `self` for Pipeline.check_size, so a model that is not loaded is checked with the same rules and
    the same messages as one that is."""
    return SimpleNamespace(name=name, sizes=sizes, autoencoder=SimpleNamespace(downsample_factor=downsample))
