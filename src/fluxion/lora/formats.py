"""LoRA files of every community format -> an Adapter on our (BFL) model. Keys are parsed once by the grammar
and name table of lora.names, so diffusers/PEFT, kohya (split q/k/v too), ComfyUI, BFL control, XLabs and LyCORIS
LoKr/LoHa files differ only in a few rules about roles and scales; describe_lora says what maps where."""

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import load_state_dict, read_checkpoint_info
from ..checkpoints.keymaps import _regex
from ..errors import CheckpointError
from .adapters import Adapter
from .names import PARAM_RULES, ROLE, Target, resolve, resolve_parameter, split_prefix
from .updates import DenseDelta, Hadamard, Kronecker, LowRank, Update, join_blocks

logger = logging.getLogger(__name__)

FORMATS = ("peft", "kohya", "comfy", "bfl-control", "xlabs", "lokr", "loha", "lycoris")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight"), ("down.weight", "up.weight"))
_SPLIT = re.compile(r"lora_(down|up)\.(\d+)\.weight")
_PEFT_PARTS = {"transformer": "transformer", "text_encoder": "clip_l", "text_encoder_2": "t5"}


@dataclass
class Entry:
    """One module's tensors in a file: role ("lora_A.weight", "alpha", "lokr_w1", ...) -> the file's key."""

    part: str  # "transformer", "clip_l" or "t5"
    module: str  # as the file names it, prefix removed
    prefix: str
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, *roles: str) -> str:
        return next((self.keys[r] for r in roles if r in self.keys), next(iter(self.keys.values())))


@dataclass
class LoraFile:
    """A LoRA file's keys sorted into modules, read from the header alone (no model involved)."""

    path: Path
    format: str
    metadata: dict[str, str]
    entries: list[Entry]
    raw: dict[str, str]  # transformer tensors with no LoRA role (full weights): name, prefix removed -> key
    stray: list[str]  # keys of other parts with no LoRA role


@dataclass
class Piece:
    """One update a file holds and where it lands: rows of a module of ours (or a text-encoder module)."""

    entry: Entry
    update: Update
    kind: str  # "lora", "lokr", "loha" or "diff"
    rank: int | None
    alpha: float | None
    target: Target | None = None
    rows: slice | None = None


@dataclass
class _Plan:
    pieces: list[Piece] = field(default_factory=list)
    text: list[Piece] = field(default_factory=list)
    replacements: dict[str, Tensor] = field(default_factory=dict)
    widen: dict[str, int] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


# --- the file, before any model ------------------------------------------------------------------------------------
def read_lora_file(path: str | Path) -> LoraFile:
    """Parse a LoRA file's header: its modules, their tensors' roles, and the format they add up to."""
    path = Path(path)
    info = read_checkpoint_info(path)
    entries: dict[tuple[str, str], Entry] = {}
    raw, stray = {}, []
    for key in info.tensors:
        prefix, part, rest = split_prefix(key)
        m = ROLE.fullmatch(rest)
        if m is None:  # a full tensor (BFL control LoRAs' norm scales) or nothing we know
            if part == "transformer":
                raw[rest] = key
            else:
                stray.append(key)
            continue
        entry = entries.setdefault((part, m["module"]), Entry(part, m["module"], prefix))
        entry.keys[m["role"]] = key
    entries_list = list(entries.values())
    return LoraFile(path, _detect(entries_list, raw, info.metadata), info.metadata, entries_list, raw, stray)


def detect_lora_format(path: str | Path) -> str:
    """One of FORMATS (or "unknown"), from the keys (and header metadata) alone."""
    return read_lora_file(path).format


def _detect(entries: list[Entry], raw: dict[str, str], metadata: dict[str, str]) -> str:
    roles = {r for e in entries for r in e.keys}
    schemes = {found[1] for e in entries if e.part == "transformer" and (found := resolve(e.module))}
    lokr, loha = any(r.startswith("lokr_") for r in roles), any(r.startswith("hada_") for r in roles)
    if lokr or loha:
        return "lycoris" if lokr and loha else "lokr" if lokr else "loha"
    if "xlabs" in schemes:
        return "xlabs"
    if any(e.prefix in KOHYA_PREFIXES for e in entries) or any(_SPLIT.fullmatch(r) for r in roles):
        return "kohya"
    if "diffusers" in schemes or "lora_adapter_metadata" in metadata:
        return "peft"
    if "lora_B.bias" in roles or raw:
        return "bfl-control"
    return "comfy" if entries else "unknown"


# --- scales: alpha from tensors or header ---------------------------------------------------------------------------
@dataclass
class _Context:
    path: Path
    peft: dict[str, dict]  # model part -> the PEFT LoraConfig fields diffusers wrote in the header
    split_qkv: bool  # sd-scripts trained with split_qkv=True (q, k, v saved stacked in one fused module)


def _context(lora: LoraFile) -> _Context:
    peft: dict[str, dict] = {}
    if "lora_adapter_metadata" in lora.metadata:
        try:
            config = json.loads(lora.metadata["lora_adapter_metadata"])
            for key, value in config.items():  # diffusers' pipelines prefix each field with its component
                head, _, rest = key.partition(".")
                part, name = (_PEFT_PARTS[head], rest) if head in _PEFT_PARTS and rest else ("transformer", key)
                peft.setdefault(part, {})[name] = value
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{lora.path}: lora_adapter_metadata in the header is not readable ({e})") from None
    try:
        args = json.loads(lora.metadata.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    split = isinstance(args, dict) and str(args.get("split_qkv")) == "True"
    return _Context(lora.path, peft, split)


def _alpha(entry: Entry, tensors: dict[str, Tensor], ctx: _Context) -> float | None:
    if "alpha" in tensors:
        alpha = float(tensors["alpha"].float().item())
        return alpha or None  # sd-scripts and LyCORIS read alpha 0 as "alpha = rank"
    config = ctx.peft.get(entry.part)
    if not config:
        return None
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT's own matching rule
        if re.match(rf"(.*\.)?({pattern})$", entry.module):
            return float(value)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


# --- one entry -> its updates ---------------------------------------------------------------------------------------
def _need(entry: Entry, tensors: dict[str, Tensor], role: str, ctx: _Context) -> Tensor:
    if role not in tensors:
        raise CheckpointError(f"{ctx.path}: {entry.key()} has no {role} beside it ({entry.module})")
    return tensors[role]


def _pieces(entry: Entry, tensors: dict[str, Tensor], ctx: _Context, target: Target | None) -> list[Piece]:
    roles = set(tensors)
    if "dora_scale" in roles:
        raise CheckpointError(f"{ctx.path}: {entry.keys['dora_scale']} is a DoRA magnitude; DoRA files are not "
                              "supported")
    if roles & {"hada_t1", "hada_t2"}:
        raise CheckpointError(f"{ctx.path}: {entry.key('hada_t1', 'hada_t2')} is a Tucker LoHa factor, which "
                              "applies to convolutions; Flux has none")
    alpha = _alpha(entry, tensors, ctx)
    pieces = []
    if any(r.startswith("lokr_") for r in roles):
        pieces.append(_lokr(entry, tensors, alpha, ctx))
    elif any(r.startswith("hada_") for r in roles):
        pieces.append(_loha(entry, tensors, alpha, ctx))
    elif roles - {"alpha", "diff", "diff_b"}:
        pieces.append(_lora(entry, tensors, alpha, ctx, target))
    if roles & {"diff", "diff_b"}:
        weight, bias = tensors.get("diff"), tensors.get("diff_b")
        weight = None if weight is None else weight.flatten(1)
        pieces.append(Piece(entry, DenseDelta(weight, bias), "diff", None, None))
    if not pieces:
        raise CheckpointError(f"{ctx.path}: {entry.key()} has no weights beside it ({entry.module})")
    return pieces


def _lora(entry: Entry, t: dict[str, Tensor], alpha: float | None, ctx: _Context, target: Target | None) -> Piece:
    split = sorted((m[1], int(m[2]), r) for r in t if (m := _SPLIT.fullmatch(r)))
    if split:  # sd-scripts' in-memory split q/k/v modules: lora_down.N / lora_up.N, each of rank R with alpha
        downs = [t[r] for kind, _, r in split if kind == "down"]
        ups = [t[r] for kind, _, r in split if kind == "up"]
        if len(downs) != len(ups):
            raise CheckpointError(f"{ctx.path}: {entry.key()} has {len(downs)} lora_down and {len(ups)} lora_up "
                                  "parts")
        down, per = torch.cat([d.flatten(1) for d in downs]), downs[0].shape[0]
        up = torch.block_diag(*[u.flatten(1) for u in ups])
    else:
        pair = next((pair for pair in _PAIRS if set(pair) & set(t)), None)
        if pair is None:
            raise CheckpointError(f"{ctx.path}: {entry.key()} has no lora_A/lora_B (or lora_down/lora_up) beside it")
        down_role, up_role = pair
        down, up = _need(entry, t, down_role, ctx).flatten(1), _need(entry, t, up_role, ctx).flatten(1)
        if up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{ctx.path}: {entry.keys[up_role]} {tuple(up.shape)} and {entry.keys[down_role]} "
                                  f"{tuple(down.shape)} do not share a rank")
        per = down.shape[0]
        if ctx.split_qkv and target is not None and target.parts > 1 and target.whole:
            per = _split_rank(entry, down, up, target, ctx)
    # kohya/LyCORIS/ComfyUI: no alpha means scale 1, as diffusers/PEFT with alpha = r
    rank_alpha = alpha if alpha is not None else float(per)
    return Piece(entry, LowRank(down, up, rank_alpha / per, t.get("lora_B.bias")), "lora", per, alpha)


def _split_rank(entry: Entry, down: Tensor, up: Tensor, target: Target, ctx: _Context) -> int:
    """sd-scripts with split_qkv=True trains q, k, v (and mlp_in) as separate LoRAs of rank R and saves them stacked:
    down (n R, in), up block-diagonal (out, n R), and the alpha of one split; the scale is alpha / R, not alpha / nR
    (kohya-ss/sd-scripts#2204)."""
    n = target.parts
    if down.shape[0] % n:
        return down.shape[0]
    r = down.shape[0] // n
    rows = target.part_rows(up.shape[0], down.shape[1])  # a fused qkv/linear1 reads hidden = in_features
    sparse = all(not up[rows[j], k * r:(k + 1) * r].any() for j in range(n) for k in range(n) if j != k)
    if not sparse:
        logger.warning("%s: %s is not block-diagonal although the header says split_qkv; using alpha / %d",
                       ctx.path, entry.key(), down.shape[0])
        return down.shape[0]
    return r


def _lokr(entry: Entry, t: dict[str, Tensor], alpha: float | None, ctx: _Context) -> Piece:
    """LyCORIS LoKr: kron(w1, w2), each factor whole or as a @ b; alpha / rank applies only when one is factored."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else _need(entry, t, "lokr_w1_a", ctx) @ _need(entry, t, "lokr_w1_b", ctx)
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:  # LyCORIS rebuild_tucker: t (R, R), a (R, out), b (R, in)
        w2 = torch.einsum("ij,ip,jr->pr", t["lokr_t2"], _need(entry, t, "lokr_w2_a", ctx),
                          _need(entry, t, "lokr_w2_b", ctx))
    else:
        w2 = _need(entry, t, "lokr_w2_a", ctx) @ _need(entry, t, "lokr_w2_b", ctx)
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = alpha / rank if rank and alpha is not None else 1.0
    if w1.ndim != 2 or w2.ndim != 2:
        raise CheckpointError(f"{ctx.path}: {entry.key('lokr_w1', 'lokr_w1_a')} gives {w1.ndim}-d Kronecker factors; "
                              "only Linear (2-d) LoKr is supported")
    alpha = alpha if rank else None
    return Piece(entry, Kronecker(w1, w2, scale, rank, alpha), "lokr", rank, alpha)


def _loha(entry: Entry, t: dict[str, Tensor], alpha: float | None, ctx: _Context) -> Piece:
    w1a, w1b, w2a, w2b = (_need(entry, t, f"hada_{w}", ctx) for w in ("w1_a", "w1_b", "w2_a", "w2_b"))
    rank = w1b.shape[0]
    scale = alpha / rank if alpha is not None else 1.0
    return Piece(entry, Hadamard(w1a, w1b, w2a, w2b, scale, alpha), "loha", rank, alpha)


# --- placing updates on the model -----------------------------------------------------------------------------------
def _target(name: str, linears: dict[str, nn.Linear] | None, underscored: dict[str, str]) -> Target | None:
    found = resolve(name)
    if found is not None and (linears is None or found[0].module in linears):
        return found[0]
    if linears and (module := name if name in linears else underscored.get(name)):
        return Target(module)  # a Linear of this model outside the key map: named as it is
    return None


_OUT_ROLES = ("lora_B.weight", "lora_up.weight", "up.weight", "lokr_w1", "lokr_w1_a", "hada_w1_a", "diff", "diff_b")
_IN_ROLES = ("lora_A.weight", "lora_down.weight", "down.weight", "lokr_w1", "lokr_w1_b", "hada_w1_b", "diff")


def _place(piece: Piece, target: Target, linear: nn.Linear, hidden: int, plan: _Plan, ctx: _Context,
           tensors: dict[str, Tensor]) -> None:
    rows = target.rows(linear.out_features, hidden)
    out, inp = piece.update.shape
    n = rows.stop - rows.start
    widens = target.module == "img_in" and inp is not None and inp > linear.in_features
    if out != n or (inp not in (None, linear.in_features) and not widens):
        role = next((r for r in (_OUT_ROLES if out != n else _IN_ROLES) if r in tensors), next(iter(tensors)))
        where = f"{target.module} rows {rows.start}:{rows.stop}" if n != linear.out_features else target.module
        raise CheckpointError(f"{ctx.path}: {piece.entry.keys[role]} has shape {tuple(tensors[role].shape)}, an "
                              f"update of {out}x{inp}, but {where} takes {n}x{linear.in_features} "
                              f"(weight {linear.out_features}x{linear.in_features})")
    if widens:
        plan.widen[target.module] = max(plan.widen.get(target.module, 0), inp)
    if target.swap_halves:  # diffusers' (scale, shift) rows -> BFL's (shift, scale)
        piece.update = _swap_halves(piece.update)
    piece.target, piece.rows = target, rows


def _swap_halves(update: Update) -> Update:
    def swap(t):
        return None if t is None else torch.cat(t.chunk(2)[::-1])

    if isinstance(update, LowRank):
        return LowRank(update.down, swap(update.up), update.scale, swap(update.bias))
    return DenseDelta(swap(update.weight()), swap(update.bias_delta()))


def _plan(lora: LoraFile, state: dict[str, Tensor], model: nn.Module | None) -> _Plan:
    ctx = _context(lora)
    plan = _Plan(unmapped=list(lora.stray))
    linears = None if model is None else {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    underscored = {n.replace(".", "_"): n for n in linears or {}}
    hidden = None if model is None else model.params.hidden_size
    for entry in lora.entries:
        tensors = {role: state[key] for role, key in entry.keys.items()}
        if entry.part != "transformer":
            plan.text.extend(_pieces(entry, tensors, ctx, None))
            continue
        target = _target(entry.module, linears, underscored)
        if target is None:
            plan.unmapped.extend(entry.keys.values())
            continue
        for piece in _pieces(entry, tensors, ctx, target):
            if linears is None:
                piece.target = target
            else:
                _place(piece, target, linears[target.module], hidden, plan, ctx, tensors)
            plan.pieces.append(piece)
    parameters = None if model is None else {n: p for n, p in model.named_parameters()}
    for name, key in lora.raw.items():
        path = _parameter_path(name, parameters)
        if path is None:
            plan.unmapped.append(key)
            continue
        tensor = state[key]
        if parameters is not None and tuple(tensor.shape) != tuple(parameters[path].shape):
            raise CheckpointError(f"{lora.path}: {key} has shape {tuple(tensor.shape)}, but {path} has "
                                  f"{tuple(parameters[path].shape)}")
        plan.replacements[path] = tensor
    return plan


def _parameter_path(name: str, parameters: dict | None) -> str | None:
    if parameters is not None:
        return resolve_parameter(name, set(parameters))
    for ours, theirs in PARAM_RULES:  # no model: any parameter the key map knows
        for pattern in (ours, theirs):
            if m := _regex(pattern).match(name):
                return ours.format(**m.groupdict())
    return None


# --- the adapter ----------------------------------------------------------------------------------------------------
def _report_unmapped(path: Path, keys: list[str], strict: bool) -> None:
    if not keys:
        return
    keys = sorted(keys)
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    message = f"{path}: {len(keys)} key(s) map to no module of the model: {shown}"
    if strict:
        raise CheckpointError(message + " (strict=False applies the rest)")
    logger.warning(message)


def read_lora(path: str | Path, model: nn.Module, *, name: str | None = None, strict: bool = True) -> Adapter:
    """Any supported LoRA file as an Adapter on `model` (not yet applied; see add_adapter / load_lora).

    Keys that map nowhere raise CheckpointError naming them (strict=False: a warning, the rest applies); a file that
    applies to nothing, and an update whose shape does not fit its module, always raise. Text-encoder parts are
    kept in Adapter.text_encoders. A BFL control LoRA (FLUX.1-Canny/Depth-dev-lora) also replaces the norm scales it
    holds and, its img_in update reading more channels than img_in has, asks for img_in to be widened with zero
    columns (Adapter.widen): the model then expects the control image's packed latents concatenated to the image
    tokens on the channel axis, as BFL's flux-dev-canny/depth-lora configs (in_channels 128) do."""
    path = Path(path)
    lora = read_lora_file(path)
    state = load_state_dict(path, dtype=torch.float32)
    plan = _plan(lora, state, model)
    _report_unmapped(path, plan.unmapped, strict)
    if not plan.pieces and not plan.replacements and not plan.text:
        raise CheckpointError(f"{path}: no LoRA update applies to this model")
    by_module: dict[str, list[Piece]] = {}
    for piece in plan.pieces:
        by_module.setdefault(piece.target.module, []).append(piece)
    updates = {}
    for module, pieces in by_module.items():
        linear = model.get_submodule(module)
        updates[module] = join_blocks(linear.out_features, linear.in_features, [(p.rows, p.update) for p in pieces])
    text: dict[str, dict[str, list[Update]]] = {}
    for piece in plan.text:
        text.setdefault(piece.entry.part, {}).setdefault(piece.entry.module, []).append(piece.update)
    text_encoders = {part: {module: join_blocks(us[0].shape[0], 0, [(slice(0, us[0].shape[0]), u) for u in us])
                            for module, us in modules.items()} for part, modules in text.items()}
    return Adapter(name=name or path.stem, updates=updates, source=str(path), format=lora.format,
                   replacements=plan.replacements, widen=plan.widen, text_encoders=text_encoders)


def load_peft(path: str | Path, model: nn.Module, *, name: str, strict: bool = True) -> Adapter:
    """Kept for callers of the first version: every format now reads through read_lora."""
    return read_lora(path, model, name=name, strict=strict)


# --- description ----------------------------------------------------------------------------------------------------
def describe_lora(path: str | Path, model: nn.Module | None = None) -> dict:
    """What a LoRA file holds and, with a model, where each of its modules lands (for `fluxion lora info`)."""
    path = Path(path)
    lora = read_lora_file(path)
    state = load_state_dict(path, dtype=torch.float32)
    plan = _plan(lora, state, model)
    mapping = []
    for piece in plan.pieces:
        t = piece.target
        row = {"file": piece.entry.prefix + piece.entry.module, "kind": piece.kind, "rank": piece.rank,
               "alpha": piece.alpha, "module": t.module}
        if not t.whole:
            row["parts"] = f"{t.first}:{t.last} of {t.parts}"
        if piece.rows is not None:
            row["rows"] = [piece.rows.start, piece.rows.stop]
        mapping.append(row)
    all_pieces = plan.pieces + plan.text
    text = {}
    for entry in {id(p.entry): p.entry for p in plan.text}.values():
        counts = text.setdefault(entry.part, {"modules": 0, "keys": 0})
        counts["modules"] += 1
        counts["keys"] += len(entry.keys)
    return {
        "path": str(path),
        "format": lora.format,
        "split_qkv": _context(lora).split_qkv,
        "ranks": sorted({p.rank for p in all_pieces if p.rank is not None}),
        "alphas": sorted({p.alpha for p in all_pieces if p.alpha is not None}),
        "modules": len({p.entry.module for p in plan.pieces}),
        "targets": len({p.target.module for p in plan.pieces}),
        "mapping": mapping,
        "replacements": sorted(plan.replacements),
        "widened": plan.widen,
        "text_encoder": text,
        "unmapped": sorted(plan.unmapped),
    }
