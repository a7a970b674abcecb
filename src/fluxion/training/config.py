"""Training recipes: TOML files parsed into dataclasses, with errors that name the file and the offending key."""

import copy
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..data.dataset import CAPTION_MODES
from ..data.shapes import ALL_SHAPES, BUCKETS, HELD_OUT_SHAPES, LAYOUTS, P_RELATION, TRAIN_SHAPES
from ..errors import InputError
from ..model.configs import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS, AutoEncoderParams, FluxParams
from ..pipeline import VARIANTS, VariantDefaults
from ..settings import ShiftSchedule

STAGES = ("vae", "flow", "guidance", "fewstep", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
LORA_LAYOUTS = ("peft", "kohya", "comfy")
# What a LoRA recipe's objective.targets may name besides glob patterns of module paths (fnmatch).
LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
                  "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1", "single_blocks.*.linear2"),
    "mlp": ("double_blocks.*.img_mlp.0", "double_blocks.*.img_mlp.2", "double_blocks.*.txt_mlp.0",
            "double_blocks.*.txt_mlp.2"),  # (the single blocks' MLP shares linear1/linear2 with attention)
    "modulation": ("double_blocks.*.img_mod.lin", "double_blocks.*.txt_mod.lin", "single_blocks.*.modulation.lin",
                   "final_layer.adaLN_modulation.1"),
    "embedders": ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.linear"),
}

DEFAULT_PROMPTS = [
    "a red circle", "two blue squares", "a green triangle left of a yellow circle",
    "three orange circles on a black background", "a large purple square above a small red triangle",
    "four yellow triangles", "a blue circle below a green square", "a purple triangle",
]


class ConfigError(InputError):
    """A training recipe is malformed: unknown or missing key, wrong type, or a value out of range."""


@dataclass
class RunConfig:
    name: str  # the model's name (manifest "name")
    stage: str  # one of STAGES
    out_dir: str  # run folder: checkpoint, metrics, plots, samples, the finished model
    steps: int  # optimiser steps of the whole run (the LR schedule spans them)
    batch_size: int
    seed: int = 0  # model init and every random draw of training (noise, t, dropout, guidance)
    device: str = "auto"  # "auto": cuda, then mps, then cpu
    precision: str = "auto"  # "bf16": autocast the forward; "auto": bf16 on accelerators, fp32 on cpu


@dataclass
class DataConfig:
    seed: int = 0  # the shapes world's seed: item i is a function of (seed, i)
    num_images: int = 1_000_000  # dataset length; transformer stages encode this many images once, into a cache
    buckets: list[list[int]] = field(default_factory=lambda: [list(b) for b in BUCKETS])
    cache_dir: str = ""  # frozen-feature cache (VAE latents, MiniLM states); "" = <out_dir>/cache
    p_relation: float = P_RELATION  # share of two-object relation scenes; the rest are 1-4 copies of one object
    text_length: int = 32  # MiniLM tokens per caption (padded); recorded in the model's manifest for inference
    layout: str = "spread"  # where a pair's objects go (fluxion.data.shapes.LAYOUTS)
    captions: str = "templates"  # "varied": many phrasings of each scene (fluxion.data.captions.draw_wording);
    # "rich": more of them, with filler words (captions.RICH_WORDINGS)
    captions_per_image: int = 1  # captions cached per image; epoch e reads caption (e + i) % n of item i
    # pair captions name the left/upper object first half the time, not 65% (layout "halves"; captions.caption)
    balance_order: bool = False
    shapes: list[str] = field(default_factory=lambda: list(TRAIN_SHAPES))  # the shapes scenes are drawn from
    teach: str = ""  # a held-out shape the first teach_images scenes show (a LoRA teaching it); "" = none
    teach_images: int = 0  # 0 = all; the rest are ordinary scenes without it (prior preservation)


@dataclass
class ModelConfig:
    preset: str  # TRANSFORMER_PRESETS or (stage "vae") AUTOENCODER_PRESETS
    params: dict = field(default_factory=dict)  # overrides of the preset's fields
    init_from: str = ""  # weights to start from (a teacher or an earlier stage; deeper models grow); "" = scratch
    init_guidance: float = 0.0  # init_from embeds guidance, this model not: fold guidance_in(g) into a bias
    autoencoder: str = ""  # the frozen trained VAE (transformer stages)
    # Number the caption's tokens in RoPE (sampling.text_ids): word order for a model reading MiniLM's states.
    # A teacher (guidance, few_step stages) reads the captions the same way as its student.
    text_positions: bool = False
    # The resolution shift's token range (sampling.ShiftSchedule fields, e.g. {base_seq_len = 16, max_seq_len =
    # 64} for 64-128 px); {} = FLUX.1's 256-4096. Used by training's timesteps and recorded for sampling.
    shift_schedule: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine" (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class EMAConfig:
    decay: float = 0.999


@dataclass
class VAEObjective:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-5  # on the per-element mean KL: small, only to keep the latents bounded
    stats_images: int = 4096  # images whose posterior means set the latent scale/shift at the end


@dataclass
class FlowObjective:
    t_mean: float = 0.0  # logit-normal timesteps, t = sigmoid(N(t_mean, t_std)) (SD3)
    t_std: float = 1.0
    shift: bool = True  # apply the sampler's resolution-dependent shift to t as well
    caption_dropout: float = 0.1  # empty caption "" with this probability (for classifier-free guidance)
    # Mix each caption's text states with another caption's of the batch, by a weight drawn from U(0, text_mixup);
    # the target stays the caption's own image, so the model must read its words through word-like interference.
    text_mixup: float = 0.0


@dataclass
class GuidanceObjective:
    teacher: str  # transformer without guidance embedding, sampled with true CFG against ""
    guidance_min: float = 1.0  # w ~ U[guidance_min, guidance_max]
    guidance_max: float = 6.0
    t_mean: float = 0.0
    t_std: float = 1.0
    shift: bool = True
    caption_dropout: float = 0.0


@dataclass
class FewStepObjective:
    teacher: str  # a dev model (distilled guidance) or a pro model (true CFG)
    teacher_guidance: float = 3.5  # the teacher's guidance (embedded for dev, CFG scale for pro)
    teacher_substeps: int = 4  # Euler steps of the teacher per student step
    student_steps: list[int] = field(default_factory=lambda: [4])  # schedules the student learns
    # the schedules carry the sampler's resolution-dependent shift (sampling's is export.defaults.shift)
    shift: bool = False
    # share of samples whose x_t is where the student's own steps from pure noise land (sampling's inputs), not
    # the data noised to t; 0 = all from the data (the default, as every recipe before it)
    student_rollout: float = 0.0
    # how often each step of the schedules is drawn (one weight per step, schedules in order: [0.4, 0.3, 0.2, 0.1]
    # for 4 steps); empty = all equally often
    segment_weights: list[float] = field(default_factory=list)


@dataclass
class LoRAObjective:
    """A low-rank adapter of the frozen model.init_from (DreamBooth-style): flow matching on the taught images,
    and on the prior-preservation images the data's flow or the base's own velocity (prior_target)."""

    rank: int = 8
    alpha: float = 8.0  # the update is (alpha / rank) * up @ down
    targets: list[str] = field(default_factory=lambda: ["attention"])  # LORA_TARGET_GROUPS names or globs
    guidance: float = 1.0  # the guidance input of a dev base model on the taught images
    # The prior-preservation images (data.teach_images onwards): "data" regresses their flow like the taught ones;
    # "base" regresses the frozen base model's own velocity there, at guidance drawn from prior_guidance, so the
    # adapter keeps the base's function (at every guidance a dev model is used with) instead of refitting the images.
    prior_target: str = "data"
    prior_guidance: list[float] = field(default_factory=lambda: [1.0, 6.0])
    t_mean: float = 0.0
    t_std: float = 1.0
    shift: bool = True
    caption_dropout: float = 0.1


OBJECTIVES = {"vae": VAEObjective, "flow": FlowObjective, "guidance": GuidanceObjective, "fewstep": FewStepObjective,
              "lora": LoRAObjective}


@dataclass
class LogConfig:
    log_every: int = 10  # metrics.jsonl rows (mean loss over the interval)
    plot_every: int = 500  # loss.png
    sample_every: int = 1000  # samples/step-XXXXXXX.png from the EMA model; 0 = off
    checkpoint_every: int = 500
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    sample_size: int = 64
    progress: bool = True


@dataclass
class ExportConfig:
    variant: str = ""  # "pro" / "dev" / "schnell" (transformer stages)
    dir: str = ""  # copy the finished model here (e.g. src/fluxion/models/tiny-pro); "" = keep it in the run only
    dtype: str = "bf16"  # floating tensors of the exported files
    defaults: dict = field(default_factory=dict)  # the manifest's generation defaults (VariantDefaults fields)
    layouts: list[str] = field(default_factory=lambda: ["peft"])  # LoRA stage: the adapter files to write


@dataclass
class TrainConfig:
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    ema: EMAConfig
    objective: VAEObjective | FlowObjective | GuidanceObjective | FewStepObjective | LoRAObjective
    log: LogConfig
    export: ExportConfig
    source: str = "<dict>"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    @property
    def is_vae(self) -> bool:
        return self.run.stage == "vae"

    def shift_schedule(self) -> ShiftSchedule:
        return ShiftSchedule(**self.model.shift_schedule)

    def model_params(self) -> FluxParams | AutoEncoderParams:
        presets, cls = (AUTOENCODER_PRESETS, AutoEncoderParams) if self.is_vae else (TRANSFORMER_PRESETS, FluxParams)
        base = dataclasses.asdict(presets[self.model.preset])
        return cls(**{**base, **self.model.params})


# -- parsing --------------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, source: str):
    """Check value against the annotation tp (int, float, str, bool, dict, list[...], unions) and return it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: key {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _parse_table(cls, table, where: str, source: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{where}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key {where}.{unknown[0]}; [{where}] takes {', '.join(known)}")
    missing = [name for name, f in known.items() if name not in table
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing key {where}.{missing[0]} (required in [{where}])")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}", source) for k, v in table.items()})


def _require(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: key {key} {message}")


def _validate(cfg: TrainConfig) -> None:
    s, r = cfg.source, cfg.run
    _require(r.stage in STAGES, s, "run.stage", f"must be one of {STAGES}, got {r.stage!r}")
    _require(r.steps >= 1, s, "run.steps", f"must be >= 1, got {r.steps}")
    _require(r.batch_size >= 1, s, "run.batch_size", f"must be >= 1, got {r.batch_size}")
    _require(r.precision in PRECISIONS, s, "run.precision", f"must be one of {PRECISIONS}, got {r.precision!r}")
    _require(cfg.data.num_images >= 1, s, "data.num_images", f"must be >= 1, got {cfg.data.num_images}")
    for i, b in enumerate(cfg.data.buckets):
        _require(len(b) == 2 and all(v > 0 and v % 16 == 0 for v in b), s, f"data.buckets[{i}]",
                 f"must be [height, width], multiples of 16, got {b}")
    _require(len(cfg.data.buckets) >= 1, s, "data.buckets", "must list at least one bucket")
    _require(cfg.data.layout in LAYOUTS, s, "data.layout", f"must be one of {LAYOUTS}, got {cfg.data.layout!r}")
    _require(not cfg.data.balance_order or cfg.data.layout == "halves", s, "data.balance_order",
             f"needs data.layout = 'halves' (captions in reading order), got {cfg.data.layout!r}")
    for i, shape in enumerate(cfg.data.shapes):
        _require(shape in ALL_SHAPES, s, f"data.shapes[{i}]", f"must be one of {ALL_SHAPES}, got {shape!r}")
    _require(bool(cfg.data.shapes), s, "data.shapes", "must list at least one shape")
    held = sorted(set(cfg.data.shapes) & HELD_OUT_SHAPES - {cfg.data.teach})
    _require(not held, s, "data.shapes", f"lists held-out shapes {held}; only data.teach may bring one in")
    _require(0 <= cfg.data.teach_images <= cfg.data.num_images and (cfg.data.teach or not cfg.data.teach_images), s,
             "data.teach_images", f"must be in 0..data.num_images and needs data.teach, got {cfg.data.teach_images}")
    _require(not cfg.data.teach or cfg.data.teach in cfg.data.shapes, s, "data.teach",
             f"must be one of data.shapes {cfg.data.shapes}, got {cfg.data.teach!r}")
    try:
        cfg.shift_schedule()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{s}: model.shift_schedule: {e} (fields: base_seq_len, max_seq_len, base_shift, "
                          f"max_shift)") from None
    _require(cfg.data.captions in CAPTION_MODES, s, "data.captions",
             f"must be one of {CAPTION_MODES}, got {cfg.data.captions!r}")
    _require(1 <= cfg.data.captions_per_image <= 16, s, "data.captions_per_image",
             f"must be in [1, 16], got {cfg.data.captions_per_image}")
    _require(0.0 <= cfg.data.p_relation <= 1.0, s, "data.p_relation", f"must be in [0, 1], got {cfg.data.p_relation}")
    _require(3 <= cfg.data.text_length <= 512, s, "data.text_length",
             f"must be in [3, 512] ([CLS], a token, [SEP]; MiniLM's 512 positions), got {cfg.data.text_length}")

    presets, cls = (AUTOENCODER_PRESETS, AutoEncoderParams) if cfg.is_vae else (TRANSFORMER_PRESETS, FluxParams)
    _require(cfg.model.preset in presets, s, "model.preset",
             f"must be one of {sorted(presets)} for stage {r.stage!r}, got {cfg.model.preset!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in cfg.model.params:
        _require(k in fields, s, f"model.params.{k}", f"is not a {cls.__name__} field ({', '.join(sorted(fields))})")
    try:
        cfg.model_params()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{s}: [model.params] gives invalid {cls.__name__}: {e}") from e
    if not cfg.is_vae:
        _require(bool(cfg.model.autoencoder), s, "model.autoencoder",
                 f"is required for stage {r.stage!r} (the trained VAE's ae.safetensors)")
        _require(cfg.export.variant in VARIANTS, s, "export.variant",
                 f"must be one of {sorted(VARIANTS)} for stage {r.stage!r}, got {cfg.export.variant!r}")
    allowed = {f.name for f in dataclasses.fields(VariantDefaults)}
    for k in cfg.export.defaults:
        _require(k in allowed, s, f"export.defaults.{k}", f"is not a generation default ({', '.join(sorted(allowed))})")
    _require(cfg.export.dtype in EXPORT_DTYPES, s, "export.dtype", f"must be one of {EXPORT_DTYPES}")
    for i, layout in enumerate(cfg.export.layouts):
        _require(layout in LORA_LAYOUTS, s, f"export.layouts[{i}]", f"must be one of {LORA_LAYOUTS}, got {layout!r}")

    o = cfg.optim
    _require(o.lr > 0, s, "optim.lr", f"must be > 0, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), s, "optim.betas", "must be two values in [0, 1)")
    _require(o.schedule in LR_SCHEDULES, s, "optim.schedule", f"must be one of {LR_SCHEDULES}, got {o.schedule!r}")
    _require(0 <= cfg.ema.decay < 1, s, "ema.decay", f"must be in [0, 1), got {cfg.ema.decay}")
    for k in ("log_every", "plot_every", "checkpoint_every"):
        _require(getattr(cfg.log, k) >= 1, s, f"log.{k}", f"must be >= 1, got {getattr(cfg.log, k)}")
    _require(cfg.log.sample_size % 16 == 0, s, "log.sample_size",
             f"must be a multiple of 16, got {cfg.log.sample_size}")

    obj = cfg.objective
    if isinstance(obj, LoRAObjective):
        _require(obj.rank >= 1, s, "objective.rank", f"must be >= 1, got {obj.rank}")
        _require(obj.alpha > 0, s, "objective.alpha", f"must be > 0, got {obj.alpha}")
        _require(bool(obj.targets), s, "objective.targets",
                 f"must list module groups ({', '.join(LORA_TARGET_GROUPS)}) or glob patterns of module paths")
        _require(bool(cfg.model.init_from), s, "model.init_from", "is required for stage 'lora' (the base model)")
        _require(obj.prior_target in ("data", "base"), s, "objective.prior_target",
                 f"must be 'data' or 'base', got {obj.prior_target!r}")
        lo_hi = obj.prior_guidance
        _require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], s, "objective.prior_guidance",
                 f"must be [low, high] with 0 < low <= high, got {lo_hi}")
    if isinstance(obj, (FlowObjective, GuidanceObjective, LoRAObjective)):
        _require(0 <= obj.caption_dropout <= 1, s, "objective.caption_dropout", "must be in [0, 1]")
        _require(obj.t_std > 0, s, "objective.t_std", f"must be > 0, got {obj.t_std}")
    if isinstance(obj, FlowObjective):
        _require(0 <= obj.text_mixup < 1, s, "objective.text_mixup", f"must be in [0, 1), got {obj.text_mixup}")
    if isinstance(obj, GuidanceObjective):
        _require(0 < obj.guidance_min <= obj.guidance_max, s, "objective.guidance_min",
                 f"must be in (0, guidance_max], got {obj.guidance_min} > {obj.guidance_max}")
        _require(cfg.model_params().guidance_embed, s, "model.params.guidance_embed",
                 "must be true for guidance distillation (the student takes the guidance scale as input)")
    if isinstance(obj, FewStepObjective):
        _require(obj.teacher_substeps >= 1, s, "objective.teacher_substeps", "must be >= 1")
        _require(bool(obj.student_steps) and all(n >= 1 for n in obj.student_steps), s, "objective.student_steps",
                 f"must list step counts >= 1, got {obj.student_steps}")
        _require(0 <= obj.student_rollout <= 1, s, "objective.student_rollout",
                 f"must be in [0, 1], got {obj.student_rollout}")
        n = sum(obj.student_steps)
        _require(not obj.segment_weights or (len(obj.segment_weights) == n and min(obj.segment_weights) >= 0
                                             and sum(obj.segment_weights) > 0), s, "objective.segment_weights",
                 f"must list one weight >= 0 per student step ({n} for student_steps {obj.student_steps}), not all "
                 f"0, got {obj.segment_weights}")


def parse_config(data: dict, source: str = "<dict>") -> TrainConfig:
    """A TrainConfig from the TOML document `data` (as tomllib returns it); `source` names it in errors."""
    sections = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "ema": EMAConfig,
                "objective": None, "log": LogConfig, "export": ExportConfig}
    if "stages" in data:
        raise ConfigError(f"{source}: holds [[stages]], several runs: read it with parse_stages / load_stages")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section [{unknown[0]}]; sections are {', '.join(sections)}")
    for required in ("run", "model"):
        if required not in data:
            raise ConfigError(f"{source}: missing section [{required}]")
    run = _parse_table(RunConfig, data["run"], "run", source)
    if run.stage not in STAGES:
        raise ConfigError(f"{source}: key run.stage must be one of {STAGES}, got {run.stage!r}")
    parsed = {name: _parse_table(cls, data.get(name, {}), name, source)
              for name, cls in sections.items() if cls is not None and name != "run"}
    objective = _parse_table(OBJECTIVES[run.stage], data.get("objective", {}), "objective", source)
    cfg = TrainConfig(run=run, objective=objective, source=source, **parsed)
    _validate(cfg)
    return cfg


def _merge(shared: dict, stage: dict) -> dict:
    """stage's keys over shared's; a table both hold merges key by key, so a stage changing one key keeps the rest."""
    out = dict(shared)
    for k, v in stage.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_stages(data: dict, source: str = "<dict>") -> list[TrainConfig]:
    """The runs a recipe holds, in order. With [[stages]], each stage (a partial recipe) is merged over the top-level
    tables (what the stages share) and parsed as a recipe of its own, named "<source>#<run.name>" in errors and in
    its model's manifest; every stage names itself (run.name) and writes to a run.out_dir of its own. Without
    [[stages]], the recipe is its one run."""
    if "stages" not in data:
        return [parse_config(data, source)]
    stages = data["stages"]
    if not (isinstance(stages, list) and stages and all(isinstance(t, dict) for t in stages)):
        raise ConfigError(f"{source}: stages must be an array of tables ([[stages]]), each a partial recipe")
    shared = {k: v for k, v in data.items() if k != "stages"}
    configs: list[TrainConfig] = []
    for i, stage in enumerate(stages):
        own = stage.get("run", {})
        name = own.get("name") if isinstance(own, dict) else None
        # a name from the shared tables would be every stage's: each stage must give its own
        _require(isinstance(name, str) and bool(name), source, f"stages[{i}].run.name",
                 "is required: each stage names its own run")
        _require("stages" not in stage, source, f"stages[{i}].stages", "is not allowed: stages do not nest")
        cfg = parse_config(copy.deepcopy(_merge(shared, stage)), f"{source}#{name}")  # no tables shared
        for j, other in enumerate(configs):
            _require(other.run.name != name, source, f"stages[{i}].run.name", f"{name!r} is also stages[{j}]'s")
            _require(Path(other.run.out_dir) != Path(cfg.run.out_dir), source, f"stages[{i}].run.out_dir",
                     f"{cfg.run.out_dir!r} is also stages[{j}]'s: each stage needs a run folder of its own")
        configs.append(cfg)
    return configs


def read_recipe(path: str | Path) -> dict:
    """A recipe's TOML document, as tomllib reads it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a one-run training recipe (TOML). Relative paths inside it are relative to the working
    directory. A recipe with [[stages]] is refused: load_stages reads it."""
    data = read_recipe(path)
    if "stages" in data:
        raise ConfigError(f"{path} holds [[stages]], several runs: read it with load_stages(); `fluxion train "
                          f"{path}` runs them in order, --stage NAME one of them")
    return parse_config(data, str(path))


def load_stages(path: str | Path) -> list[TrainConfig]:
    """Every run of a recipe in order: its [[stages]] (parse_stages), or the one run of a recipe without them."""
    return parse_stages(read_recipe(path), str(path))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # 1e-05, inf, nan: TOML spells floats as Python prints them
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {type(v).__name__} {v!r}")


def toml_text(tables: dict, header: str = "") -> str:
    """A recipe's TOML from {section: table}; a list of tables is an array of tables ([[stages]])."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, value in tables.items():
        for table in value if isinstance(value, list) else [value]:
            lines += ["", f"[[{name}]]" if isinstance(value, list) else f"[{name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"
