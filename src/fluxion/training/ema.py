"""Exponential moving average of a model's weights: the copy that is sampled from and shipped."""

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of `model` whose tensors follow it by ema <- ema + (1 - d) (model - ema) after each step.

    d ramps up as min(decay, (1 + n) / (10 + n)) over the first updates (as TensorFlow's ExponentialMovingAverage
    with num_updates), so early samples are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_state = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                target.lerp_(value.to(target.dtype), 1 - d)
            else:
                target.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
