"""The trainable part of a LoRA run: one low-rank pair per targeted Linear of a frozen base model."""

import fnmatch
import math

import torch
from torch import nn

from ..lora import Adapter, LowRank
from .config import LORA_TARGET_GROUPS, ConfigError


def target_modules(model: nn.Module, targets: list[str], source: str = "objective.targets") -> list[str]:
    """The Linear layers of `model` that `targets` (LORA_TARGET_GROUPS names or fnmatch patterns) select, in
    the model's order."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = set()
    for target in targets:
        patterns = LORA_TARGET_GROUPS.get(target, (target,))
        found = {name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
        if not found:
            raise ConfigError(f"{source}: {target!r} selects no Linear layer of the model (groups: "
                              f"{', '.join(LORA_TARGET_GROUPS)}; or a pattern such as 'double_blocks.*.img_attn.qkv')")
        chosen |= found
    return [name for name in linears if name in chosen]


class LoRAWeights(nn.Module):
    """down (rank, in) and up (out, rank) for each target; the update is (alpha / rank) * up @ down. `up` starts
    at zero (as PEFT), so training starts exactly at the base model."""

    def __init__(self, base: nn.Module, targets: list[str], rank: int, alpha: float):
        super().__init__()
        self.paths = target_modules(base, targets)
        self.rank, self.alpha = rank, alpha
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for path in self.paths:
            linear = base.get_submodule(path)
            down = torch.empty(rank, linear.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's own init, as PEFT's lora_A
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(linear.out_features, rank)))

    def adapter(self, name: str) -> Adapter:
        """The adapter these weights make (sharing their tensors, so gradients reach them)."""
        scale = self.alpha / self.rank
        return Adapter(name, {p: LowRank(d, u, scale) for p, d, u in zip(self.paths, self.down, self.up)})
