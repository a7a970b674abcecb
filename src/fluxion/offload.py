"""Weights kept on the CPU and moved to the execution device only while they run, by forward hooks from outside.

- Model offload (`enable_model_offload`): a whole model (text encoder, transformer, VAE) moves to the device when any
  part of it runs and stays there until another model of the same group starts, as diffusers'
  enable_model_cpu_offload: one model resident at a time, one upload per model per job, not per step.
- Sequential offload (`enable_sequential_offload`): each unit (a transformer block, an embedder, the final layer; in
  other models each layer) moves in just before its forward and out right after: one unit resident at a time, and
  every step uploads all the weights again.

Every parameter and buffer keeps its CPU copy (its "home", pinned when the device is CUDA), so moving out is
`tensor.data = home`: nothing is copied back, and a change made to a resident weight would be lost. fluxion.lora
therefore calls `evict` before it changes weights. Tensor arguments of a hooked module move to the device with it
(text encoders make their token ids on their weights' device, which is the CPU while they are out).
"""

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from .errors import InputError
from .model import Flux

# containers whose forward never runs: their elements are the units
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def block_units(model: nn.Module) -> list[nn.Module]:
    """The model's children, with ModuleList/ModuleDict containers replaced by their elements: for Flux, the
    embedders, each double and single block and the final layer."""
    units = []
    for child in model.children():
        units.extend(block_units(child) if isinstance(child, _CONTAINERS) else [child])
    return units


def layer_units(model: nn.Module) -> list[nn.Module]:
    """Every module that holds parameters or buffers itself (its own, not its children's): layer by layer."""
    return [m for m in model.modules() if any(True for _ in _own_tensors(m))]


def _own_tensors(module: nn.Module):
    """(holder, name, tensor) of what moves with `module`: its parameters and buffers, and tensors it declares
    beside them (fluxion.lora sets `_fluxion_offload_extra` on a Linear: its adapters' low-rank factors)."""
    for kind in ("_parameters", "_buffers"):
        for name, tensor in getattr(module, kind).items():
            if tensor is not None:
                yield module, name, tensor
    extra = getattr(module, "_fluxion_offload_extra", None)
    if extra is not None:
        yield from extra()


class _Unit:
    """Tensors that move together: a module's own (`recurse=False`) or all of its subtree's."""

    def __init__(self, module: nn.Module, device: torch.device, recurse: bool = True):
        self.module, self.device, self.recurse = module, device, recurse
        self.pin = device.type == "cuda"
        self.homes: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}  # (id(owner), name) -> (tensor, home)
        self.resident = False
        self.uploads = 0
        with torch.inference_mode(False):
            self._refresh()

    def tensors(self):
        owners = self.module.modules() if self.recurse else (self.module,)
        for owner in owners:
            yield from _own_tensors(owner)

    def _refresh(self) -> None:
        """Give a home to every tensor that has none: new at enable time, or replaced or moved since (a LoRA that
        swaps a parameter or is added, a model.to() while out); forget the homes of tensors gone."""
        live = {}
        for owner, name, tensor in self.tensors():
            key = (id(owner), name)
            known = self.homes.get(key)
            if known is None or known[0] is not tensor or tensor.data_ptr() != known[1].data_ptr():
                home = tensor.data if tensor.device.type == "cpu" else tensor.data.to("cpu")
                if self.pin and not home.is_pinned():
                    home = home.pin_memory()
                tensor.data = home
                known = (tensor, home)
            live[key] = known
        self.homes = live

    def move_in(self) -> None:
        if self.resident:
            return
        with torch.inference_mode(False):  # plain tensors, whatever mode the caller runs in
            self._refresh()
            for tensor, home in self.homes.values():
                # copy=True: a real copy even when the "device" is the CPU (tests observe the movement that way)
                tensor.data = home.to(self.device, non_blocking=self.pin, copy=True)
        self.resident = True
        self.uploads += 1

    def move_out(self) -> None:
        if not self.resident:
            return
        for tensor, home in self.homes.values():
            tensor.data = home  # the device copy is dropped; the unchanged home copy is the weight again
        self.resident = False


def _check_cover(model: nn.Module, units: list[_Unit]) -> None:
    """Every parameter and buffer in exactly one unit: one left out would stay on the CPU while its layer runs."""
    seen: dict[int, int] = {}
    for unit in units:
        for _, _, tensor in unit.tensors():
            seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) not in seen]
    twice = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if seen.get(id(t), 0) > 1]
    if missing or twice:
        raise InputError(f"offload units must hold every parameter and buffer once: {len(missing)} not held "
                         f"{missing[:3]}, {len(twice)} held twice {twice[:3]}")


class _Offload:
    """What enable_*_offload returns and the models carry (module._fluxion_offload)."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.handles: list = []
        self.models: list[nn.Module] = []

    def _move_args(self, args, kwargs):
        def move(t: Tensor) -> Tensor:
            return t if t.device == self.device else t.to(self.device)
        return tree_map_only(Tensor, move, (args, kwargs))

    def _claim(self, model: nn.Module) -> None:
        if getattr(model, "_fluxion_offload", None) is not None:
            raise InputError(f"this {type(model).__name__} is offloaded already: disable_offload(model) first")
        model._fluxion_offload = self
        self.models.append(model)

    def units(self) -> list[_Unit]:
        raise NotImplementedError

    def evict(self) -> None:
        """Every weight back home (on the CPU): do this before changing weights in place."""
        for unit in self.units():
            unit.move_out()
        if self.device.type == "cuda":  # no copy from a pinned home may still be in flight when the caller writes it
            torch.cuda.current_stream(self.device).synchronize()

    def resident(self) -> list[nn.Module]:
        """The modules whose weights are on the device now."""
        return [u.module for u in self.units() if u.resident]

    def remove(self) -> None:
        """Remove the hooks; every weight stays home, on the CPU (move the model yourself if you want it back)."""
        self.evict()
        for handle in self.handles:
            handle.remove()
        for model in self.models:
            if getattr(model, "_fluxion_offload", None) is self:
                del model._fluxion_offload
        self.handles, self.models = [], []


class ModelOffload(_Offload):
    """One whole model of the group on the device at a time, until another one runs."""

    def __init__(self, models: dict[str, nn.Module], device):
        super().__init__(device)
        self.groups: dict[str, _Unit] = {}
        self.current: str | None = None
        try:
            for name, model in models.items():
                self._claim(model)
                self.groups[name] = _Unit(model, self.device)
                # the root and every block: whichever entry point runs first (Pipeline calls forward, the step
                # caches call embed and the blocks, the VAE's decode calls its decoder) brings the whole model in
                for entry in [model, *block_units(model)]:
                    self.handles.append(entry.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
        except InputError:
            self.remove()
            raise

    def _pre_hook(self, name: str):
        def bring_in(module, args, kwargs):
            self.activate(name)
            return self._move_args(args, kwargs)
        return bring_in

    def activate(self, name: str) -> None:
        """Make `name` the resident model: the previous one goes home first."""
        if self.current == name and self.groups[name].resident:
            return
        if self.current is not None:
            self.groups[self.current].move_out()
        self.groups[name].move_in()
        self.current = name

    def units(self) -> list[_Unit]:
        return list(self.groups.values())


class SequentialOffload(_Offload):
    """Each unit on the device only during its own forward."""

    def __init__(self, model: nn.Module, device, units: Iterable[nn.Module] | None = None, recurse: bool = True):
        super().__init__(device)
        self._claim(model)
        modules = list(units) if units is not None else block_units(model)
        self._units = [_Unit(m, self.device, recurse) for m in modules]
        try:
            _check_cover(model, self._units)
        except InputError:
            self.remove()
            raise
        for unit in self._units:
            self.handles.append(unit.module.register_forward_pre_hook(self._pre_hook(unit), with_kwargs=True))
            self.handles.append(unit.module.register_forward_hook(self._post_hook(unit)))

    def _pre_hook(self, unit: _Unit):
        def bring_in(module, args, kwargs):
            unit.move_in()
            return self._move_args(args, kwargs)
        return bring_in

    @staticmethod
    def _post_hook(unit: _Unit):
        def send_home(module, args, output):
            unit.move_out()
        return send_home

    def units(self) -> list[_Unit]:
        return self._units


def enable_model_offload(models: dict[str, nn.Module], device) -> ModelOffload:
    """Keep these models (e.g. {"text_encoder": ..., "transformer": ..., "autoencoder": ...}, on the CPU) home and
    bring each to `device` when it runs, sending the previous one home. Call `.evict()` on the result when a job
    ends to free the device; `disable_offload(model)` removes the hooks."""
    return ModelOffload(models, device)


def enable_sequential_offload(model: nn.Module, device,
                              units: str | Iterable[nn.Module] | None = None) -> SequentialOffload:
    """Bring each unit of `model` (kept on the CPU) to `device` just for its forward. units="blocks": the model's
    children with lists expanded (Flux: embedders, each block, the final layer; the default for Flux); "layers":
    every module that holds weights itself (the default for other models, whose sub-blocks are not all called as
    modules: the VAE's mid and up levels); or a list of modules. Every parameter must be in exactly one unit."""
    if units is None:
        units = "blocks" if isinstance(model, Flux) else "layers"
    if units == "blocks":
        return SequentialOffload(model, device)
    if units == "layers":
        return SequentialOffload(model, device, layer_units(model), recurse=False)
    if isinstance(units, str):
        raise InputError(f"units must be 'blocks', 'layers' or a list of modules, got {units!r}")
    return SequentialOffload(model, device, units)


def enable_offload(mode: str, models: dict[str, nn.Module], device) -> list[_Offload]:
    """Pipeline's switch: "model" puts the models in one ModelOffload group; "sequential" offloads each model
    sequentially (Flux by blocks, the others by layers). Returns the handles (each has .evict() and .remove())."""
    if mode == "model":
        return [enable_model_offload(models, device)]
    if mode == "sequential":
        return [enable_sequential_offload(m, device) for m in models.values()]
    raise InputError(f"offload must be 'model' or 'sequential', got {mode!r}")


def disable_offload(model: nn.Module) -> None:
    """Remove the offload hooks `model` takes part in (for model offload: the whole group's). Its weights stay on
    the CPU."""
    offload = getattr(model, "_fluxion_offload", None)
    if offload is not None:
        offload.remove()


def evict(model: nn.Module) -> None:
    """Send `model`'s resident weights home, if it is offloaded (before changing weights in place)."""
    offload = getattr(model, "_fluxion_offload", None)
    if offload is not None:
        offload.evict()


def _bytes(module: nn.Module, recurse: bool = True) -> int:
    owners = module.modules() if recurse else (module,)
    return sum(t.numel() * t.element_size() for o in owners for _, _, t in _own_tensors(o))


def device_weight_bytes(models: dict[str, nn.Module], mode: str | None) -> int:
    """Weight bytes on the device at the peak of a job under `mode` (as enable_offload sets it up): None: every
    model; "model": the largest model; "sequential": the largest unit of any model. Activations come on top."""
    if mode is None:
        return sum(_bytes(m) for m in models.values())
    if mode == "model":
        return max(_bytes(m) for m in models.values())
    if mode == "sequential":
        return max(max(_bytes(u) for u in block_units(m)) if isinstance(m, Flux)
                   else max(_bytes(u, recurse=False) for u in layer_units(m)) for m in models.values())
    raise InputError(f"offload must be None, 'model' or 'sequential', got {mode!r}")
