"""BFL <-> diffusers state-dict key maps as data tables, and the one generic converter that applies them."""

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from ..errors import CheckpointError

Layout = Literal["bfl", "diffusers"]


@dataclass(frozen=True)
class Rule:
    """One BFL tensor ("ours") and the diffusers tensor(s) holding the same numbers.

    Patterns use `{i}`/`{j}` for block indices. Several `theirs` keys mean ours is theirs concatenated on dim 0:
    equal parts unless `sizes` names each part's length (a dim name, or "rest" for the remainder).
    """

    ours: str
    theirs: tuple[str, ...]
    op: Literal["copy", "swap_halves", "conv1x1"] = "copy"
    sizes: tuple[str, ...] = ()
    reverse: tuple[str, str] | None = None  # (placeholder, dim): their index = dims[dim] - 1 - our index


@dataclass(frozen=True)
class Dim:
    """A size a rule needs, read from the source state dict: a tensor's shape[axis], or (axis None) the number
    of distinct `{i}` values among keys starting with the pattern."""

    ours: str
    theirs: str
    axis: int | None = 0


@dataclass(frozen=True)
class KeyMap:
    name: str
    rules: tuple[Rule, ...]
    dims: dict[str, Dim] = field(default_factory=dict)

    @cached_property
    def _compiled(self) -> list[tuple[Rule, re.Pattern, re.Pattern]]:
        return [(r, _regex(r.ours), _regex(r.theirs[0])) for r in self.rules]


def _regex(pattern: str, prefix_only: bool = False) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", pattern)  # literal, name, literal, name, ...
    body = "".join(re.escape(p) if n % 2 == 0 else rf"(?P<{p}>\d+)" for n, p in enumerate(parts))
    return re.compile(body if prefix_only else body + r"\Z")


def _linear(ours: str, theirs: str, op: str = "copy") -> tuple[Rule, ...]:
    return tuple(Rule(f"{ours}.{p}", (f"{theirs}.{p}",), op) for p in ("weight", "bias"))


def _fused(ours: str, theirs: tuple[str, ...], sizes: tuple[str, ...] = ()) -> tuple[Rule, ...]:
    return tuple(Rule(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), sizes=sizes) for p in ("weight", "bias"))


# --- transformer: Flux (BFL) <-> FluxTransformer2DModel ------------------------------------------------------------
_D, _DT = "double_blocks.{i}", "transformer_blocks.{i}"
_S, _ST = "single_blocks.{i}", "single_transformer_blocks.{i}"

TRANSFORMER_KEYMAP = KeyMap(
    name="transformer",
    dims={"hidden": Dim("img_in.weight", "x_embedder.weight", axis=0)},
    rules=(
        *_linear("img_in", "x_embedder"),
        *_linear("txt_in", "context_embedder"),
        *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        *_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        *_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        # double-stream blocks
        *_linear(f"{_D}.img_mod.lin", f"{_DT}.norm1.linear"),
        *_linear(f"{_D}.txt_mod.lin", f"{_DT}.norm1_context.linear"),
        *_fused(f"{_D}.img_attn.qkv", (f"{_DT}.attn.to_q", f"{_DT}.attn.to_k", f"{_DT}.attn.to_v")),
        *_fused(f"{_D}.txt_attn.qkv", (f"{_DT}.attn.add_q_proj", f"{_DT}.attn.add_k_proj", f"{_DT}.attn.add_v_proj")),
        Rule(f"{_D}.img_attn.norm.query_norm.scale", (f"{_DT}.attn.norm_q.weight",)),
        Rule(f"{_D}.img_attn.norm.key_norm.scale", (f"{_DT}.attn.norm_k.weight",)),
        Rule(f"{_D}.txt_attn.norm.query_norm.scale", (f"{_DT}.attn.norm_added_q.weight",)),
        Rule(f"{_D}.txt_attn.norm.key_norm.scale", (f"{_DT}.attn.norm_added_k.weight",)),
        *_linear(f"{_D}.img_attn.proj", f"{_DT}.attn.to_out.0"),
        *_linear(f"{_D}.txt_attn.proj", f"{_DT}.attn.to_add_out"),
        *_linear(f"{_D}.img_mlp.0", f"{_DT}.ff.net.0.proj"),
        *_linear(f"{_D}.img_mlp.2", f"{_DT}.ff.net.2"),
        *_linear(f"{_D}.txt_mlp.0", f"{_DT}.ff_context.net.0.proj"),
        *_linear(f"{_D}.txt_mlp.2", f"{_DT}.ff_context.net.2"),
        # single-stream blocks: linear1 = [q; k; v; mlp_in]
        *_fused(f"{_S}.linear1", (f"{_ST}.attn.to_q", f"{_ST}.attn.to_k", f"{_ST}.attn.to_v", f"{_ST}.proj_mlp"),
                sizes=("hidden", "hidden", "hidden", "rest")),
        *_linear(f"{_S}.linear2", f"{_ST}.proj_out"),
        Rule(f"{_S}.norm.query_norm.scale", (f"{_ST}.attn.norm_q.weight",)),
        Rule(f"{_S}.norm.key_norm.scale", (f"{_ST}.attn.norm_k.weight",)),
        *_linear(f"{_S}.modulation.lin", f"{_ST}.norm.linear"),
        # BFL's final adaLN emits (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift)
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap_halves"),
        *_linear("final_layer.linear", "proj_out"),
    ),
)

# --- autoencoder: AutoEncoder (BFL) <-> AutoencoderKL ----------------------------------------------------------------
_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
           ("nin_shortcut", "conv_shortcut"))
# (ours, theirs, reverse): BFL stores decoder.up[0] as the highest resolution, diffusers up_blocks[0] as the lowest
_RESNET_AT = (
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", None),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0", None),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1", None),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0", None),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1", None),
    ("decoder.up.{i}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}", ("i", "up_levels")),
)
# BFL attention projections are 1x1 convs (C, C, 1, 1); diffusers uses Linear (C, C)
_ATTN = (("norm", "group_norm", "copy"), ("q", "to_q", "conv1x1"), ("k", "to_k", "conv1x1"),
         ("v", "to_v", "conv1x1"), ("proj_out", "to_out.0", "conv1x1"))
_VAE_PLAIN = (
    ("encoder.conv_in", "encoder.conv_in", None),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv", None),
    ("encoder.norm_out", "encoder.conv_norm_out", None),
    ("encoder.conv_out", "encoder.conv_out", None),
    ("decoder.conv_in", "decoder.conv_in", None),
    ("decoder.up.{i}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv", ("i", "up_levels")),
    ("decoder.norm_out", "decoder.conv_norm_out", None),
    ("decoder.conv_out", "decoder.conv_out", None),
)

AUTOENCODER_KEYMAP = KeyMap(
    name="autoencoder",
    dims={"up_levels": Dim("decoder.up.{i}.", "decoder.up_blocks.{i}.", axis=None)},
    rules=(
        *(Rule(f"{o}.{a}.{p}", (f"{t}.{b}.{p}",), reverse=rev)
          for o, t, rev in _RESNET_AT for a, b in _RESNET for p in ("weight", "bias")),
        *(Rule(f"{part}.mid.attn_1.{a}.{p}", (f"{part}.mid_block.attentions.0.{b}.{p}",),
               op if p == "weight" else "copy")
          for part in ("encoder", "decoder") for a, b, op in _ATTN for p in ("weight", "bias")),
        *(Rule(f"{o}.{p}", (f"{t}.{p}",), reverse=rev) for o, t, rev in _VAE_PLAIN for p in ("weight", "bias")),
    ),
)

KEYMAPS = {"transformer": TRANSFORMER_KEYMAP, "autoencoder": AUTOENCODER_KEYMAP}


# --- the converter -------------------------------------------------------------------------------------------------
def _swap_halves(t: Tensor, to_diffusers: bool) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)  # its own inverse


def _conv1x1(t: Tensor, to_diffusers: bool) -> Tensor:
    if to_diffusers:
        if t.ndim != 4 or t.shape[2:] != (1, 1):
            raise CheckpointError(f"expected a 1x1 conv weight (C_out, C_in, 1, 1), got shape {tuple(t.shape)}")
        return t.reshape(t.shape[0], t.shape[1])  # (C, C, 1, 1) -> (C, C)
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t  # some diffusers exports keep the conv shape


_OPS = {"copy": lambda t, _: t, "swap_halves": _swap_halves, "conv1x1": _conv1x1}


def _resolve_dim(keymap: KeyMap, name: str, sd: dict[str, Tensor], src: Layout) -> int:
    dim = keymap.dims[name]
    pattern = dim.ours if src == "bfl" else dim.theirs
    if dim.axis is not None:
        if pattern not in sd:
            raise CheckpointError(f"{keymap.name} state dict: {pattern!r} is needed to size a split but is missing")
        return sd[pattern].shape[dim.axis]
    regex = _regex(pattern, prefix_only=True)
    found = {int(m.group("i")) for k in sd if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _split_sizes(rule: Rule, t: Tensor, dims: dict[str, int], key: str) -> list[int]:
    n = len(rule.theirs)
    if not rule.sizes:
        if t.shape[0] % n:
            raise CheckpointError(f"{key}: dim 0 of shape {tuple(t.shape)} does not split into {n} equal parts")
        return [t.shape[0] // n] * n
    fixed = [dims[s] for s in rule.sizes if s != "rest"]
    rest = t.shape[0] - sum(fixed)
    if rest < 0:
        raise CheckpointError(f"{key}: dim 0 of shape {tuple(t.shape)} is smaller than the parts {rule.sizes}={fixed}")
    return [rest if s == "rest" else dims[s] for s in rule.sizes]


def convert_state_dict(state_dict: dict[str, Tensor], keymap: KeyMap, to: Layout, *,
                       consume: bool = False) -> dict[str, Tensor]:
    """Rename, split or merge tensors from one layout to the other; exact (no arithmetic on values).

    consume=True pops tensors from `state_dict` as they are converted, so merged copies replace the parts
    instead of adding to them. Keys no rule knows raise CheckpointError listing them.
    """
    if to not in ("bfl", "diffusers"):
        raise ValueError(f"to must be 'bfl' or 'diffusers', got {to!r}")
    to_diffusers = to == "diffusers"
    src: Layout = "bfl" if to_diffusers else "diffusers"
    source = state_dict if consume else dict(state_dict)
    # sizes are read before any tensor is popped; a missing one only matters if a rule needs it
    dims: dict[str, int | CheckpointError] = {}
    for name in keymap.dims:
        try:
            dims[name] = _resolve_dim(keymap, name, source, src)
        except CheckpointError as e:
            dims[name] = e
    out: dict[str, Tensor] = {}

    def dim(name: str) -> int:
        if isinstance(dims[name], CheckpointError):
            raise dims[name]
        return dims[name]

    for rule, ours_re, theirs_re in keymap._compiled:
        src_patterns, dst_patterns = ((rule.ours,), rule.theirs) if to_diffusers else (rule.theirs, (rule.ours,))
        regex = ours_re if to_diffusers else theirs_re
        for key in [k for k in source if regex.match(k)]:
            if key not in source:  # already consumed by an earlier match of this rule
                continue
            idx = {name: int(v) for name, v in regex.match(key).groupdict().items()}
            src_keys = [p.format(**idx) for p in src_patterns]
            absent = [k for k in src_keys if k not in source]
            if absent:
                raise CheckpointError(f"{keymap.name} state dict has {key!r} but not {', '.join(absent)}, "
                                      f"which it must be merged with")
            if rule.reverse:
                name, dim_name = rule.reverse
                idx[name] = dim(dim_name) - 1 - idx[name]
            parts = [source.pop(k) for k in src_keys]
            if len(dst_patterns) > 1:
                t = parts[0]
                pieces = torch.split(t, _split_sizes(rule, t, {s: dim(s) for s in rule.sizes if s != "rest"}, key))
            else:
                pieces = [torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]]
            for pattern, piece in zip(dst_patterns, pieces):
                out[pattern.format(**idx)] = _OPS[rule.op](piece, to_diffusers)
    if source:
        left = sorted(source)
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise CheckpointError(f"{len(left)} key(s) have no {to} equivalent in the {keymap.name} key map "
                              f"(is this a {src}-layout {keymap.name}?): {shown}")
    return out


def to_diffusers(state_dict: dict[str, Tensor], component: str, *, consume: bool = False) -> dict[str, Tensor]:
    return convert_state_dict(state_dict, KEYMAPS[component], "diffusers", consume=consume)


def to_bfl(state_dict: dict[str, Tensor], component: str, *, consume: bool = False) -> dict[str, Tensor]:
    return convert_state_dict(state_dict, KEYMAPS[component], "bfl", consume=consume)
