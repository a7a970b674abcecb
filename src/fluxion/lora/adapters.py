"""LoRA adapters applied to a model from outside: forward hooks add each active adapter's update (lora.updates),
so several adapters stack, each with its own scale, switchable per call with no reload; fuse/unfuse merge them
into the weights and restore the base weights exactly; unload removes every trace, replaced parameters included.

Hot-swap mode (`enable_hotswap`), for compiled models: the forward hooks above loop over Python dicts of adapters and
scales, which torch.compile guards on, so loading, switching or scaling an adapter recompiles. In hot-swap mode each
target Linear instead holds fixed, zero-padded low-rank slots (buffers: down (R, in), up (out, R) and one scale per
rank column) that one fixed hook reads; adding, switching, scaling, fusing and deleting adapters copy into the slots
in place, so compiled code sees new values, never new code. Adapters must then be low rank, fit the slots' rank R
(the active adapters of a Linear together) and target only the slot Linears: anything else is refused with an
InputError rather than silently recompiled."""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..offload import evict
from .updates import LowRank, Update, as_low_rank


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
    hotswap: "Hotswap | None" = None


@dataclass
class Hotswap:
    """The fixed slots of hot-swap mode (see the module docstring)."""

    rank: int
    hooks: dict[str, object]  # Linear path -> the slot hook's handle
    low_rank: dict[str, dict[str, LowRank]] = field(default_factory=dict)  # adapter -> path -> its update as LowRank


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
    if state.hotswap is not None:
        low_rank = _hotswap_updates(state.hotswap, adapter)
        _plan(state, {**state.scales, adapter.name: float(scale)}, {adapter.name: low_rank})
    evict(model)  # offloaded: change the weights at home, on the CPU
    for path, width in adapter.widen.items():
        _widen(model, state, path, width)
    for path, tensor in adapter.replacements.items():
        _replace(model, state, path, tensor)
    for path, update in adapter.updates.items():
        linear = _linear(model, path)
        update.to(linear.weight.device, linear.weight.dtype)
        linear._fluxion_offload_extra = _travelling(state, path)
        if path not in state.hooks and state.hotswap is None:
            state.hooks[path] = linear.register_forward_hook(_hook(state, path))
    state.adapters[adapter.name] = adapter
    state.scales[adapter.name] = float(scale)
    if state.hotswap is not None:
        state.hotswap.low_rank[adapter.name] = low_rank
        _pack(model, state)
    return adapter.name


def _update_tensors(holder):
    """(holder, attribute, tensor) of every tensor of an update (row blocks: of their parts)."""
    for name, value in vars(holder).items():
        if isinstance(value, Tensor):
            yield holder, name, value
        elif name == "blocks":
            for _, _, part in value:
                yield from _update_tensors(part)


def _travelling(state: LoRAState, path: str):
    """What fluxion.offload moves with the Linear at `path`: its adapters' tensors, which the plain hooks read
    (hot-swap mode reads the slots, which are buffers and move anyway)."""
    def tensors():
        if state.hotswap is None:
            for adapter in state.adapters.values():
                if path in adapter.updates:
                    yield from _update_tensors(adapter.updates[path])
    return tensors


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
    scales = {name: float(s) for name, s in scales.items()}
    if state.hotswap is not None:
        _plan(state, scales)
    state.scales = scales
    if state.hotswap is not None:
        _pack(model, state)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove one loaded adapter (unfused; one that replaces or widens weights needs unload_adapters). In hot-swap
    mode this is how an adapter makes room for the next one without a recompile."""
    state = _state(model)
    adapter = state.adapters.get(name)
    if adapter is None:
        raise InputError(f"no adapter named {name!r}; loaded: {sorted(state.adapters) or 'none'}")
    if state.fused:
        raise InputError("adapters are fused into the weights: unfuse them before deleting one")
    if adapter.replacements or adapter.widen:
        raise InputError(f"adapter {name!r} replaces or widens weights: unload_adapters removes it")
    del state.adapters[name]
    state.scales.pop(name, None)
    if state.hotswap is not None:
        state.hotswap.low_rank.pop(name, None)
        _pack(model, state)


@torch.no_grad()
def fuse_adapters(model: nn.Module) -> None:
    """Merge the active adapters into the weights (a plain model's speed); the base weights are kept to restore."""
    state = _state(model)
    if state.fused:
        raise InputError("adapters are already fused; unfuse first")
    _refuse_if_frozen(model, "fuse adapters")
    quantized = sorted({path for name in state.scales for path in state.adapters[name].updates
                        if _linear(model, path).weight.numel() == 0 or hasattr(_linear(model, path), "qweight")})
    if quantized:  # fluxion.quant keeps an empty `weight` beside its quantized one: nothing to add the update to
        raise InputError(f"cannot fuse adapters into quantized layers ({', '.join(quantized[:3])}"
                         f"{' ...' if len(quantized) > 3 else ''}): keep them unfused (they run as hooks)")
    evict(model)
    for name, scale in state.scales.items():
        for path, update in state.adapters[name].updates.items():
            linear = _linear(model, path)
            if path not in state.fused:
                state.fused[path] = linear.weight.detach().clone()
                state.fused_bias[path] = None if linear.bias is None else linear.bias.detach().clone()
            weight, bias = update.weight(), update.bias_delta()
            weight = None if weight is None else weight.to(linear.weight.device)
            bias = None if bias is None else bias.to(linear.weight.device)
            if weight is not None:
                linear.weight.copy_((linear.weight.float() + scale * weight).to(linear.weight.dtype))
            if bias is not None:
                if linear.bias is None:  # removed again by unfuse
                    linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features), requires_grad=False)
                linear.bias.copy_((linear.bias.float() + scale * bias).to(linear.bias.dtype))
    state.fused_scales = dict(state.scales)
    if state.hotswap is not None:
        _pack(model, state)  # the slots empty: the weights carry the adapters now


@torch.no_grad()
def unfuse_adapters(model: nn.Module) -> None:
    """Restore the base weights bit for bit; the adapters return to running unfused."""
    state = _state(model)
    if state.fused:
        _refuse_if_frozen(model, "unfuse adapters")
        evict(model)
    for path, weight in state.fused.items():
        linear = _linear(model, path)
        linear.weight.copy_(weight)
        bias = state.fused_bias.get(path)
        if bias is None:
            linear.bias = None
        else:
            linear.bias.copy_(bias)
    state.fused, state.fused_bias, state.fused_scales = {}, {}, {}
    if state.hotswap is not None:
        _pack(model, state)


def unload_adapters(model: nn.Module) -> None:
    """Remove every adapter, hook and kept weight: the model is the base model again, its own parameters back."""
    if not hasattr(model, "_fluxion_lora"):
        return
    state = model._fluxion_lora
    unfuse_adapters(model)
    evict(model)
    if state.hotswap is not None:
        disable_hotswap(model)
    for handle in state.hooks.values():
        handle.remove()
    for path in {p for a in state.adapters.values() for p in a.updates}:
        _linear(model, path).__dict__.pop("_fluxion_offload_extra", None)
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


# -- hot-swap mode -----------------------------------------------------------------------------------------------
SLOT_DOWN, SLOT_UP, SLOT_SCALES = "_lora_slot_down", "_lora_slot_up", "_lora_slot_scales"


def _slot_hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
    """output + up (scales * (down x)): the active adapters' columns of the slots; zero columns add exact zeros."""
    down, up, scales = getattr(module, SLOT_DOWN), getattr(module, SLOT_UP), getattr(module, SLOT_SCALES)
    return output + (((inputs[0].to(down.dtype) @ down.T) * scales) @ up.T).to(output.dtype)


def _refuse_if_frozen(model: nn.Module, what: str) -> None:
    compiled = getattr(model, "_fluxion_compiled", None)
    if compiled is not None and compiled.freezing:
        raise InputError(f"cannot {what}: the model was compiled with freezing, which folds the weights into the "
                         "compiled code (an in-place change would not be seen); compile without freezing")


def enable_hotswap(model: nn.Module, rank: int, targets=None) -> None:
    """Switch `model` to hot-swap mode: zero slots of `rank` columns on each target Linear (default: every Linear of
    the model, so any adapter file fits), read by one fixed hook each. Loaded adapters move into the slots. Do it
    before compiling: the slots' hooks are part of the compiled code, and later adapters only fill them."""
    state = _state(model)
    if state.hotswap is not None:
        raise InputError("hot-swap is enabled already; disable_hotswap first to change its rank or targets")
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"hot-swap rank must be a positive integer, got {rank!r}")
    _refuse_if_frozen(model, "enable LoRA hot-swap")
    if targets is None:
        targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = list(dict.fromkeys(targets))
    linears = {path: _linear(model, path) for path in targets}
    hotswap = Hotswap(rank=rank, hooks={})
    for adapter in state.adapters.values():
        hotswap.low_rank[adapter.name] = _hotswap_updates(hotswap, adapter, set(targets))
    state.hotswap = hotswap
    try:
        _plan(state, state.scales)
    except InputError:
        state.hotswap = None
        raise
    evict(model)
    for path, linear in linears.items():
        w = linear.weight
        linear.register_buffer(SLOT_DOWN, w.new_zeros(rank, linear.in_features), persistent=False)
        linear.register_buffer(SLOT_UP, w.new_zeros(linear.out_features, rank), persistent=False)
        linear.register_buffer(SLOT_SCALES, w.new_zeros(rank), persistent=False)
        hotswap.hooks[path] = linear.register_forward_hook(_slot_hook)
    for handle in state.hooks.values():  # the plain hooks give way to the slots
        handle.remove()
    state.hooks = {}
    _pack(model, state)


def disable_hotswap(model: nn.Module) -> None:
    """Back to the plain hooks (a compiled model recompiles); the slots are freed, the adapters stay loaded."""
    state = getattr(model, "_fluxion_lora", None)
    if state is None or state.hotswap is None:
        return
    evict(model)
    for path, handle in state.hotswap.hooks.items():
        handle.remove()
        linear = _linear(model, path)
        for name in (SLOT_DOWN, SLOT_UP, SLOT_SCALES):
            delattr(linear, name)
    state.hotswap = None
    for path in {p for a in state.adapters.values() for p in a.updates}:
        state.hooks[path] = _linear(model, path).register_forward_hook(_hook(state, path))


def hotswap_rank(model: nn.Module) -> int | None:
    """The slots' rank in hot-swap mode, else None."""
    state = getattr(model, "_fluxion_lora", None)
    return None if state is None or state.hotswap is None else state.hotswap.rank


def _hotswap_updates(hotswap: Hotswap, adapter: Adapter, targets: set[str] | None = None) -> dict[str, LowRank]:
    """The adapter's updates as LowRank on slot Linears, or an InputError saying why it cannot be hot-swapped."""
    targets = set(hotswap.hooks) if targets is None else targets
    if adapter.replacements or adapter.widen:
        raise InputError(f"adapter {adapter.name!r} replaces or widens weights, which hot-swap mode cannot do; "
                         "disable_hotswap (a compiled model recompiles)")
    outside = sorted(set(adapter.updates) - targets)
    if outside:
        raise InputError(f"adapter {adapter.name!r} targets {len(outside)} Linear(s) without hot-swap slots "
                         f"({', '.join(outside[:3])}); enable_hotswap with these targets (a compiled model recompiles)")
    low_rank = {}
    for path, update in adapter.updates.items():
        lr = as_low_rank(update)
        if lr is None or lr.bias is not None:
            raise InputError(f"adapter {adapter.name!r}: the update of {path} is a {type(update).__name__}"
                             f"{' with a bias' if lr is not None else ''}; hot-swap slots hold plain low-rank "
                             "(LoRA) updates only")
        if lr.rank > hotswap.rank:
            raise InputError(f"adapter {adapter.name!r}: the update of {path} has rank {lr.rank}, over the hot-swap "
                             f"rank {hotswap.rank}")
        low_rank[path] = lr
    return low_rank


def _plan(state: LoRAState, scales: dict[str, float], extra: dict[str, dict[str, LowRank]] | None = None) -> None:
    """Refuse a set of active adapters whose ranks on one Linear add up to more than the slots hold."""
    low_rank = {**state.hotswap.low_rank, **(extra or {})}
    used: dict[str, int] = {}
    for name, scale in scales.items():
        if scale != 0.0:
            for path, lr in low_rank.get(name, {}).items():
                used[path] = used.get(path, 0) + lr.rank
    over = {p: r for p, r in used.items() if r > state.hotswap.rank}
    if over:
        path, r = next(iter(over.items()))
        raise InputError(f"the active adapters need rank {r} on {path}, over the hot-swap rank {state.hotswap.rank}; "
                         "activate fewer at once")


@torch.no_grad()
def _pack(model: nn.Module, state: LoRAState) -> None:
    """Copy the active adapters into the slots in place (fused ones are in the weights: empty slots)."""
    hotswap = state.hotswap
    evict(model)
    columns: dict[str, list[tuple[LowRank, float]]] = {path: [] for path in hotswap.hooks}
    if not state.fused_scales:
        for name, scale in state.scales.items():
            if scale != 0.0:
                for path, lr in hotswap.low_rank.get(name, {}).items():
                    columns[path].append((lr, scale))
    for path, parts in columns.items():
        linear = _linear(model, path)
        down, up, scales = getattr(linear, SLOT_DOWN), getattr(linear, SLOT_UP), getattr(linear, SLOT_SCALES)
        col = 0
        for lr, scale in parts:
            r = lr.rank
            down[col:col + r].copy_(lr.down)
            up[:, col:col + r].copy_(lr.up)
            scales[col:col + r].fill_(scale * lr.scale)
            col += r
        down[col:].zero_()
        up[:, col:].zero_()
        scales[col:].zero_()
