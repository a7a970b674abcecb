"""LoRA adapters applied to a Flux model from outside: forward hooks add each active adapter's low-rank update,
so several adapters stack, each with its own scale, switchable per call with no reload; fuse/unfuse merge them
into the weights and restore the base weights exactly; unload removes every trace."""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import InputError


@dataclass
class LowRank:
    """The update scale * up @ down of one Linear, in our (BFL) layout: down (R, in), up (out, R)."""

    down: Tensor
    up: Tensor
    scale: float = 1.0  # alpha / rank, from the file

    def delta(self, x: Tensor) -> Tensor:
        return (x.to(self.down.dtype) @ self.down.T) @ (self.scale * self.up).T

    def weight(self) -> Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class Adapter:
    name: str
    updates: dict[str, LowRank]  # module path in the Flux model -> its update
    source: str = ""


@dataclass
class LoRAState:
    """What a model carries while adapters are loaded (transformer._fluxion_lora)."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # active adapters and their user scales
    hooks: dict[str, object] = field(default_factory=dict)  # module path -> hook handle
    fused: dict[str, Tensor] = field(default_factory=dict)  # module path -> base weight kept for unfuse
    fused_scales: dict[str, float] = field(default_factory=dict)


def _state(model: nn.Module) -> LoRAState:
    if not hasattr(model, "_fluxion_lora"):
        model._fluxion_lora = LoRAState()
    return model._fluxion_lora


def _linear(model: nn.Module, path: str) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise InputError(f"LoRA target {path!r} is not a module of this {type(model).__name__}") from None
    if not isinstance(module, nn.Linear):
        raise InputError(f"LoRA target {path!r} is a {type(module).__name__}, not a Linear layer")
    return module


def add_adapter(model: nn.Module, adapter: Adapter, scale: float = 1.0) -> str:
    """Attach an adapter (unfused, active at `scale`); its name must be new."""
    state = _state(model)
    if adapter.name in state.adapters:
        raise InputError(f"an adapter named {adapter.name!r} is already loaded; unload it or pick another name")
    for path, update in adapter.updates.items():
        linear = _linear(model, path)
        expected = (linear.out_features, linear.in_features)
        got = (update.up.shape[0], update.down.shape[1])
        if got != expected or update.up.shape[1] != update.down.shape[0]:
            raise InputError(f"adapter {adapter.name!r}: the update for {path} is {got[0]}x{got[1]} (rank "
                             f"{update.down.shape[0]}), but the layer's weight is {expected[0]}x{expected[1]}")
    weight = next(model.parameters())
    for path, update in adapter.updates.items():
        update.down = update.down.to(weight.device, weight.dtype)
        update.up = update.up.to(weight.device, weight.dtype)
        if path not in state.hooks:
            state.hooks[path] = _linear(model, path).register_forward_hook(_hook(state, path))
    state.adapters[adapter.name] = adapter
    state.scales[adapter.name] = float(scale)
    return adapter.name


def _hook(state: LoRAState, path: str):
    def add_updates(module, inputs, output):
        for name, scale in state.scales.items():
            update = state.adapters[name].updates.get(path)
            if update is not None and scale != 0.0 and state.fused_scales.get(name) is None:
                output = output + scale * update.delta(inputs[0]).to(output.dtype)
        return output

    return add_updates


def set_adapters(model: nn.Module, scales: dict[str, float]) -> None:
    """Make exactly these adapters active, at these scales (others stay loaded, inactive)."""
    state = _state(model)
    unknown = sorted(set(scales) - set(state.adapters))
    if unknown:
        raise InputError(f"no adapter named {unknown}; loaded: {sorted(state.adapters) or 'none'}")
    if state.fused:
        raise InputError("adapters are fused into the weights: unfuse them before changing the active set")
    state.scales = {name: float(s) for name, s in scales.items()}


@torch.no_grad()
def fuse_adapters(model: nn.Module) -> None:
    """Merge the active adapters into the weights (a plain model's speed); the base weights are kept to restore."""
    state = _state(model)
    if state.fused:
        raise InputError("adapters are already fused; unfuse first")
    for name, scale in state.scales.items():
        for path, update in state.adapters[name].updates.items():
            linear = _linear(model, path)
            if path not in state.fused:
                state.fused[path] = linear.weight.detach().clone()
            linear.weight.copy_((linear.weight.float() + scale * update.weight()).to(linear.weight.dtype))
    state.fused_scales = dict(state.scales)


@torch.no_grad()
def unfuse_adapters(model: nn.Module) -> None:
    """Restore the base weights bit for bit; the adapters return to running unfused."""
    state = _state(model)
    for path, weight in state.fused.items():
        _linear(model, path).weight.copy_(weight)
    state.fused, state.fused_scales = {}, {}


def unload_adapters(model: nn.Module) -> None:
    """Remove every adapter, hook and kept weight: the model is the base model again."""
    if not hasattr(model, "_fluxion_lora"):
        return
    unfuse_adapters(model)
    for handle in model._fluxion_lora.hooks.values():
        handle.remove()
    del model._fluxion_lora


def loaded_adapters(model: nn.Module) -> dict[str, float]:
    """Loaded adapters and their scales (0 for inactive ones)."""
    state = getattr(model, "_fluxion_lora", None)
    return {} if state is None else {name: state.scales.get(name, 0.0) for name in state.adapters}
