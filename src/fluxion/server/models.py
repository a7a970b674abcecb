"""The models a server holds: what each accepts (ModelInfo, known without loading its weights) and an LRU of loaded
pipelines (ModelPool)."""

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..settings import SizeRange
from .specs import size_rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What requests to a model are checked against before it is loaded: sizes, defaults, the guidance input."""

    name: str
    variant: str
    sizes: SizeRange | None
    default_size: int
    default_steps: int
    guidance: bool  # has a distilled-guidance input (dev)
    default_guidance: float | None

    def check_size(self, height: int, width: int) -> None:
        from ..pipeline import Pipeline

        Pipeline.check_size(size_rules(self.name, self.sizes), height, width)

    @classmethod
    def from_pipeline(cls, name: str, pipe) -> "ModelInfo":
        d = pipe.defaults
        return cls(name=name, variant=pipe.variant, sizes=pipe.sizes, default_size=d.size,
                   default_steps=d.num_inference_steps, guidance=bool(pipe.transformer.params.guidance_embed),
                   default_guidance=d.guidance_scale)

    @classmethod
    def from_files(cls, name: str) -> "ModelInfo":
        """Read from the model folder's manifest and the transformer file's header only."""
        from ..checkpoints import open_checkpoint
        from ..pipeline import RANDOM_MODEL, VARIANTS, VariantDefaults
        from ..registry import resolve

        if name == RANDOM_MODEL:
            d = VARIANTS["schnell"]
            return cls(name, "schnell", None, 64, d.num_inference_steps, False, None)
        files = resolve(name)
        guidance = bool(open_checkpoint(files.transformer, "transformer").params().guidance_embed)
        variant = files.variant or ("dev" if guidance else "schnell")
        d = VariantDefaults(**{**VARIANTS[variant].__dict__, **(files.defaults or {})})
        return cls(name=name, variant=variant, sizes=files.sizes, default_size=d.size,
                   default_steps=d.num_inference_steps, guidance=guidance, default_guidance=d.guidance_scale)


def load_pipeline(name: str, *, device=None, dtype=None, quantize: str | None = None):
    """The default loader: Pipeline.from_pretrained, quantized if asked (the quantized weights are kept under
    $FLUXION_HOME/quantized after the first start, and the images record the scheme)."""
    from ..pipeline import Pipeline

    return Pipeline.from_pretrained(name, device=device, dtype=dtype, quantize=quantize)


class ModelPool:
    """Loaded pipelines, at most `capacity`, the least recently used evicted first. Only the engine's worker
    thread loads (so loading never races a generation); any thread may ask what is resident."""

    def __init__(self, names: list[str], capacity: int, loader: Callable[[str], object]):
        self.names = list(names)
        self.capacity = capacity
        self.loader = loader
        self._pipes: OrderedDict[str, object] = OrderedDict()
        self._infos: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time (two workers wanting one model load it once)
        self.loading: str | None = None
        self.loads = 0
        self.load_seconds: dict[str, float] = {}

    def known(self, name: str) -> bool:
        return name in self.names

    def resident(self, name: str):
        with self._lock:
            return self._pipes.get(name)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._pipes)

    def info(self, name: str) -> ModelInfo:
        with self._lock:
            info = self._infos.get(name)
            pipe = self._pipes.get(name)
        if info is None:
            info = ModelInfo.from_pipeline(name, pipe) if pipe is not None else ModelInfo.from_files(name)
            with self._lock:
                self._infos[name] = info
        return info

    def get(self, name: str):
        """The pipeline for `name`, loaded now if it is not in memory (evicting the least recently used)."""
        with self._lock:
            pipe = self._pipes.get(name)
            if pipe is not None:
                self._pipes.move_to_end(name)
                return pipe
        with self._load_lock:
            pipe = self.resident(name)
            return pipe if pipe is not None else self._load(name)

    def _load(self, name: str):
        start = time.perf_counter()
        self.loading = name
        try:
            with self._lock:  # make room first: two models' weights need not fit at once
                while len(self._pipes) >= self.capacity:
                    evicted, _ = self._pipes.popitem(last=False)
                    log.info("evicting model %s (LRU of %d)", evicted, self.capacity)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pipe = self.loader(name)
        finally:
            self.loading = None
        with self._lock:
            self._pipes[name] = pipe
            self._infos[name] = ModelInfo.from_pipeline(name, pipe)
            self.loads += 1
            self.load_seconds[name] = time.perf_counter() - start
        log.info("loaded model %s in %.1f s", name, self.load_seconds[name])
        return pipe
