"""torch.compile (inductor) for the Flux transformer, region by region.

What is compiled: the forward of each double- and single-stream block and of the final layer ("regional"
compilation). Blocks of one kind share their code, so there is one graph per kind and input shape, three in all,
however deep the model: FLUX.1's 57 blocks compile as fast as the debug model's 4. The rest stays eager: the loop
over the blocks and `embed` (one small step per call; its RoPE is complex arithmetic, which inductor leaves to eager
kernels anyway). That keeps two things working: the step caches (fluxion.cache calls embed, the blocks and the final
layer one by one, so they get the compiled code too) and the offload hooks (fluxion.offload runs them around the
embedders, blocks and final layer, outside the compiled code; inside it, dynamo would trace their weight moves).

Shapes: with dynamic=False (the default) each input shape (batch, image and text tokens) compiles once and is
reused by every later step and call: the timestep and guidance are tensors, so neither a new step nor a new guidance
scale recompiles. torch._dynamo keeps at most `torch._dynamo.config.recompile_limit` (8) shapes per region; beyond
that, new shapes run eagerly. dynamic=None lets torch switch to shape-generic code at the second shape instead.

Freezing (inductor's `freezing`: weights become constants, folded and pre-packed) is off by default: on the 2-core
CPU it was no faster than plain compilation (benchmarks/compile.py: within 0-5% at every size, fp32 and bf16), and
it cannot see a weight changed in place after compiling. Rule: freeze only a model whose weights never change;
fluxion.lora refuses to fuse, unfuse or hot-swap on a frozen model, and compile_transformer refuses to freeze one
with adapters or hot-swap slots.

Speed (benchmarks/compile.py, 2-core AMD EPYC, 1 thread): one forward 1.01-1.15x faster than eager at the three
benchmark sizes, fp32 and bf16 (the matmuls, which inductor leaves to the same kernels, are most of the time);
the first call compiles for 20-30 s with an empty inductor cache, 2-8 s with a warm one.

LoRA: plain adapters are forward hooks that torch.compile guards on (we turn on dynamo's hook guards, which it skips
by default: a hook added after compiling would otherwise be silently left out), so loading one or changing a scale
recompiles, counted against the recompile limit. `lora_rank=R` puts the model in hot-swap mode first
(fluxion.lora.enable_hotswap: fixed zero-padded slots on every Linear): adapters up to rank R then load, switch,
scale, fuse and go without any recompile. A diffusers/PEFT file of rank r needs R >= 4r: its q, k, v and MLP parts
of a single block's linear1 stack into one update of rank 4r.
"""

from dataclasses import dataclass

import torch

from .errors import InputError
from .model import Flux


@dataclass(frozen=True)
class CompileSettings:
    """What a compiled transformer carries (transformer._fluxion_compiled)."""

    dynamic: bool | None
    freezing: bool
    backend: object


def compile_transformer(transformer: Flux, *, dynamic: bool | None = False, freezing: bool = False,
                        lora_rank: int | None = None, backend="inductor") -> Flux:
    """Compile `transformer` in place (regions: see the module docstring) and return it. Compilation happens at
    the first call of each shape. lora_rank: enable LoRA hot-swap slots of this rank first. backend: a
    torch.compile backend (tests count compilations with their own)."""
    from .lora import enable_hotswap, hotswap_rank, loaded_adapters

    if is_compiled(transformer):
        raise InputError("this transformer is compiled already; uncompile(transformer) first to change settings")
    if freezing and (lora_rank or hotswap_rank(transformer) or loaded_adapters(transformer)):
        raise InputError("freezing folds the weights into the compiled code, so LoRA adapters and hot-swap slots "
                         "could not change them: compile without freezing to use LoRA")
    if lora_rank and hotswap_rank(transformer) is None:
        enable_hotswap(transformer, lora_rank)
    options = {"freezing": freezing} if backend == "inductor" else None
    if freezing and options is None:
        raise InputError("freezing is an inductor option: use backend='inductor'")

    # dynamo skips guards on modules' (empty) hook dicts by default, so a LoRA hook added to a Linear after the
    # first compile would be silently left out of the compiled code: guard on them (process-wide; it only adds
    # guards, checked in microseconds)
    torch._dynamo.config.skip_nnmodule_hook_guards = False

    def compiled(fn):
        return torch.compile(fn, dynamic=dynamic, backend=backend, options=options)

    # instance attributes shadow the class's methods, so Flux.forward and the step caches call the compiled code,
    # while the blocks' own hooks (offload) still run around it in Module.__call__
    for block in (*transformer.double_blocks, *transformer.single_blocks):
        block.forward = compiled(block.forward)
    final = compiled(transformer.final_layer.forward)
    # contiguous: the full path passes a slice of the joint sequence, a cached step a fresh tensor; one layout, one
    # graph (dynamo specialises on strides)
    transformer.final_layer.forward = lambda x, vec: final(x.contiguous(), vec)
    transformer._fluxion_compiled = CompileSettings(dynamic=dynamic, freezing=freezing, backend=backend)
    return transformer


def is_compiled(transformer: Flux) -> bool:
    return getattr(transformer, "_fluxion_compiled", None) is not None


def uncompile(transformer: Flux) -> Flux:
    """Back to the eager methods (hot-swap mode, if any, stays: fluxion.lora.disable_hotswap ends it)."""
    for module in (*transformer.double_blocks, *transformer.single_blocks, transformer.final_layer):
        module.__dict__.pop("forward", None)
    transformer.__dict__.pop("_fluxion_compiled", None)
    return transformer
