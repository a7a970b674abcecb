"""The training loop, one straight line for every stage: config -> data -> model -> optimizer -> loop -> checkpoint
-> finished model folder (and its export)."""

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..errors import FluxionError
from ..files import atomic_folder, atomic_write
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .config import ConfigError, OptimConfig, TrainConfig, load_config, parse_stages, read_recipe, toml_text
from .ema import EMA
from .export import copy_file, export_run
from .plots import loss_curve, save_image
from .stages import STAGES

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # the finished model inside the run folder (full precision; loadable by Pipeline)
METRICS = "metrics.jsonl"


class TrainingDiverged(FluxionError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the last checkpoint on disk is the last good state."""


def learning_rate(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to min_lr_ratio * lr at the last step."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total_steps - 1 - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class MetricsLog:
    """metrics.jsonl, one row per log interval. On resume, rows after the checkpoint's step are dropped: a killed
    run wrote them after the state it resumes from."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        self.rows: list[dict] = []
        if keep_until > 0 and path.is_file():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= keep_until]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in self.rows)))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Window:
    """Means of the loss (and its parts) and the throughput since the last metrics row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count, self.start = 0, time.perf_counter()

    def add(self, loss: float, parts: dict) -> None:
        for k, v in {"loss": loss, **{k: float(v.detach()) for k, v in parts.items()}}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def row(self, step: int, batch_size: int, **extra) -> dict:
        elapsed = time.perf_counter() - self.start
        row = {"step": step, **{k: v / self.count for k, v in self.sums.items()}, **extra,
               "steps_per_s": self.count / elapsed, "samples_per_s": self.count * batch_size / elapsed}
        self.reset()
        return row


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _warn_changes(saved: dict, current: dict, source: str) -> None:
    old, new = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(("log.", "export.")))
    if changed:
        log.warning("%s differs from the config the checkpoint was written with, in: %s", source, ", ".join(changed))


def _diverged(what: str, value: float, step: int, checkpoint: Path) -> TrainingDiverged:
    kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else "no checkpoint was written yet"
    return TrainingDiverged(f"{what} is {value} at step {step}; training stopped without saving, {kept}. "
                            "Lower optim.lr or tighten optim.grad_clip, then run again to resume from it")


def run(config: str | Path | TrainConfig, *, resume: bool = True, max_steps: int | None = None,
        out_dir: str | Path | None = None) -> Path:
    """Train the run a one-run recipe (its path) or a stage (a config from load_stages) describes, resuming from its
    checkpoint when there is one; stop after `max_steps` (total, not additional) if given. Returns the run folder; a
    finished run holds the model in run/model/ and, with [export] dir, a copy there. `out_dir` replaces the
    recipe's run.out_dir and skips its export.dir."""
    cfg: TrainConfig = copy.deepcopy(config) if isinstance(config, TrainConfig) else load_config(config)
    if out_dir is not None:  # the run and its result go there; the recipe's export.dir (a shipped copy) is left alone
        cfg.run.out_dir, cfg.export.dir = str(out_dir), ""
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(config, TrainConfig):  # a stage: its merged tables, a one-run recipe load_config reads back
        text = toml_text(cfg.to_dict(), f"{cfg.source}, its tables merged with the recipe's shared ones")
        atomic_write(out / "config.toml", lambda tmp: Path(tmp).write_text(text))
    else:
        copy_file(Path(config), out / "config.toml")
    device = resolve_device(cfg.run.device)
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")

    # data, model and the frozen parts (VAE, text encoder, teacher) of this stage
    torch.manual_seed(cfg.run.seed)
    stage = STAGES[cfg.run.stage](cfg, device)
    model = stage.model.to(device).train()
    ema = EMA(model, cfg.ema.decay)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    generator = torch.Generator().manual_seed(cfg.run.seed)  # every random draw of training comes from it
    log.info("%s: %s stage, %.2fM parameters, %s%s", cfg.run.name, cfg.run.stage,
             sum(p.numel() for p in model.parameters()) / 1e6, device, " (bf16 autocast)" if bf16 else "")

    step = 0
    checkpoint = out / CHECKPOINT
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, model=model, ema=ema, optimizer=optimizer, generator=generator)
        stage.batches.load_state(state.data)
        step = state.step
        _warn_changes(state.config, cfg.to_dict(), cfg.source)
        log.info("resumed from %s at step %d", checkpoint, step)
    metrics = MetricsLog(out / METRICS, keep_until=step)
    end = cfg.run.steps if max_steps is None else min(max_steps, cfg.run.steps)

    def save() -> None:
        save_checkpoint(checkpoint, model=model, ema=ema, optimizer=optimizer, generator=generator, step=step,
                        data=stage.batches.state(), config=cfg.to_dict())

    bar = tqdm(total=cfg.run.steps, initial=step, desc=cfg.run.name, unit="step", disable=not cfg.log.progress,
               dynamic_ncols=True)
    window = Window()
    try:
        while step < end:
            batch = stage.next_batch()
            lr = learning_rate(step, o, cfg.run.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, parts = stage.loss(model, batch, generator)
            value = loss.item()
            if not math.isfinite(value):
                raise _diverged("the loss", value, step + 1, checkpoint)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or math.inf).item()
            if not math.isfinite(grad_norm):
                raise _diverged("the gradient norm", grad_norm, step + 1, checkpoint)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            step += 1

            bar.update(1)
            window.add(value, parts)
            if step % cfg.log.log_every == 0 or step == end:
                row = window.row(step, cfg.run.batch_size, lr=lr, grad_norm=grad_norm)
                metrics.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
            if step % cfg.log.checkpoint_every == 0 or step == end:
                save()
            if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                with torch.random.fork_rng(devices=[]):  # sampling must not move the training's random streams
                    save_image(stage.sample_grid(ema.model), out / "samples" / f"step-{step:07d}.png")
            if step % cfg.log.plot_every == 0 or step == end:
                loss_curve(metrics.rows, out / "loss.png", title=f"{cfg.run.name} ({cfg.run.stage})")
    finally:
        bar.close()

    if step < cfg.run.steps:
        log.info("stopped at step %d of %d; run the same config again to resume", step, cfg.run.steps)
        return out

    def build(folder: Path) -> None:
        stage.finish(ema.model, folder)
        if cfg.export.dir:
            export_run(cfg, folder, Path(cfg.export.dir))

    # model/ appears whole, after its export: its presence is what marks a run finished (run_recipe skips it)
    log.info("finished: model in %s", atomic_folder(out / MODEL_DIR, build))
    return out


def run_recipe(path: str | Path, *, stage: str | None = None, resume: bool = True, max_steps: int | None = None,
               out_dir: str | Path | None = None) -> list[Path]:
    """Train what a recipe describes (`fluxion train`): a one-run recipe as run() does, or a recipe's [[stages]] in
    order, only the one named `stage` if given, each stopped after `max_steps` if given. With `resume`, a stage whose
    model folder is there finished earlier and is skipped, so running the recipe again goes on where it stopped; a
    stage stopped short ends the call, as the stages after it start from its model. Returns the run folders."""
    data = read_recipe(path)
    if "stages" not in data:
        if stage is not None:
            raise ConfigError(f"{path} holds no [[stages]]: stage (--stage) picks one of a multi-stage recipe's")
        return [run(path, resume=resume, max_steps=max_steps, out_dir=out_dir)]
    if out_dir is not None:
        raise ConfigError(f"{path} holds [[stages]], each with its own run.out_dir: out_dir (--out-dir) is for "
                          "one-run recipes")
    configs = parse_stages(data, str(path))
    if stage is not None:
        names = [c.run.name for c in configs]
        if stage not in names:
            raise ConfigError(f"{path}: no stage named {stage!r}; its stages are {', '.join(names)}")
        configs = [configs[names.index(stage)]]
    folders = []
    for cfg in configs:
        folder = Path(cfg.run.out_dir)
        if resume and (folder / MODEL_DIR).is_dir():
            log.info("%s: finished earlier (%s), skipped", cfg.source, folder / MODEL_DIR)
        else:
            run(cfg, resume=resume, max_steps=max_steps)
        folders.append(folder)
        if not (folder / MODEL_DIR).is_dir():
            log.info("%s stopped before its last step: the stages after it wait for its model", cfg.source)
            break
    return folders


def export(config_path: str | Path, dest: str | Path | None = None) -> Path:
    """Copy a finished run's model (cast to export.dtype) to `dest`, by default the recipe's export.dir."""
    cfg = load_config(config_path)
    target = dest or cfg.export.dir
    if not target:
        raise ConfigError(f"{cfg.source}: no export destination: pass `dest` or set export.dir")
    return export_run(cfg, Path(cfg.run.out_dir) / MODEL_DIR, Path(target))
