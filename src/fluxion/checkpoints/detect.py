"""Infer FluxParams / AutoEncoderParams from a checkpoint's keys and shapes (BFL or diffusers layout) and metadata."""

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch

from ..errors import CheckpointError
from ..model.configs import AutoEncoderParams, FluxParams
from .keymaps import KEYMAPS, Layout, convert_state_dict

logger = logging.getLogger(__name__)

Component = Literal["transformer", "autoencoder"]
Shapes = Mapping[str, Sequence[int]]

# safetensors metadata keys for hyper-parameters the weights cannot show (values are JSON).
METADATA_PREFIX = "fluxion."
SCALE_FACTOR_KEY = "fluxion.scale_factor"
SHIFT_FACTOR_KEY = "fluxion.shift_factor"
TRANSFORMER_METADATA_FIELDS = ("axes_dim", "theta")
AUTOENCODER_METADATA_FIELDS = ("scale_factor", "shift_factor", "resolution")

# Prefixes that all-in-one files put before the component's own keys.
PREFIXES: dict[str, tuple[str, ...]] = {
    "transformer": ("model.diffusion_model.", "diffusion_model."),
    "autoencoder": ("first_stage_model.", "vae."),
}
# One key that only this (component, layout) has.
_SIGNATURES: dict[tuple[str, str], str] = {
    ("transformer", "bfl"): "img_in.weight",
    ("transformer", "diffusers"): "x_embedder.weight",
    ("autoencoder", "bfl"): "encoder.down.0.block.0.conv1.weight",
    ("autoencoder", "diffusers"): "encoder.down_blocks.0.resnets.0.conv1.weight",
}


def find_prefix(keys: Iterable[str], component: Component) -> str:
    """The all-in-one prefix the component's keys carry in this file ('' when none)."""
    keys = list(keys)
    for prefix in PREFIXES[component]:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def strip_prefix(items: Mapping, prefix: str) -> dict:
    """Keep only the entries under `prefix`, with the prefix removed."""
    if not prefix:
        return dict(items)
    return {k[len(prefix):]: v for k, v in items.items() if k.startswith(prefix)}


def detect_layout(keys: Iterable[str]) -> tuple[Component, Layout]:
    """Which component and key layout a set of (prefix-free) keys belongs to."""
    keys = set(keys)
    for (component, layout), signature in _SIGNATURES.items():
        if signature in keys:
            return component, layout
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"cannot tell what these weights are: none of {sorted(set(_SIGNATURES.values()))} is "
                          f"present (first keys: {sample})")


def _bfl_shapes(shapes: Shapes, component: Component) -> dict[str, tuple[int, ...]]:
    """Shapes in BFL layout; diffusers-layout shapes are converted by the key map, on meta tensors (no memory)."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    _, layout = detect_layout(shapes)
    if layout == "bfl":
        return shapes
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    return {k: tuple(t.shape) for k, t in convert_state_dict(meta, KEYMAPS[component], "bfl").items()}


def _count(shapes: Shapes, prefix: str) -> int:
    regex = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := regex.match(k))}
    if found and found != set(range(max(found) + 1)):
        raise CheckpointError(f"block indices under {prefix!r} are not contiguous: {sorted(found)}")
    return len(found)


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"cannot infer {what}: key {key!r} is missing")
    return tuple(shapes[key])


def _from_metadata(metadata: Mapping[str, str] | None, fields: Sequence[str]) -> dict:
    out = {}
    for name in fields:
        raw = (metadata or {}).get(METADATA_PREFIX + name)
        if raw is None:
            continue
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"metadata {METADATA_PREFIX + name}={raw!r} is not valid JSON") from e
    return out


def default_axes_dim(head_dim: int) -> list[int]:
    """RoPE axes split like FLUX's 16/56/56 of 128 (index : row : column = 1 : 3.5 : 3.5), each part even."""
    if head_dim % 2:
        raise CheckpointError(f"head dim {head_dim} is odd; RoPE needs an even head dim")
    first = 2 * round(head_dim / 16)
    second = (head_dim - first) // 4 * 2
    return [first, second, head_dim - first - second]


def detect_transformer_params(shapes: Shapes, metadata: Mapping[str, str] | None = None) -> FluxParams:
    """Read every FluxParams field the weights determine; axes_dim and theta come from `fluxion.*` metadata or
    FLUX's proportions (RoPE has no weights)."""
    s = _bfl_shapes(shapes, "transformer")
    hidden, in_channels = _need(s, "img_in.weight", "hidden size")
    depth, depth_single = _count(s, "double_blocks."), _count(s, "single_blocks.")
    if depth:
        head_dim = _need(s, "double_blocks.0.img_attn.norm.query_norm.scale", "head dim")[0]
        mlp_hidden = _need(s, "double_blocks.0.img_mlp.0.weight", "mlp ratio")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in s
    elif depth_single:
        head_dim = _need(s, "single_blocks.0.norm.query_norm.scale", "head dim")[0]
        mlp_hidden = _need(s, "single_blocks.0.linear1.weight", "mlp ratio")[0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError("transformer weights have neither double_blocks nor single_blocks")
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the qk-norm (head) dim {head_dim}")
    fields = dict(
        in_channels=in_channels,
        out_channels=_need(s, "final_layer.linear.weight", "out channels")[0],
        vec_in_dim=_need(s, "vector_in.in_layer.weight", "vec_in_dim")[1],
        context_in_dim=_need(s, "txt_in.weight", "context_in_dim")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=default_axes_dim(head_dim),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in s,
    )
    stored = _from_metadata(metadata, TRANSFORMER_METADATA_FIELDS)
    if "axes_dim" not in stored:
        logger.debug("no %saxes_dim metadata: RoPE axes %s follow FLUX's proportions", METADATA_PREFIX,
                     fields["axes_dim"])
    fields.update(stored)
    try:
        return FluxParams(**fields)
    except ValueError as e:
        raise CheckpointError(f"inconsistent transformer hyper-parameters {fields}: {e}") from e


def detect_autoencoder_params(shapes: Shapes, metadata: Mapping[str, str] | None = None) -> AutoEncoderParams:
    """Read AutoEncoderParams from the weights; scale/shift factors (and resolution) from `fluxion.*` metadata,
    else FLUX's values."""
    s = _bfl_shapes(shapes, "autoencoder")
    ch, in_channels = _need(s, "encoder.conv_in.weight", "base channels")[:2]
    levels = _count(s, "encoder.down.")
    if not levels:
        raise CheckpointError("autoencoder weights have no encoder.down.N blocks")
    ch_mult = []
    for i in range(levels):
        out = _need(s, f"encoder.down.{i}.block.0.conv1.weight", f"channel multiplier of level {i}")[0]
        if out % ch:
            raise CheckpointError(f"encoder.down.{i} has {out} channels, not a multiple of the base {ch}")
        ch_mult.append(out // ch)
    fields = dict(
        in_channels=in_channels,
        ch=ch,
        out_ch=_need(s, "decoder.conv_out.weight", "output channels")[0],
        ch_mult=ch_mult,
        num_res_blocks=_count(s, "encoder.down.0.block."),
        z_channels=_need(s, "decoder.conv_in.weight", "latent channels")[1],
    )
    fields.update(_from_metadata(metadata, AUTOENCODER_METADATA_FIELDS))
    return AutoEncoderParams(**fields)


def detect_params(shapes: Shapes, metadata: Mapping[str, str] | None = None) -> FluxParams | AutoEncoderParams:
    component, _ = detect_layout(shapes)
    if component == "transformer":
        return detect_transformer_params(shapes, metadata)
    return detect_autoencoder_params(shapes, metadata)


def params_metadata(params: FluxParams | AutoEncoderParams) -> dict[str, str]:
    """`fluxion.*` safetensors metadata for the hyper-parameters the weights cannot show; save it with the file."""
    fields = TRANSFORMER_METADATA_FIELDS if isinstance(params, FluxParams) else AUTOENCODER_METADATA_FIELDS
    return {METADATA_PREFIX + name: json.dumps(getattr(params, name)) for name in fields}


# --- diffusers config.json <-> params ------------------------------------------------------------------------------
DIFFUSERS_VERSION = "0.32.0"  # the oldest release whose FLUX classes read these configs


def diffusers_config(params: FluxParams | AutoEncoderParams) -> dict:
    """config.json content so diffusers' FluxTransformer2DModel / AutoencoderKL.from_pretrained load an export."""
    if isinstance(params, FluxParams):
        fixed = {"mlp_ratio": (params.mlp_ratio, 4.0), "qkv_bias": (params.qkv_bias, True),
                 "theta": (params.theta, 10_000)}
        bad = {k: v for k, (v, want) in fixed.items() if v != want}
        if bad:
            raise CheckpointError(f"FluxTransformer2DModel cannot express {bad}: diffusers fixes mlp_ratio=4.0, "
                                  "qkv_bias=True and theta=10000")
        return {
            "_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "patch_size": 1, "in_channels": params.in_channels, "out_channels": params.out_channels,
            "num_layers": params.depth, "num_single_layers": params.depth_single_blocks,
            "attention_head_dim": params.hidden_size // params.num_heads, "num_attention_heads": params.num_heads,
            "joint_attention_dim": params.context_in_dim, "pooled_projection_dim": params.vec_in_dim,
            "guidance_embeds": params.guidance_embed, "axes_dims_rope": list(params.axes_dim),
        }
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": params.in_channels, "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
        "act_fn": "silu", "latent_channels": params.z_channels, "norm_num_groups": 32,
        "sample_size": params.resolution, "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
        "latents_mean": None, "latents_std": None, "force_upcast": True,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    }


def params_from_diffusers_config(config: Mapping, source: str = "config.json") -> FluxParams | AutoEncoderParams:
    """FluxParams / AutoEncoderParams from a diffusers FluxTransformer2DModel or AutoencoderKL config."""
    name = config.get("_class_name")
    try:
        if name == "FluxTransformer2DModel":
            heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
            if config.get("patch_size", 1) != 1:
                raise CheckpointError(f"{source}: patch_size {config['patch_size']} is not supported (FLUX uses 1)")
            in_channels = config.get("in_channels", 64)
            return FluxParams(
                in_channels=in_channels, out_channels=config.get("out_channels") or in_channels,
                vec_in_dim=config.get("pooled_projection_dim", 768),
                context_in_dim=config.get("joint_attention_dim", 4096),
                hidden_size=heads * head_dim, num_heads=heads, depth=config.get("num_layers", 19),
                depth_single_blocks=config.get("num_single_layers", 38),
                axes_dim=list(config.get("axes_dims_rope", (16, 56, 56))),
                guidance_embed=bool(config.get("guidance_embeds", False)),
            )
        if name == "AutoencoderKL":
            if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
                raise CheckpointError(f"{source}: this AutoencoderKL uses quant_conv/post_quant_conv, which the FLUX "
                                      "autoencoder does not have (is it a Stable Diffusion VAE?)")
            channels = list(config.get("block_out_channels", (64,)))
            ch = channels[0]
            return AutoEncoderParams(
                resolution=config.get("sample_size", 256), in_channels=config.get("in_channels", 3), ch=ch,
                out_ch=config.get("out_channels", 3), ch_mult=[c // ch for c in channels],
                num_res_blocks=config.get("layers_per_block", 1), z_channels=config.get("latent_channels", 4),
                scale_factor=config.get("scaling_factor", 0.3611),
                shift_factor=config.get("shift_factor") if config.get("shift_factor") is not None else 0.1159,
            )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:  # wrong value types, or FluxParams' own consistency checks
        raise CheckpointError(f"{source}: invalid {name} config: {e}") from e
    raise CheckpointError(f"{source}: _class_name {name!r} is neither FluxTransformer2DModel nor AutoencoderKL")
