"""Training batches: a resumable bucketed stream of dataset indices, and the cache of frozen features (VAE latents,
MiniLM states) that transformer stages read instead of re-rendering and re-encoding every step."""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints.io import load_state_dict, read_checkpoint_info, save_state_dict
from ..data import BucketBatchSampler, ShapesDataset, collate
from ..data.captions import caption_wordings
from ..errors import InputError
from ..model import AutoEncoder

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ENCODE_BATCH = 64


class BatchStream:
    """Endless batches of indices, each from one bucket, in BucketBatchSampler's seeded order. Its position
    (epoch, batch within the epoch) goes into checkpoints, so a resumed run draws the same batches."""

    def __init__(self, dataset: ShapesDataset, batch_size: int, seed: int):
        self.sampler = BucketBatchSampler(dataset, batch_size, seed=seed, drop_last=True)
        if len(self.sampler) == 0:
            raise InputError(f"data.num_images={len(dataset)} gives no full batch of {batch_size} in any of the "
                             f"{len(dataset.buckets)} buckets; raise data.num_images or lower run.batch_size")
        self.epoch, self.index = 0, 0
        self._order: list[list[int]] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        batch = self._order[self.index]
        self.index += 1
        if self.index == len(self._order):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def bucket_indices(dataset: ShapesDataset, count: int) -> list[list[int]]:
    """The first `count` dataset indices grouped by bucket (index i is in bucket i % K)."""
    k = len(dataset.buckets)
    return [list(range(b, count, k)) for b in range(k)]


@dataclass
class FeatureCache:
    """Frozen inputs of transformer training for dataset items 0..N-1: scaled VAE latents (posterior means) and
    the MiniLM states of their captions, stored once per distinct caption (zero padding trimmed)."""

    latents: list[Tensor]  # per bucket b: (N_b, 16, h, w); item i is latents[i % K][i // K]
    caption_ids: Tensor  # (N,) or (N, C): rows of txt/vec, C captions per item
    txt: Tensor  # (U, L_used, D): token states up to the longest caption; the rest are zeros
    vec: Tensor  # (U, Dv)
    empty_txt: Tensor  # (1, L, D): the empty caption "" (dropped captions, the CFG negative)
    empty_vec: Tensor  # (1, Dv)

    @property
    def text_length(self) -> int:
        return self.empty_txt.shape[1]

    def batch(self, indices: list[int], epoch: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Items of one bucket -> latents (B, 16, h, w), txt (B, L, D), vec (B, Dv). With C captions per item,
        item i reads caption (epoch + i) % C, so every caption is read once in C epochs."""
        k = len(self.latents)
        buckets = {i % k for i in indices}
        if len(buckets) != 1:
            raise InputError(f"a batch must come from one bucket, got buckets {sorted(buckets)}")
        latents = self.latents[indices[0] % k][torch.tensor([i // k for i in indices])]
        rows = self.caption_ids[torch.tensor(indices)]
        if rows.ndim == 2:
            rows = rows[torch.arange(len(indices)), (epoch + torch.tensor(indices)) % rows.shape[1]]
        txt = torch.zeros(len(indices), self.text_length, self.txt.shape[-1], dtype=self.txt.dtype)
        txt[:, : self.txt.shape[1]] = self.txt[rows]
        return latents, txt, self.vec[rows]

    def to_tensors(self) -> dict[str, Tensor]:
        out = {f"latents.{b}": t for b, t in enumerate(self.latents)}
        return out | {"caption_ids": self.caption_ids, "txt": self.txt, "vec": self.vec,
                      "empty_txt": self.empty_txt, "empty_vec": self.empty_vec}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "FeatureCache":
        n = sum(k.startswith("latents.") for k in tensors)
        return cls([tensors[f"latents.{b}"] for b in range(n)], tensors["caption_ids"], tensors["txt"],
                   tensors["vec"], tensors["empty_txt"], tensors["empty_vec"])


def _image_fields(dataset: ShapesDataset) -> dict:
    """What the rendered images depend on (scenes are drawn before their captions, so not on the captions)."""
    return {"version": CACHE_VERSION, "data_seed": dataset.seed, "length": len(dataset), "buckets": dataset.buckets,
            "held_out": dataset.allow_held_out, "shapes": dataset.shapes, "p_relation": dataset.p_relation,
            # only when not the default, so caches built before layouts existed stay valid
            **({"layout": dataset.layout} if dataset.layout != "spread" else {}),
            **({"teach": dataset.teach, "teach_images": dataset.teach_images} if dataset.teach else {})}


def _key(autoencoder_path: Path, fields: dict) -> str:
    h = hashlib.sha256(autoencoder_path.read_bytes())
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


def latents_key(autoencoder_path: Path, dataset: ShapesDataset) -> str:
    """What the cached latents depend on: the VAE file's bytes and the dataset's images."""
    return _key(autoencoder_path, _image_fields(dataset))


def cache_key(autoencoder_path: Path, dataset: ShapesDataset, text_encoder) -> str:
    """What all the cached features depend on: the latents' inputs, the captions and the text encoder."""
    return _key(autoencoder_path, _image_fields(dataset) | {
        "text": type(text_encoder).__name__, "text_length": text_encoder.max_length,
        "text_dim": text_encoder.context_dim,
        # varied captions depend on the wordings too: a changed grammar must not reuse a cache
        **({"captions": dataset.caption_mode, "captions_per_image": dataset.captions_per_image,
            "wordings": caption_wordings(dataset.caption_mode)}
           if (dataset.caption_mode, dataset.captions_per_image) != ("templates", 1) else {}),
        **({"balance_order": True} if dataset.balance_order else {})})


@torch.no_grad()
def build_feature_cache(dataset: ShapesDataset, autoencoder: AutoEncoder, text_encoder, device: torch.device,
                        progress: bool = True, latents: list[Tensor] | None = None) -> FeatureCache:
    """Render and encode every dataset item in fixed batches (the result does not depend on how training later
    batches them) and encode each distinct caption once. Given `latents` (another cache's, of the same images),
    only the captions are encoded."""
    n, per_item = len(dataset), dataset.captions_per_image
    captions = [dataset.captions(i) if per_item > 1 else [dataset.scene(i)[1]]
                for i in tqdm(range(n), desc="captions", disable=not progress or latents is None, leave=False)]
    if latents is None:
        latents = []
        bar = tqdm(total=n, desc="encoding images", disable=not progress, leave=False)
        for group in bucket_indices(dataset, n):
            parts = []
            for start in range(0, len(group), ENCODE_BATCH):
                chunk = group[start:start + ENCODE_BATCH]
                x, _ = collate([dataset[i] for i in chunk])
                parts.append(autoencoder.encode(x.to(device, torch.float32)).float().cpu())
                bar.update(len(chunk))
            latents.append(torch.cat(parts))
        bar.close()

    distinct = sorted({c for item in captions for c in item})
    row = {c: r for r, c in enumerate(distinct)}
    # In batches (encode_uncached where the encoder has it: its per-prompt cache and one-by-one runs are for
    # serving); a caption's states then differ from a lone run's by float rounding only.
    encode = getattr(text_encoder, "encode_uncached", text_encoder.encode)
    # Each batch trimmed to the positions it uses, then copied into one tensor as the batches are freed: the peak
    # stays near the states' trimmed size (192000 captions: ~8 GB), where a list, its concatenation and the
    # trimmed copy held up to three.
    pieces, vec = [], []
    for start in tqdm(range(0, len(distinct), ENCODE_BATCH), desc="encoding captions", disable=not progress,
                      leave=False):
        t, v = encode(distinct[start:start + ENCODE_BATCH])
        nonzero = t.abs().amax(dim=(0, 2)) > 0  # (L,): positions any caption of the batch uses
        pieces.append(t[:, : int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1].float().cpu().clone())
        vec.append(v.float().cpu())
    txt = torch.zeros(len(distinct), max(p.shape[1] for p in pieces), pieces[0].shape[-1])
    for i, start in enumerate(range(0, len(distinct), ENCODE_BATCH)):
        piece, pieces[i] = pieces[i], None
        txt[start:start + len(piece), : piece.shape[1]] = piece
    empty_txt, empty_vec = text_encoder.encode([""])
    ids = torch.tensor([[row[c] for c in item] for item in captions])
    return FeatureCache(latents, ids[:, 0] if per_item == 1 else ids, txt, torch.cat(vec), empty_txt.float().cpu(),
                        empty_vec.float().cpu())


def load_or_build_feature_cache(cache_dir: Path, autoencoder_path: Path, dataset: ShapesDataset,
                                autoencoder: AutoEncoder, text_encoder, device: torch.device,
                                progress: bool = True) -> FeatureCache:
    """The cache file for these inputs under cache_dir, built (and written atomically) if missing."""
    key = cache_key(autoencoder_path, dataset, text_encoder)
    path = cache_dir / f"features-{key[:16]}.safetensors"
    if path.is_file() and read_checkpoint_info(path).metadata.get("fluxion.cache_key") == key:
        log.info("frozen features from %s", path)
        return FeatureCache.from_tensors(load_state_dict(path))
    images = latents_key(autoencoder_path, dataset)
    latents = _latents_of(cache_dir, images)
    log.info("encoding %s into %s", f"the captions of {len(dataset)} images (the latents from a cache of the same "
             "images)" if latents else f"{len(dataset)} images and their captions", path)
    cache = build_feature_cache(dataset, autoencoder, text_encoder, device, progress, latents)
    save_state_dict(cache.to_tensors(), path, metadata={"fluxion.cache_key": key, "fluxion.latents_key": images})
    return cache


def _latents_of(cache_dir: Path, images: str) -> list[Tensor] | None:
    """The latents of a cache in cache_dir of the same images (built with other captions or text settings)."""
    for path in sorted(cache_dir.glob("features-*.safetensors")):
        if read_checkpoint_info(path).metadata.get("fluxion.latents_key") == images:
            tensors = load_state_dict(path, prefix="latents.")
            return [tensors[f"latents.{b}"] for b in range(len(tensors))]
    return None
