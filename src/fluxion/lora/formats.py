"""LoRA files -> adapters in our (BFL) module layout. Module names map through the checkpoint key map
(checkpoints.keymaps), so a diffusers update of `to_q` lands on the query rows of our fused `qkv`."""

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import load_state_dict, read_checkpoint_info
from ..checkpoints.keymaps import TRANSFORMER_KEYMAP, _regex
from ..errors import CheckpointError
from .adapters import Adapter, LowRank

PEFT_PREFIXES = ("base_model.model.", "transformer.")


@dataclass(frozen=True)
class Target:
    """Where one diffusers Linear lands in our model: `module`, rows part `part` of `parts` (sizes as the key
    map's rule names them), halves swapped for BFL's (shift, scale) final adaLN."""

    module: str
    part: int
    parts: int
    sizes: tuple[str, ...]
    swap_halves: bool


@lru_cache(maxsize=1)
def _diffusers_targets() -> list[tuple[re.Pattern, str, int, int, tuple[str, ...], bool]]:
    table = []
    for rule in TRANSFORMER_KEYMAP.rules:
        if not rule.ours.endswith(".weight") or rule.op == "conv1x1":
            continue
        for k, theirs in enumerate(rule.theirs):
            table.append((_regex(theirs[: -len(".weight")]), rule.ours[: -len(".weight")], k, len(rule.theirs),
                          rule.sizes, rule.op == "swap_halves"))
    return table


def diffusers_target(module: str) -> Target | None:
    for pattern, ours, part, parts, sizes, swap in _diffusers_targets():
        m = pattern.match(module)
        if m:
            return Target(ours.format(**m.groupdict()), part, parts, sizes, swap)
    return None


def _rows(target: Target, out_features: int, hidden: int) -> slice:
    """The rows of our fused weight that part `target.part` fills."""
    if target.parts == 1:
        return slice(0, out_features)
    if target.sizes:
        lengths = [hidden if s == "hidden" else 0 for s in target.sizes]
        lengths = [n or out_features - sum(lengths) for n in lengths]  # "rest": what the named parts leave
    else:
        lengths = [out_features // target.parts] * target.parts
    start = sum(lengths[: target.part])
    return slice(start, start + lengths[target.part])


def _alphas(metadata: dict[str, str], state: dict[str, Tensor]) -> tuple[float | None, dict[str, float]]:
    """lora_alpha from the header (diffusers' `lora_adapter_metadata`), and per-module `.alpha` tensors."""
    alpha = None
    if "lora_adapter_metadata" in metadata:
        try:
            alpha = float(json.loads(metadata["lora_adapter_metadata"])["lora_alpha"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"lora_adapter_metadata in the header is not readable ({e})") from None
    per_module = {k[: -len(".alpha")]: float(v) for k, v in state.items() if k.endswith(".alpha")}
    return alpha, per_module


def load_peft(path: str | Path, model: nn.Module, *, name: str, strict: bool = True) -> Adapter:
    """A diffusers/PEFT LoRA file (`transformer_blocks.N.attn.to_q.lora_A.weight`, optional `transformer.` or
    `base_model.model.` prefix) as an Adapter on our model."""
    path = Path(path)
    metadata = read_checkpoint_info(path).metadata
    state = load_state_dict(path, dtype=torch.float32)
    for prefix in PEFT_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    header_alpha, module_alpha = _alphas(metadata, state)
    pairs: dict[str, dict[str, Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            if not key.endswith(".alpha"):
                unmapped.append(key)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    hidden = model.params.hidden_size
    parts: dict[str, list[tuple[slice, Tensor, Tensor]]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {module} has lora_{'A' if 'B' in ab else 'B'} missing")
        target = diffusers_target(module)
        if target is None:
            unmapped.append(f"{module}.lora_A.weight")
            continue
        down, up = ab["A"], ab["B"]
        rank = down.shape[0]
        alpha = module_alpha.get(module, header_alpha if header_alpha is not None else rank)
        out_features = model.get_submodule(target.module).out_features
        rows = _rows(target, out_features, hidden)
        if up.shape[0] != rows.stop - rows.start:
            raise CheckpointError(f"{path}: {module}.lora_B.weight has {up.shape[0]} rows, but {target.module} part "
                                  f"{target.part} has {rows.stop - rows.start}")
        if target.swap_halves:  # diffusers' (scale, shift) rows -> BFL's (shift, scale)
            up = torch.cat(up.chunk(2)[::-1])
        parts.setdefault(target.module, []).append((rows, down, up * (alpha / rank)))
    if unmapped:
        message = f"{path}: {len(unmapped)} key(s) map to no module of the model: {', '.join(sorted(unmapped)[:5])}"
        if strict:
            raise CheckpointError(message + " (strict=False applies the rest)")
        import logging

        logging.getLogger(__name__).warning(message)
    if not parts:
        raise CheckpointError(f"{path}: no LoRA update applies to this model")
    updates = {}
    for module, pieces in parts.items():
        out_features = model.get_submodule(module).out_features
        down = torch.cat([d for _, d, _ in pieces])
        up = torch.zeros(out_features, down.shape[0])
        col = 0
        for rows, d, u in pieces:  # block rows: each part's update reaches only its own rows
            up[rows, col: col + d.shape[0]] = u
            col += d.shape[0]
        updates[module] = LowRank(down=down, up=up, scale=1.0)
    return Adapter(name=name, updates=updates, source=str(path))
