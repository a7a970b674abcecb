"""One table of where LoRA files' module names land in our (BFL) Flux, built from the checkpoint key map: BFL names
(dotted, or with "_" as kohya and LyCORIS write them), diffusers names (dotted or "_"), XLabs processor names;
plus the key prefixes of every tool and the suffix grammar of their tensor keys."""

import re
from dataclasses import dataclass
from functools import lru_cache

from ..checkpoints.keymaps import TRANSFORMER_KEYMAP, _regex


@dataclass(frozen=True)
class ModuleRule:
    """One Linear of ours and its diffusers name(s); several names mean ours stacks theirs on rows, sized as the
    key map says ("hidden", "rest"; equal parts if no sizes)."""

    ours: str  # pattern with {i}
    theirs: tuple[str, ...]
    sizes: tuple[str, ...] = ()
    swap_halves: bool = False  # BFL's final adaLN emits (shift, scale), diffusers' (scale, shift)


MODULE_RULES = tuple(
    ModuleRule(r.ours.removesuffix(".weight"), tuple(t.removesuffix(".weight") for t in r.theirs), r.sizes,
               r.op == "swap_halves")
    for r in TRANSFORMER_KEYMAP.rules if r.ours.endswith(".weight") and r.op != "conv1x1")

# Parameters a file may replace whole (BFL control LoRAs' norm scales): ours <- diffusers, single tensors only.
PARAM_RULES = tuple((r.ours, r.theirs[0]) for r in TRANSFORMER_KEYMAP.rules if len(r.theirs) == 1 and r.op == "copy")

# XLabs x-flux (src/flux/modules/layers.py): DoubleStreamBlockLoraProcessor adds qkv_lora1/proj_lora1 to the image
# stream's qkv and proj, qkv_lora2/proj_lora2 to the text stream's; proj_lora output is gated like proj's, so each is
# exactly a LoRA on that Linear. SingleStreamBlockLoraProcessor adds qkv_lora to the q, k, v rows of linear1 (parts
# 0-2 of [q; k; v; mlp_in]) and proj_lora, which reads [attn; mlp], to linear2. Their network_alpha is never saved
# (scale 1). x-flux's own loader multiplies both down and up by its lora_weight (weight squared, in effect); the user
# scale here is linear, as in diffusers.
XLABS_NAMES = (  # (XLabs module, our Linear, (first part, last part) of our Linear's rows or None for all)
    ("double_blocks.{i}.processor.qkv_lora1", "double_blocks.{i}.img_attn.qkv", None),
    ("double_blocks.{i}.processor.proj_lora1", "double_blocks.{i}.img_attn.proj", None),
    ("double_blocks.{i}.processor.qkv_lora2", "double_blocks.{i}.txt_attn.qkv", None),
    ("double_blocks.{i}.processor.proj_lora2", "double_blocks.{i}.txt_attn.proj", None),
    ("single_blocks.{i}.processor.qkv_lora", "single_blocks.{i}.linear1", (0, 3)),
    ("single_blocks.{i}.processor.proj_lora", "single_blocks.{i}.linear2", None),
)

# Key prefixes (tried longest first) and the model part the rest of the key names a module of. Flux has two text
# encoders: kohya's lora_te1 (lora_te) is CLIP-L, sd-scripts' lora_te3 is T5-XXL (lora_te2 in older tools).
PREFIXES = {
    "text_encoders.clip_l.transformer.": "clip_l", "text_encoders.t5xxl.transformer.": "t5",
    "model.diffusion_model.": "transformer", "base_model.model.": "transformer", "diffusion_model.": "transformer",
    "lora_transformer_": "transformer", "transformer.": "transformer", "lora_unet_": "transformer",
    "lycoris_": "transformer", "text_encoder_2.": "t5", "text_encoder.": "clip_l",
    "lora_te1_": "clip_l", "lora_te2_": "t5", "lora_te3_": "t5", "lora_te_": "clip_l",
}
_PREFIX_ORDER = sorted(PREFIXES, key=len, reverse=True)

# A tensor key is <prefix><module>.<role>; roles of LoRA (PEFT, kohya, XLabs, split kohya), LyCORIS LoKr/LoHa,
# ComfyUI diffs, and DoRA (which we refuse, by name).
ROLE = re.compile(r"(?P<module>.+?)\.(?P<role>lora_[AB]\.weight|lora_B\.bias|lora_(?:down|up)(?:\.\d+)?\.weight|"
                  r"alpha|(?:down|up)\.weight|lokr_(?:w[12](?:_[ab])?|t2)|hada_(?:w[12]_[ab]|t[12])|diff_b|diff|"
                  r"dora_scale)")


@dataclass(frozen=True)
class Target:
    """Where a file's module lands: rows of parts [first, last) of our Linear `module`, whose `parts` row blocks are
    sized as its key-map rule says; halves swapped when the name is diffusers' norm_out."""

    module: str
    first: int = 0
    last: int = 1
    parts: int = 1
    sizes: tuple[str, ...] = ()
    swap_halves: bool = False

    @property
    def whole(self) -> bool:
        return self.first == 0 and self.last == self.parts

    def part_rows(self, out_features: int, hidden: int) -> list[slice]:
        """The rows of each of the module's parts."""
        if self.sizes:
            rest = out_features - hidden * sum(s == "hidden" for s in self.sizes)
            lengths = [hidden if s == "hidden" else rest for s in self.sizes]
        else:
            lengths = [out_features // self.parts] * self.parts
        starts = [sum(lengths[:k]) for k in range(self.parts)]
        return [slice(a, a + n) for a, n in zip(starts, lengths)]

    def rows(self, out_features: int, hidden: int) -> slice:
        parts = self.part_rows(out_features, hidden)
        return slice(parts[self.first].start, parts[self.last - 1].stop)


@dataclass(frozen=True)
class _Name:
    pattern: re.Pattern
    scheme: str  # "bfl", "diffusers" or "xlabs"
    rule: ModuleRule
    first: int
    last: int


@lru_cache(maxsize=1)
def _names() -> tuple[_Name, ...]:
    names = []
    for rule in MODULE_RULES:
        for pattern in (rule.ours, rule.ours.replace(".", "_")):
            names.append(_Name(_regex(pattern), "bfl", rule, 0, len(rule.theirs)))
        for k, theirs in enumerate(rule.theirs):
            for pattern in (theirs, theirs.replace(".", "_")):
                names.append(_Name(_regex(pattern), "diffusers", rule, k, k + 1))
    by_ours = {rule.ours: rule for rule in MODULE_RULES}
    for xlabs, ours, span in XLABS_NAMES:
        rule = by_ours[ours]
        first, last = span or (0, len(rule.theirs))
        names.append(_Name(_regex(xlabs), "xlabs", rule, first, last))
    return tuple(names)


@lru_cache(maxsize=8192)
def resolve(name: str) -> tuple[Target, str] | None:
    """(target, naming scheme) of a module name as a file writes it (prefix removed), or None."""
    for entry in _names():
        m = entry.pattern.match(name)
        if m:
            rule = entry.rule
            return Target(rule.ours.format(**m.groupdict()), entry.first, entry.last, len(rule.theirs), rule.sizes,
                          rule.swap_halves and entry.scheme == "diffusers"), entry.scheme
    return None


def module_rule(module: str) -> tuple[ModuleRule, dict[str, str]] | None:
    """The rule of one of our Linears and its block indices."""
    for rule in MODULE_RULES:
        m = _regex(rule.ours).match(module)
        if m:
            return rule, m.groupdict()
    return None


def diffusers_names(module: str) -> list[tuple[str, Target]]:
    """Our Linear as diffusers names it: one name per row block (to_q, to_k, to_v for a qkv)."""
    found = module_rule(module)
    if found is None:
        return []
    rule, index = found
    return [(theirs.format(**index), Target(module, k, k + 1, len(rule.theirs), rule.sizes, rule.swap_halves))
            for k, theirs in enumerate(rule.theirs)]


def resolve_parameter(name: str, parameters: set[str]) -> str | None:
    """Our parameter path for a full tensor a file holds under our name or diffusers'."""
    if name in parameters:
        return name
    for ours, theirs in PARAM_RULES:
        m = _regex(theirs).match(name)
        if m and (path := ours.format(**m.groupdict())) in parameters:
            return path
    return None


def diffusers_parameter(path: str) -> str | None:
    for ours, theirs in PARAM_RULES:
        m = _regex(ours).match(path)
        if m:
            return theirs.format(**m.groupdict())
    return None


def split_prefix(key: str) -> tuple[str, str, str]:
    """(prefix, model part, rest) of a tensor key; no known prefix means a transformer key in our or diffusers'
    naming (BFL control LoRAs, XLabs)."""
    for prefix in _PREFIX_ORDER:
        if key.startswith(prefix):
            return prefix, PREFIXES[prefix], key[len(prefix):]
    return "", "transformer", key


# Hugging Face text-encoder Linear names as kohya writes them ("." -> "_"), back to dotted, for layouts that need dots
_TEXT_MODULES = (
    (re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"),
     "text_model.encoder.layers.{0}.{1}.{2}"),
    (re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wo)"),
     "encoder.block.{0}.layer.{1}.{2}.{3}"),
)


def dotted_text_module(name: str) -> str | None:
    if "." in name:
        return name
    for pattern, dotted in _TEXT_MODULES:
        m = pattern.fullmatch(name)
        if m:
            return dotted.format(*m.groups())
    return None
