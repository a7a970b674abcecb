"""Adapters written as LoRA files other tools read, atomically and as safetensors only: PEFT/diffusers
(`transformer.` keys, fused Linears split into diffusers' modules, rank and alpha in the `lora_adapter_metadata`
header), kohya/sd-scripts (`lora_unet_` keys, per-module `.alpha`) and ComfyUI/BFL (`diffusion_model.` keys)."""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import save_state_dict
from ..errors import InputError
from .adapters import Adapter
from .formats import read_lora
from .names import diffusers_names, diffusers_parameter, dotted_text_module
from .updates import (
    DenseDelta,
    Hadamard,
    Kronecker,
    LowRank,
    RowBlocks,
    Update,
    as_low_rank,
)

LAYOUTS = ("peft", "kohya", "comfy")
# per layout: (transformer prefix, "_" names?, down role, up role, bias role or None for ComfyUI's .diff_b)
_NATIVE = {"kohya": ("lora_unet_", True, "lora_down.weight", "lora_up.weight", None),
           "comfy": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight", "lora_B.bias")}
_TEXT_PREFIXES = {"kohya": {"clip_l": "lora_te1_", "t5": "lora_te3_"},
                  "comfy": {"clip_l": "text_encoders.clip_l.transformer.", "t5": "text_encoders.t5xxl.transformer."},
                  "peft": {"clip_l": "text_encoder.", "t5": "text_encoder_2."}}


def save_lora(adapter_or_updates: Adapter | dict[str, Update], path: str | Path, *, layout: str = "peft",
              model: nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Write an adapter (or {module path: update} of our model) as a `layout` LoRA file; returns the path.

    Reading it back with read_lora/load_lora gives the same outputs. Ranks and alphas are kept: each written module
    has alpha = scale * its rank. PEFT splits fused qkv/linear1 into diffusers' to_q/to_k/to_v/proj_mlp (up rows with
    the shared down, minus the columns a part never uses) and swaps norm_out's halves back."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    path = Path(path)
    adapter = adapter_or_updates
    if not isinstance(adapter, Adapter):
        adapter = Adapter(name=path.stem, updates=dict(adapter_or_updates))
    tensors, header = _peft(adapter, model) if layout == "peft" else _native(adapter, layout)
    if not tensors:
        raise InputError(f"adapter {adapter.name!r} holds no update to write to {path}")
    header.update(metadata or {})
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return save_state_dict(tensors, path, metadata=header)


def convert_lora(src: str | Path, dst: str | Path, *, to: str, model: nn.Module, strict: bool = True) -> Path:
    """Rewrite a LoRA file of any supported format in another layout, through our model's module layout."""
    return save_lora(read_lora(src, model, name=Path(src).stem, strict=strict), dst, layout=to, model=model)


def _alpha(value: float) -> Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def _native_update(out: dict[str, Tensor], name: str, update: Update, layout: str, module: str) -> None:
    """kohya/ComfyUI keys for one module: LoRA pairs, LyCORIS factors, or ComfyUI diffs."""
    _, _, down_role, up_role, bias_role = _NATIVE[layout]
    low = as_low_rank(update)
    if low is not None:
        out[f"{name}.{down_role}"], out[f"{name}.{up_role}"] = low.down, low.up
        out[f"{name}.alpha"] = _alpha(low.alpha)
        if low.bias is not None:
            if bias_role:
                out[f"{name}.{bias_role}"] = low.bias
            else:
                out[f"{name}.diff_b"] = low.scale * low.bias
    elif isinstance(update, Kronecker):  # both factors whole: LyCORIS then applies no alpha, so the scale goes in w1
        out[f"{name}.lokr_w1"], out[f"{name}.lokr_w2"] = update.scale * update.w1, update.w2
    elif isinstance(update, Hadamard):
        for role in ("w1a", "w1b", "w2a", "w2b"):
            out[f"{name}.hada_{role[:2]}_{role[2]}"] = getattr(update, role)
        out[f"{name}.alpha"] = _alpha(update.scale * update.rank)
    elif isinstance(update, DenseDelta):
        if update.weight_delta is not None:
            out[f"{name}.diff"] = update.weight_delta
        if update.bias is not None:
            out[f"{name}.diff_b"] = update.bias
    elif isinstance(update, RowBlocks):  # e.g. LoKr on diffusers' to_k: our qkv's rows, written as its full diff
        _native_update(out, name, DenseDelta(update.weight(), update.bias_delta()), layout, module)
    else:
        raise InputError(f"cannot write a {type(update).__name__} update of {module}")


def _native(adapter: Adapter, layout: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    prefix, underscored, *_ = _NATIVE[layout]
    out: dict[str, Tensor] = {}
    for module, update in adapter.updates.items():
        _native_update(out, prefix + (module.replace(".", "_") if underscored else module), update, layout, module)
    if adapter.replacements:
        if underscored:
            replaced = ", ".join(sorted(adapter.replacements))
            raise InputError(f"adapter {adapter.name!r} replaces parameters ({replaced}), which the {layout} layout "
                             "cannot hold; use layout='comfy' or 'peft'")
        out.update({prefix + path: tensor for path, tensor in adapter.replacements.items()})
    for part, updates in adapter.text_encoders.items():
        for name, update in updates.items():
            module = name.replace(".", "_") if underscored else _dotted(name, layout)
            _native_update(out, _TEXT_PREFIXES[layout][part] + module, update, layout, name)
    return out, {}


def _dotted(name: str, layout: str) -> str:
    dotted = dotted_text_module(name)
    if dotted is None:
        raise InputError(f"text-encoder module {name!r} has no known dotted name, which the {layout} layout needs; "
                         "use layout='kohya'")
    return dotted


def _low_rank(update: Update, module: str) -> LowRank:
    low = as_low_rank(update)
    if low is None:
        raise InputError(f"the update of {module} is a {type(update).__name__}, not low rank; the PEFT layout holds "
                         "LoRA only (layout='kohya' or 'comfy' write LyCORIS and diff keys)")
    return low


def _peft_part(out: dict[str, Tensor], name: str, down: Tensor, up: Tensor, bias: Tensor | None,
               scale: float) -> tuple[int, float]:
    """One diffusers module's lora_A/lora_B, without the rank columns its rows never use (a stacked LoRA's other
    parts)."""
    used = up.any(dim=0)
    if used.any() and not used.all():
        down, up = down[used], up[:, used]
    out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
    if bias is not None:
        out[f"{name}.lora_B.bias"] = bias
    return down.shape[0], scale * down.shape[0]


def _peft(adapter: Adapter, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    out: dict[str, Tensor] = {}
    configs: dict[str, tuple[dict[str, tuple[int, float]], bool]] = {}
    ranks: dict[str, tuple[int, float]] = {}
    hidden = model.params.hidden_size
    for module, update in adapter.updates.items():
        low = _low_rank(update, module)
        parts = diffusers_names(module)
        if not parts:
            raise InputError(f"{module} has no diffusers name, so the PEFT layout cannot hold its update")
        out_features = low.up.shape[0]
        for theirs, target in parts:
            rows = target.rows(out_features, hidden)
            up, bias = low.up[rows], None if low.bias is None else low.bias[rows]
            if target.swap_halves:  # BFL's (shift, scale) rows -> diffusers' (scale, shift)
                up, bias = torch.cat(up.chunk(2)[::-1]), None if bias is None else torch.cat(bias.chunk(2)[::-1])
            ranks[theirs] = _peft_part(out, f"transformer.{theirs}", low.down, up, bias, low.scale)
    if ranks:
        configs["transformer"] = (ranks, any(k.endswith(".lora_B.bias") for k in out))
    for path, tensor in adapter.replacements.items():
        theirs = diffusers_parameter(path)
        if theirs is None:
            raise InputError(f"replaced parameter {path} has no diffusers name, so the PEFT layout cannot hold it")
        out[f"transformer.{theirs}"] = tensor
    for part, updates in adapter.text_encoders.items():
        component = _TEXT_PREFIXES["peft"][part].rstrip(".")
        text_ranks = {}
        for name, update in updates.items():
            low, dotted = _low_rank(update, name), _dotted(name, "peft")
            text_ranks[dotted] = _peft_part(out, f"{component}.{dotted}", low.down, low.up, low.bias, low.scale)
        configs[component] = (text_ranks, any(u.bias is not None for u in map(as_low_rank, updates.values())))
    header = {f"{component}.{k}": v for component, (modules, bias) in configs.items()
              for k, v in _peft_config(modules, bias).items()}
    return out, {"lora_adapter_metadata": json.dumps(header, indent=2, sort_keys=True)}


def _peft_config(modules: dict[str, tuple[int, float]], bias: bool) -> dict:
    """PEFT LoraConfig fields: the most common (rank, alpha), patterns for the rest; targets matched exactly."""
    r, alpha = Counter(modules.values()).most_common(1)[0][0]

    def anchored(name: str) -> str:  # PEFT matches patterns as (.*\.)?(pattern)$: "^" keeps proj_out to itself
        return "^" + re.escape(name)

    return {"r": r, "lora_alpha": alpha,
            "rank_pattern": {anchored(n): ra for n, (ra, _) in modules.items() if ra != r},
            "alpha_pattern": {anchored(n): a for n, (_, a) in modules.items() if a != alpha},
            "target_modules": "(?:" + "|".join(re.escape(n) for n in sorted(modules)) + ")",
            "lora_bias": bias}
