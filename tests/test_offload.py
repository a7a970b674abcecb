"""Offload (fluxion.offload) on the CPU: the execution "device" is the CPU too, but every move makes a real copy, so
a weight is on the device when its storage is not its home's. A recorder logs, around each hooked module's forward,
which units or models are resident, and a TorchFunctionMode fails any op that reads a weight (or a LoRA factor)
while it is at home. Generations with offload are the plain ones bit for bit. VAE slicing is here too."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fluxion.errors import InputError
from fluxion.offload import (block_units, device_weight_bytes, disable_offload, enable_model_offload, enable_offload,
                             enable_sequential_offload)
from fluxion.pipeline import Pipeline
from fluxion.slicing import decode_sliced

METADATA = {"device", "dtype", "shape", "data", "data_ptr", "is_pinned", "element_size", "numel", "dim", "size"}
KW = dict(seed=0, num_images_per_prompt=2, num_inference_steps=3)


def _name(func) -> str:
    return func.__self__.__name__ if func.__name__ in ("__get__", "__set__") else func.__name__


class Watch(TorchFunctionMode):
    """Records every op that reads a watched tensor while its storage is its home (the CPU copy). Paused while the
    offload hooks themselves run: they read homes to copy them."""

    def __init__(self, tensors):
        super().__init__()
        self.home = {id(t): t.data_ptr() for t in tensors}
        self.paused, self.reads = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and _name(func) not in METADATA:
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor) and self.home.get(id(a)) == a.data_ptr():
                    self.reads.append(_name(func))
        return func(*args, **(kwargs or {}))


def _tensors(module):
    from fluxion.offload import _own_tensors

    return [t for m in module.modules() for _, _, t in _own_tensors(m)]


def _away(module, homes) -> bool:
    """Whether any of the module's tensors is on the device (its storage is not its home)."""
    return any(t.data_ptr() != homes[id(t)] for t in _tensors(module))


def _record(hooked: dict[str, torch.nn.Module], groups: dict[str, torch.nn.Module], watch: Watch):
    """Around each hooked module's forward, after the offload pre-hook and before its post-hook, log (module name,
    names of the resident groups); also pause `watch` while the offload hooks run."""
    homes = {id(t): t.data_ptr() for g in groups.values() for t in _tensors(g)}
    log, handles = [], []

    def pause(*_):
        watch.paused += 1

    def resume_and_log(name, when):
        def hook(*_):
            watch.paused -= 1
            log.append((name, when, sorted(g for g, m in groups.items() if _away(m, homes))))
        return hook

    def log_and_pause(name, when):
        def hook(*_):
            log.append((name, when, sorted(g for g, m in groups.items() if _away(m, homes))))
            watch.paused += 1
        return hook

    for name, m in hooked.items():
        handles += [m.register_forward_pre_hook(pause, prepend=True),
                    m.register_forward_pre_hook(resume_and_log(name, "in")),
                    m.register_forward_hook(log_and_pause(name, "out"), prepend=True),
                    m.register_forward_hook(lambda *_: setattr(watch, "paused", watch.paused - 1))]
    return log, handles


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("tiny-dev", device="cpu")


def _models(pipe):
    return {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "autoencoder": pipe.autoencoder}


def test_sequential_offload_moves_one_block_at_a_time_and_changes_nothing(pipe):
    plain = pipe("a red circle", output_type="latent", **KW)
    t = pipe.transformer
    units = {f"unit{i}": u for i, u in enumerate(block_units(t))}
    watch = Watch(_tensors(t))
    offload = enable_sequential_offload(t, "cpu")
    log, handles = _record(units, units, watch)  # after the offload hooks: it sees what they did
    try:
        with watch:
            got = pipe("a red circle", output_type="latent", **KW)
        # every unit ran, and during its forward it alone was on the device (pe_embedder has no weights)
        assert {name for name, _, _ in log} == set(units) and watch.reads == []
        assert all(resident == ([name] if _tensors(units[name]) else []) for name, _, resident in log)
        assert offload.resident() == []
        assert torch.equal(got, plain)
    finally:
        for h in handles:
            h.remove()
        disable_offload(t)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in t.modules())
    assert torch.equal(pipe("a red circle", output_type="latent", **KW), plain)


def test_model_offload_keeps_one_model_resident_and_uploads_each_once_per_job(pipe):
    pipe.text_encoder.cache_clear()
    plain = pipe("a blue square", output_type="pt", **KW)
    pipe.text_encoder.cache_clear()
    models = _models(pipe)
    watch = Watch([t for m in models.values() for t in _tensors(m)])
    offload = enable_model_offload(models, "cpu")
    hooked = {f"{g}:{i}": m for g, model in models.items() for i, m in enumerate([model, *block_units(model)])}
    log, handles = _record(hooked, models, watch)
    try:
        with watch:
            got = pipe("a blue square", output_type="pt", **KW)
        assert watch.reads == [] and torch.equal(got, plain)
        ran = [name.split(":")[0] for name, _, _ in log]
        assert ran.index("text_encoder") < ran.index("transformer") < ran.index("autoencoder")
        assert all(resident == [name.split(":")[0]] for name, _, resident in log)
        # 3 steps, one upload: the transformer stays until the VAE starts; the VAE stays until evicted
        assert {g: u.uploads for g, u in offload.groups.items()} == {"text_encoder": 1, "transformer": 1,
                                                                    "autoencoder": 1}
        assert offload.resident() == [pipe.autoencoder]
        offload.evict()
        assert offload.resident() == []
    finally:
        for h in handles:
            h.remove()
        disable_offload(pipe.transformer)
    assert not any(m._forward_hooks or m._forward_pre_hooks for model in models.values() for m in model.modules())


def test_every_model_offloaded_layer_by_layer_reads_no_weight_at_home(pipe):
    """enable_offload("sequential"): Flux by blocks, MiniLM and the VAE by layers (their sub-blocks are not all
    called as modules)."""
    pipe.text_encoder.cache_clear()
    plain = pipe("a green triangle", output_type="pt", **KW)
    pipe.text_encoder.cache_clear()
    models = _models(pipe)
    watch = Watch([t for m in models.values() for t in _tensors(m)])
    handles = enable_offload("sequential", models, "cpu")
    for offload in handles:  # the hooks read homes to copy them: pause the watch around them
        for unit in offload.units():
            unit.module.register_forward_pre_hook(lambda *_: setattr(watch, "paused", watch.paused + 1),
                                                  prepend=True)
            unit.module.register_forward_pre_hook(lambda *_: setattr(watch, "paused", watch.paused - 1))
            unit.module.register_forward_hook(lambda *_: setattr(watch, "paused", watch.paused + 1), prepend=True)
            unit.module.register_forward_hook(lambda *_: setattr(watch, "paused", watch.paused - 1))
    try:
        with watch:
            got = pipe("a green triangle", output_type="pt", **KW)
        assert watch.reads == [] and torch.equal(got, plain)
        assert all(o.resident() == [] for o in handles)
    finally:
        for model in models.values():
            disable_offload(model)
            for m in model.modules():
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()


@pytest.mark.parametrize("hotswap", [False, True])
def test_offload_composes_with_lora_and_the_step_caches(pipe, hotswap):
    from fluxion.lora import enable_hotswap

    t = pipe.transformer
    pipe.load_lora("star", scale=0.8)
    try:
        if hotswap:
            enable_hotswap(t, rank=64)
        expected = {cache: pipe("a star", output_type="latent", cache=cache, **KW) for cache in (None, "fbcache")}
        for mode in ("sequential", "model"):
            watch = Watch(_tensors(t))  # LoRA factors (plain hooks) or slots (hot-swap) included
            enable_offload(mode, {"transformer": t}, "cpu")
            for cache, plain in expected.items():
                log, handles = _record({"t": t}, {"t": t}, watch) if mode == "model" else ([], [])
                try:
                    with watch:
                        assert torch.equal(pipe("a star", output_type="latent", cache=cache, **KW), plain)
                finally:
                    for h in handles:
                        h.remove()
                assert [r for r in watch.reads] == []
            disable_offload(t)
    finally:
        pipe.unload_loras()
    assert not hasattr(t, "_fluxion_lora")


def test_fusing_under_model_offload_changes_the_weights_at_home(pipe):
    """A latent-only job leaves the transformer resident; fusing must not be lost when it goes home."""
    pipe.load_lora("star", scale=0.8)
    try:
        with_lora = pipe("a star", output_type="latent", **KW)
        pipe.fuse_loras()
        fused = pipe("a star", output_type="latent", **KW)
        pipe.unfuse_loras()
        offload = enable_model_offload({"transformer": pipe.transformer}, "cpu")
        assert torch.equal(pipe("a star", output_type="latent", **KW), with_lora)
        assert offload.resident() == [pipe.transformer]
        pipe.fuse_loras()
        assert torch.equal(pipe("a star", output_type="latent", **KW), fused)
        pipe.unfuse_loras()
        assert torch.equal(pipe("a star", output_type="latent", **KW), with_lora)
    finally:
        disable_offload(pipe.transformer)
        pipe.unload_loras()


def test_offload_refuses_incomplete_units_and_double_enabling(pipe):
    t = pipe.transformer
    with pytest.raises(InputError, match=r"\d+ not held \['img_in.weight'"):
        enable_sequential_offload(t, "cpu", units=list(t.single_blocks))
    assert not any(m._forward_pre_hooks for m in t.modules()) and not hasattr(t, "_fluxion_offload")
    enable_sequential_offload(t, "cpu")
    try:
        with pytest.raises(InputError, match="offloaded already"):
            enable_model_offload({"transformer": t}, "cpu")
    finally:
        disable_offload(t)
    with pytest.raises(InputError, match="offload must be"):
        enable_offload("disk", {"t": t}, "cpu")


def test_device_weight_bytes_per_mode(pipe):
    models = _models(pipe)
    sizes = {k: sum(p.numel() * p.element_size() for p in (*m.parameters(), *m.buffers())) for k, m in models.items()}
    assert device_weight_bytes(models, None) == sum(sizes.values())
    assert device_weight_bytes(models, "model") == max(sizes.values())
    block = max(sum(p.numel() * p.element_size() for p in u.parameters()) for u in block_units(pipe.transformer))
    assert block <= device_weight_bytes(models, "sequential") < max(sizes.values())


def test_sliced_decode_equals_the_batched_one(pipe):
    z = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched = pipe.autoencoder.decode(z)
        sliced = decode_sliced(pipe.autoencoder, z)
        tiled = decode_sliced(pipe.autoencoder, z, tiled=True)
    # batch 1 and batch 3 convolutions round differently in fp32: far below one 8-bit level (2/255)
    torch.testing.assert_close(sliced, batched, rtol=0, atol=1e-4)
    torch.testing.assert_close(tiled, pipe.autoencoder.decode_tiled(z), rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sequential_offload_on_cuda_matches_and_keeps_one_block():
    pipe = Pipeline.from_pretrained("tiny-dev", device="cuda", dtype="fp32")
    plain = pipe("a red circle", output_type="latent", **KW)
    pipe.transformer.to("cpu")
    enable_sequential_offload(pipe.transformer, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = pipe("a red circle", output_type="latent", **KW)
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert torch.cuda.max_memory_allocated() - base < weights
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-5)
