"""LoRA adapters applied to a model from outside: forward hooks add each active adapter's update (lora.updates),
so several adapters stack, each with its own scale, switchable per call with no reload; fuse/unfuse merge them
into the weights and restore the base weights exactly; unload removes every trace, replaced parameters included."""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import InputError
from .updates import LowRank, Update


@dataclass
class Adapter:
    """One LoRA file (or trained adapter) in our module layout."""

    name: str
    updates: dict[str, Update]  # module path in the Flux model -> its update
    source: str = ""
    format: str = ""
    # BFL control LoRAs: parameters the file replaces while it is loaded (norm scales), whatever the scale
    replacements: dict[str, Tensor] = field(default_factory=dict)
    # BFL control LoRAs: Linear path -> the in_features its update needs (img_in then also reads the control image)
    widen: dict[str, int] = field(default_factory=dict)
    # "clip_l" / "t5" -> module name in the file (HF dotted, or kohya's "_") -> update; see apply_text_encoder_lora
    text_encoders: dict[str, dict[str, Update]] = field(default_factory=dict)


@dataclass
class LoRAState:
    """What a model carries while adapters are loaded (transformer._fluxion_lora)."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # active adapters and their user scales
    hooks: dict[str, object] = field(default_factory=dict)  # module path -> hook handle
    fused: dict[str, Tensor] = field(default_factory=dict)  # module path -> base weight kept for unfuse
    fused_bias: dict[str, Tensor | None] = field(default_factory=dict)  # module path -> base bias (None: had none)
    fused_scales: dict[str, float] = field(default_factory=dict)
    replaced: dict[str, nn.Parameter] = field(default_factory=dict)  # parameter path -> the model's own, for unload
    widened: dict[str, nn.Parameter] = field(default_factory=dict)  # Linear path -> its own narrower weight


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


def _parameter(model: nn.Module, path: str) -> nn.Parameter:
    param = dict(model.named_parameters()).get(path)
    if param is None:
        raise InputError(f"LoRA replacement {path!r} is not a parameter of this {type(model).__name__}")
    return param


def _check(model: nn.Module, adapter: Adapter) -> None:
    """Every shape must fit before anything is changed, so a failed add leaves the model as it was."""
    for path, update in adapter.updates.items():
        linear = _linear(model, path)
        in_features = max(linear.in_features, adapter.widen.get(path, 0))
        out, inp = update.shape
        if isinstance(update, LowRank) and update.up.shape[1] != update.down.shape[0]:
            raise InputError(f"adapter {adapter.name!r}: the update for {path} has up {tuple(update.up.shape)} and "
                             f"down {tuple(update.down.shape)}, whose ranks differ")
        if out != linear.out_features or inp not in (None, in_features):
            rank = f" (rank {update.rank})" if isinstance(getattr(update, "rank", None), int) else ""
            raise InputError(f"adapter {adapter.name!r}: the update for {path} is {out}x{inp}{rank}, but the "
                             f"layer's weight is {linear.out_features}x{in_features}")
    for path, tensor in adapter.replacements.items():
        param = _parameter(model, path)
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(f"adapter {adapter.name!r}: the replacement for {path} has shape {tuple(tensor.shape)}, "
                             f"but the parameter's is {tuple(param.shape)}")


def add_adapter(model: nn.Module, adapter: Adapter, scale: float = 1.0) -> str:
    """Attach an adapter (unfused, active at `scale`); its name must be new. Its replacements and widened inputs
    take effect now and last until unload_adapters."""
    state = _state(model)
    if adapter.name in state.adapters:
        raise InputError(f"an adapter named {adapter.name!r} is already loaded; unload it or pick another name")
    if state.fused and (adapter.replacements or adapter.widen):
        raise InputError(f"adapter {adapter.name!r} replaces weights: unfuse the loaded adapters first")
    _check(model, adapter)
    for path, width in adapter.widen.items():
        _widen(model, state, path, width)
    for path, tensor in adapter.replacements.items():
        _replace(model, state, path, tensor)
    for path, update in adapter.updates.items():
        linear = _linear(model, path)
        update.to(linear.weight.device, linear.weight.dtype)
        if path not in state.hooks:
            state.hooks[path] = linear.register_forward_hook(_hook(state, path))
    state.adapters[adapter.name] = adapter
    state.scales[adapter.name] = float(scale)
    return adapter.name


@torch.no_grad()
def _widen(model: nn.Module, state: LoRAState, path: str, width: int) -> None:
    """Zero input columns appended to a Linear (as BFL's optionally_expand_state_dict): the base model ignores the
    new inputs; the adapter's update reads them."""
    linear = _linear(model, path)
    if linear.in_features >= width:
        return
    own = linear.weight
    wide = own.new_zeros(own.shape[0], width)
    wide[:, : own.shape[1]] = own
    state.widened.setdefault(path, own)
    linear.weight = nn.Parameter(wide, requires_grad=own.requires_grad)
    linear.in_features = width


def _replace(model: nn.Module, state: LoRAState, path: str, tensor: Tensor) -> None:
    owner, _, attr = path.rpartition(".")
    module = model.get_submodule(owner)
    own = getattr(module, attr)
    state.replaced.setdefault(path, own)
    setattr(module, attr, nn.Parameter(tensor.detach().to(own.device, own.dtype), requires_grad=False))


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
                state.fused_bias[path] = None if linear.bias is None else linear.bias.detach().clone()
            weight, bias = update.weight(), update.bias_delta()
            if weight is not None:
                linear.weight.copy_((linear.weight.float() + scale * weight).to(linear.weight.dtype))
            if bias is not None:
                if linear.bias is None:  # removed again by unfuse
                    linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features), requires_grad=False)
                linear.bias.copy_((linear.bias.float() + scale * bias).to(linear.bias.dtype))
    state.fused_scales = dict(state.scales)


@torch.no_grad()
def unfuse_adapters(model: nn.Module) -> None:
    """Restore the base weights bit for bit; the adapters return to running unfused."""
    state = _state(model)
    for path, weight in state.fused.items():
        linear = _linear(model, path)
        linear.weight.copy_(weight)
        bias = state.fused_bias.get(path)
        if bias is None:
            linear.bias = None
        else:
            linear.bias.copy_(bias)
    state.fused, state.fused_bias, state.fused_scales = {}, {}, {}


def unload_adapters(model: nn.Module) -> None:
    """Remove every adapter, hook and kept weight: the model is the base model again, its own parameters back."""
    if not hasattr(model, "_fluxion_lora"):
        return
    state = model._fluxion_lora
    unfuse_adapters(model)
    for handle in state.hooks.values():
        handle.remove()
    for path, own in state.replaced.items():
        owner, _, attr = path.rpartition(".")
        setattr(model.get_submodule(owner), attr, own)
    for path, own in state.widened.items():
        linear = _linear(model, path)
        linear.weight, linear.in_features = own, own.shape[1]
    del model._fluxion_lora


def loaded_adapters(model: nn.Module) -> dict[str, float]:
    """Loaded adapters and their scales (0 for inactive ones)."""
    state = getattr(model, "_fluxion_lora", None)
    return {} if state is None else {name: state.scales.get(name, 0.0) for name in state.adapters}
