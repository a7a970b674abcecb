"""Resumable training state in one safetensors file, written atomically: model, EMA, optimizer, RNG states, the
step and the data position. One file, so a run killed at any moment leaves either the old state or the new one."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import load_state_dict, read_checkpoint_info, save_state_dict
from ..errors import CheckpointError
from .ema import EMA

CHECKPOINT = "checkpoint.safetensors"
STATE_KEY = "fluxion.training"


@dataclass
class TrainingState:
    step: int
    data: dict  # BatchStream.state()
    config: dict  # the TrainConfig that wrote it (to warn about changes on resume)


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous()


def save_checkpoint(path: Path, *, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, step: int, data: dict, config: dict) -> Path:
    tensors = {f"model.{k}": _cpu(v) for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": _cpu(v) for k, v in ema.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}  # non-tensor per-parameter optimizer state, if any
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = _cpu(value)
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.training"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    state = {"step": step, "data": data, "ema_updates": ema.updates, "param_groups": opt["param_groups"],
             "optim_scalars": scalars, "config": config}
    return save_state_dict(tensors, path, metadata={STATE_KEY: json.dumps(state)})


def _section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(path: Path, *, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> TrainingState:
    """Restore everything save_checkpoint wrote into the given (freshly built) objects."""
    raw = read_checkpoint_info(path).metadata.get(STATE_KEY)
    if raw is None:
        raise CheckpointError(f"{path} is not a fluxion training checkpoint (no {STATE_KEY!r} metadata)")
    state = json.loads(raw)
    tensors = load_state_dict(path)
    try:
        model.load_state_dict(_section(tensors, "model."))
        ema.load_state_dict(_section(tensors, "ema."), state["ema_updates"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} holds a different model than the config builds: {e}") from e
    per_param: dict[int, dict] = {}
    for key, value in _section(tensors, "optim.").items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for index, entries in state["optim_scalars"].items():
        per_param.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    generator.set_state(tensors["rng.training"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = _section(tensors, "rng.cuda.")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([cuda[str(i)] for i in range(len(cuda))])
    return TrainingState(step=int(state["step"]), data=state["data"], config=state["config"])
