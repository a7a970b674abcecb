"""What an adapter adds to one Linear: low rank (LoRA), Kronecker (LyCORIS LoKr), Hadamard (LoHa), a dense
difference (ComfyUI `.diff`/`.diff_b`), or row blocks of a fused Linear. All share one interface: `shape`
(out, in or None), `delta(x)` for forward hooks, `weight()`/`bias_delta()` (float32) for fusing, `to()`."""

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LowRank:
    """scale * (up @ down x + bias) on one Linear, in our (BFL) layout: down (R, in), up (out, R).

    `scale` is the file's alpha / rank, kept apart from `up` so writers can record rank and alpha (alpha = scale * R).
    `bias` (out,) is BFL's control-LoRA `lora_B.bias`, which their LinearLora scales with the update."""

    down: Tensor
    up: Tensor
    scale: float = 1.0
    bias: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def alpha(self) -> float:
        return self.scale * self.rank

    def delta(self, x: Tensor) -> Tensor:
        y = (x.to(self.down.dtype) @ self.down.T) @ (self.scale * self.up).T
        return y if self.bias is None else y + self.scale * self.bias

    def weight(self) -> Tensor:
        return self.scale * (self.up.float() @ self.down.float())

    def bias_delta(self) -> Tensor | None:
        return None if self.bias is None else self.scale * self.bias.float()

    def to(self, device, dtype) -> None:
        self.down, self.up = self.down.to(device, dtype), self.up.to(device, dtype)
        self.bias = None if self.bias is None else self.bias.to(device, dtype)


@dataclass
class Kronecker:
    """LyCORIS LoKr: scale * kron(w1, w2) with w1 (a1, b1), w2 (a2, b2) for an (a1*a2, b1*b2) weight; `rank` and
    `alpha` are the file's (None when both factors are stored whole, where LyCORIS applies no alpha)."""

    w1: Tensor
    w2: Tensor
    scale: float = 1.0
    rank: int | None = None
    alpha: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def delta(self, x: Tensor) -> Tensor:
        # kron(w1, w2) x = flatten(w1 X w2^T) with X = x viewed (b1, b2): never forms the full weight
        x = x.to(self.w1.dtype).unflatten(-1, (self.w1.shape[1], self.w2.shape[1]))  # (..., b1*b2) -> (..., b1, b2)
        return (self.scale * (self.w1 @ x @ self.w2.T)).flatten(-2)  # (..., a1, a2) -> (..., a1*a2)

    def weight(self) -> Tensor:
        return self.scale * torch.kron(self.w1.float(), self.w2.float())

    def bias_delta(self) -> None:
        return None

    def to(self, device, dtype) -> None:
        self.w1, self.w2 = self.w1.to(device, dtype), self.w2.to(device, dtype)


@dataclass
class Hadamard:
    """LyCORIS LoHa: scale * (w1a @ w1b) * (w2a @ w2b), w*a (out, R), w*b (R, in). Not low rank: the forward hook
    forms the full weight once and keeps it (as much memory as the layer itself)."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    scale: float = 1.0
    alpha: float | None = None
    _full: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1a.shape[0], self.w1b.shape[1]

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def delta(self, x: Tensor) -> Tensor:
        if self._full is None:
            self._full = self.weight().to(self.w1a.dtype)
        return x.to(self._full.dtype) @ self._full.T

    def weight(self) -> Tensor:
        return self.scale * (self.w1a.float() @ self.w1b.float()) * (self.w2a.float() @ self.w2b.float())

    def bias_delta(self) -> None:
        return None

    def to(self, device, dtype) -> None:
        self.w1a, self.w1b = self.w1a.to(device, dtype), self.w1b.to(device, dtype)
        self.w2a, self.w2b = self.w2a.to(device, dtype), self.w2b.to(device, dtype)
        self._full = None


@dataclass
class DenseDelta:
    """A full weight difference (out, in) and/or bias difference (out,), as ComfyUI's `.diff` and `.diff_b`."""

    weight_delta: Tensor | None = None
    bias: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int | None]:
        if self.weight_delta is not None:
            return tuple(self.weight_delta.shape)
        return self.bias.shape[0], None

    def delta(self, x: Tensor) -> Tensor:
        dtype = (self.weight_delta if self.weight_delta is not None else self.bias).dtype
        if self.weight_delta is None:
            return self.bias.expand(*x.shape[:-1], -1).to(dtype)
        y = x.to(dtype) @ self.weight_delta.T
        return y if self.bias is None else y + self.bias

    def weight(self) -> Tensor | None:
        return None if self.weight_delta is None else self.weight_delta.float()

    def bias_delta(self) -> Tensor | None:
        return None if self.bias is None else self.bias.float()

    def to(self, device, dtype) -> None:
        self.weight_delta = None if self.weight_delta is None else self.weight_delta.to(device, dtype)
        self.bias = None if self.bias is None else self.bias.to(device, dtype)


@dataclass
class RowBlocks:
    """Updates that each fill rows [start, stop) of one fused Linear (e.g. LoKr on diffusers' to_q, to_k, to_v,
    which are row blocks of our qkv); blocks may overlap and then add."""

    out_features: int
    in_features: int
    blocks: list[tuple[int, int, object]]  # (start, stop, update)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def delta(self, x: Tensor) -> Tensor:
        parts = [(a, b, u.delta(x)) for a, b, u in self.blocks]
        y = parts[0][2].new_zeros(*x.shape[:-1], self.out_features)
        for a, b, d in parts:
            y[..., a:b] += d
        return y

    def weight(self) -> Tensor | None:
        weights = [(a, b, u.weight()) for a, b, u in self.blocks]
        like = next((w for _, _, w in weights if w is not None), None)
        if like is None:
            return None
        full = like.new_zeros(self.out_features, self.in_features)
        for a, b, w in weights:
            if w is not None:
                full[a:b] += w
        return full

    def bias_delta(self) -> Tensor | None:
        biases = [(a, b, u.bias_delta()) for a, b, u in self.blocks]
        like = next((d for _, _, d in biases if d is not None), None)
        if like is None:
            return None
        bias = like.new_zeros(self.out_features)
        for a, b, d in biases:
            if d is not None:
                bias[a:b] += d
        return bias

    def to(self, device, dtype) -> None:
        for _, _, u in self.blocks:
            u.to(device, dtype)


Update = LowRank | Kronecker | Hadamard | DenseDelta | RowBlocks


def stack_low_rank(out_features: int, blocks: list[tuple[slice, LowRank]]) -> LowRank:
    """Low-rank updates of row blocks as one LowRank of the whole Linear: each block's up sits on its own rows and
    columns, so it reaches only its rows. A block whose scale differs from the first's has the ratio folded into
    its up."""
    scale = blocks[0][1].scale
    down = torch.cat([u.down for _, u in blocks])
    up = down.new_zeros(out_features, down.shape[0])
    bias = down.new_zeros(out_features) if any(u.bias is not None for _, u in blocks) else None
    col = 0
    for rows, u in blocks:
        ratio = u.scale / scale
        up[rows, col:col + u.rank] = u.up if ratio == 1 else u.up * ratio
        if u.bias is not None:
            bias[rows] += u.bias if ratio == 1 else u.bias * ratio
        col += u.rank
    return LowRank(down, up, scale, bias)


def join_blocks(out_features: int, in_features: int, blocks: list[tuple[slice, Update]]) -> Update:
    """One update of a Linear from updates of its row blocks: a single whole-Linear update as it is, low-rank parts
    stacked into one LowRank, anything else as RowBlocks."""
    if len(blocks) == 1 and blocks[0][0] == slice(0, out_features):
        return blocks[0][1]
    updates = [u for _, u in blocks]
    if all(isinstance(u, LowRank) and u.scale for u in updates) and len({u.down.shape[1] for u in updates}) == 1:
        return stack_low_rank(out_features, blocks)
    in_features = max([u.shape[1] or 0 for u in updates] + [in_features])
    return RowBlocks(out_features, in_features, [(rows.start, rows.stop, u) for rows, u in blocks])


def as_low_rank(update: Update) -> LowRank | None:
    """The update as one LowRank when it is one (row blocks of low-rank parts included), else None."""
    if isinstance(update, LowRank):
        return update
    if isinstance(update, RowBlocks) and all(isinstance(u, LowRank) and u.scale for _, _, u in update.blocks):
        return stack_low_rank(update.out_features, [(slice(a, b), u) for a, b, u in update.blocks])
    return None
