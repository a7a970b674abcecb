"""The four stages of the in-house family: what each one trains, on which batches, with which objective, and
what it ships. loop.py runs any of them the same way."""

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..checkpoints import check_state_dict, load_autoencoder, load_transformer, params_metadata, save_state_dict
from ..data import ShapesDataset, collate
from ..lora import add_adapter, unload_adapters
from ..model import AutoEncoder, Flux
from ..model.layers import timestep_embedding
from ..pipeline import tensor_to_images
from ..sampling import image_ids, pack, schedule_mu, text_ids
from . import objectives
from .adapter import LoRAWeights
from .batches import ENCODE_BATCH, BatchStream, FeatureCache, bucket_indices, load_or_build_feature_cache
from .config import ConfigError, TrainConfig
from .export import AUTOENCODER_FILE, TRANSFORMER_FILE, base_model_name, copy_file, write_manifest
from .plots import image_grid

log = logging.getLogger(__name__)


def _dataset(cfg: TrainConfig) -> ShapesDataset:
    # held-out pairs and the star stay out of training (ShapesDataset's default)
    return ShapesDataset(seed=cfg.data.seed, length=cfg.data.num_images,
                         buckets=[tuple(b) for b in cfg.data.buckets], p_relation=cfg.data.p_relation,
                         layout=cfg.data.layout, shapes=tuple(cfg.data.shapes), teach=cfg.data.teach or None,
                         teach_images=cfg.data.teach_images or None, captions=cfg.data.captions,
                         captions_per_image=cfg.data.captions_per_image, balance_order=cfg.data.balance_order)


def _randn(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    """Noise from the run's CPU generator (same numbers on any device), moved next to `like`."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


# -- stage 1: the autoencoder ---------------------------------------------------------------------------------------
class VAEStage:
    """The FLUX autoencoder at a small width: reconstruction + small KL; latent scale/shift measured at the end."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.obj, self.device = cfg, cfg.objective, device
        self.model = AutoEncoder(cfg.model_params())
        self.dataset = _dataset(cfg)
        self.batches = BatchStream(self.dataset, cfg.run.batch_size, seed=cfg.run.seed)

    def next_batch(self) -> Tensor:
        x, _ = collate([self.dataset[i] for i in next(self.batches)])
        return x.to(self.device)  # (B, 3, H, W) in [-1, 1]

    def loss(self, model: AutoEncoder, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict]:
        mean, logvar = model.encode_moments(x)
        logvar = logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution
        z = mean + (0.5 * logvar).exp() * _randn(mean.shape, generator, mean)
        return objectives.vae_loss(x, model.decoder(z), mean, logvar, l1_weight=self.obj.l1_weight,
                                   mse_weight=self.obj.mse_weight, kl_weight=self.obj.kl_weight)

    @torch.no_grad()
    def sample_grid(self, model: AutoEncoder) -> Image.Image:
        """Unseen images (another data seed) over their reconstructions."""
        size = self.cfg.log.sample_size
        images = ShapesDataset(seed=self.cfg.data.seed + 1, length=8, buckets=[(size, size)])
        x, _ = collate([images[i] for i in range(len(images))])
        recon = model.decoder(model.encode_moments(x.to(self.device))[0])
        return image_grid(tensor_to_images(x) + tensor_to_images(recon), cols=len(images))

    @torch.no_grad()
    def latent_statistics(self, model: AutoEncoder) -> tuple[float, float]:
        """FLUX's normalisation: shift = mean and scale = 1/std of the posterior means over many images."""
        means = []
        for group in bucket_indices(self.dataset, min(self.obj.stats_images, len(self.dataset))):
            for start in range(0, len(group), ENCODE_BATCH):
                x, _ = collate([self.dataset[i] for i in group[start:start + ENCODE_BATCH]])
                means.append(model.encode_moments(x.to(self.device))[0].float().flatten().cpu())
        means = torch.cat(means).double()
        return float(1.0 / means.std()), float(means.mean())

    def finish(self, model: AutoEncoder, folder: Path) -> Path:
        scale, shift = self.latent_statistics(model)
        log.info("latent scale_factor=%.6f shift_factor=%.6f", scale, shift)
        model.params = dataclasses.replace(model.params, scale_factor=scale, shift_factor=shift)
        model.scale_factor, model.shift_factor = scale, shift
        return save_state_dict(model.state_dict(), folder / AUTOENCODER_FILE, metadata=params_metadata(model.params))


# -- stages 2-4: the transformer ------------------------------------------------------------------------------------
@dataclass
class LatentBatch:
    x0: Tensor  # packed clean latents (B, L, 64)
    img_ids: Tensor  # (B, L, 3)
    txt: Tensor  # (B, 32, 384)
    txt_ids: Tensor  # (B, 32, 3)
    vec: Tensor  # (B, 384)
    prior: Tensor | None = None  # (B,) bool: prior-preservation rows (LoRA stage)

    def __len__(self) -> int:
        return self.x0.shape[0]


@torch.no_grad()
def init_from(model: Flux, source: Flux, fold_guidance: float = 0.0, source_name: str = "model.init_from") -> Flux:
    """Start `model` from `source`'s weights. A guidance embedder the source lacks starts with a zero output layer,
    so the student begins equal to its teacher; one the model lacks is folded, at guidance `fold_guidance`, into
    vector_in's output bias (it only ever adds the constant guidance_in(emb(g)) to the conditioning vector).
    A model deeper than its source grows: the blocks past the source's depth keep `model`'s own weights, which
    from `initialize_weights` (adaLN-Zero) make each new block the identity, so the grown model starts equal to
    its source."""
    sd, own = dict(source.state_dict()), model.state_dict()
    for blocks, ours, theirs in (("double_blocks", model.params.depth, source.params.depth),
                                 ("single_blocks", model.params.depth_single_blocks,
                                  source.params.depth_single_blocks)):
        new_blocks = tuple(f"{blocks}.{i}." for i in range(theirs, ours))  # () when not deeper: matches nothing
        sd |= {k: v for k, v in own.items() if k.startswith(new_blocks)}
    if source.params.guidance_embed and not model.params.guidance_embed:
        if fold_guidance <= 0:
            raise ConfigError(f"{source_name} embeds guidance and this model does not: set model.init_guidance "
                              "to the guidance scale to fold in (e.g. 3.5)")
        g = torch.full((1,), fold_guidance)
        constant = source.guidance_in(timestep_embedding(g, 256))[0]  # (hidden,)
        sd["vector_in.out_layer.bias"] = sd["vector_in.out_layer.bias"] + constant
        sd = {k: v for k, v in sd.items() if not k.startswith("guidance_in.")}
    elif model.params.guidance_embed and not source.params.guidance_embed:
        sd |= {k: v for k, v in model.state_dict().items() if k.startswith("guidance_in.")}
        sd["guidance_in.out_layer.weight"] = torch.zeros_like(model.guidance_in.out_layer.weight)
        sd["guidance_in.out_layer.bias"] = torch.zeros_like(model.guidance_in.out_layer.bias)
    check_state_dict(model, sd, source=source_name)
    model.load_state_dict(sd)
    return model


class TransformerStage:
    """What the transformer stages share: frozen VAE latents and MiniLM states from a cache, bucketed batches,
    a model initialised from scratch (adaLN-Zero) or from earlier weights, samples through the real pipeline."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from ..text import load_minilm

        self.cfg, self.obj, self.device = cfg, cfg.objective, device
        self.autoencoder = load_autoencoder(cfg.model.autoencoder, dtype=torch.float32, device=device)
        self.autoencoder.requires_grad_(False)
        self.text_encoder = load_minilm(device=device, max_length=cfg.data.text_length)
        self.dataset = _dataset(cfg)
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run.out_dir) / "cache"
        self.features: FeatureCache = load_or_build_feature_cache(
            cache_dir, Path(cfg.model.autoencoder), self.dataset, self.autoencoder, self.text_encoder, device,
            progress=cfg.log.progress)
        self.empty_txt = self.features.empty_txt.to(device)
        self.empty_vec = self.features.empty_vec.to(device)
        self.batches = BatchStream(self.dataset, cfg.run.batch_size, seed=cfg.run.seed)
        self.model = self.build_model()

    def build_model(self) -> torch.nn.Module:
        """What this stage trains: a Flux from scratch (adaLN-Zero) or grown from model.init_from."""
        model = Flux(self.cfg.model_params()).initialize_weights()
        if self.cfg.model.init_from:
            source = load_transformer(self.cfg.model.init_from, dtype=torch.float32)
            init_from(model, source, self.cfg.model.init_guidance)
        return model

    def next_batch(self) -> LatentBatch:
        epoch = self.batches.epoch
        return self.latent_batch(next(self.batches), epoch)

    def latent_batch(self, indices: list[int], epoch: int = 0) -> LatentBatch:
        latents, txt, vec = self.features.batch(indices, epoch)
        B, _, h, w = latents.shape
        d = self.device
        return LatentBatch(pack(latents).to(d), image_ids(B, h, w, d), txt.to(d),
                           text_ids(B, txt.shape[1], d, numbered=self.cfg.model.text_positions),
                           vec.to(d))

    def drop_captions(self, b: LatentBatch, p: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Replace each caption by "" with probability p, so the model also learns the unconditional velocity."""
        if p <= 0:
            return b.txt, b.vec
        drop = (torch.rand(len(b), generator=generator) < p).to(self.device)
        return (torch.where(drop[:, None, None], self.empty_txt, b.txt),
                torch.where(drop[:, None], self.empty_vec, b.vec))

    def mix_texts(self, txt: Tensor, vec: Tensor, most: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Each caption's states mixed with another caption's of the batch, by a weight drawn from U(0, most)."""
        if most <= 0:
            return txt, vec
        other = torch.randperm(len(txt), generator=generator).to(self.device)
        weight = (most * torch.rand(len(txt), generator=generator)).to(self.device, txt.dtype)
        return (torch.lerp(txt, txt[other], weight[:, None, None]), torch.lerp(vec, vec[other], weight[:, None]))

    def timesteps(self, b: LatentBatch, generator: torch.Generator) -> Tensor:
        # the sampler's shift for this many tokens
        mu = schedule_mu(b.x0.shape[1], self.cfg.shift_schedule()) if self.obj.shift else None
        return objectives.sample_timesteps(len(b), generator, mean=self.obj.t_mean, std=self.obj.t_std,
                                           mu=mu).to(self.device)

    def cond_uncond(self, teacher: Flux, x: Tensor, b: LatentBatch, txt: Tensor, vec: Tensor, t: Tensor):
        """A CFG teacher's conditional and unconditional ("") velocities, in one batched forward."""
        B = len(b)
        pred = teacher(torch.cat((x, x)), torch.cat((b.img_ids, b.img_ids)),
                       torch.cat((txt, self.empty_txt.expand(B, -1, -1))), torch.cat((b.txt_ids, b.txt_ids)),
                       torch.cat((t, t)), torch.cat((vec, self.empty_vec.expand(B, -1))))
        return pred.chunk(2)

    @torch.no_grad()
    def sample_grid(self, model: Flux) -> Image.Image:
        """Rows of prompts, columns of seeds, generated exactly as the shipped model will be: through Pipeline
        with this variant's defaults."""
        from ..pipeline import Pipeline

        lc = self.cfg.log
        pipe = Pipeline(model, self.autoencoder, self.text_encoder, variant=self.cfg.export.variant,
                        name=self.cfg.run.name, defaults=self.cfg.export.defaults,
                        text_positions=self.cfg.model.text_positions, device=self.device, dtype=torch.float32)
        prompts = [p for p in lc.sample_prompts for _ in lc.sample_seeds]
        seeds = [s for _ in lc.sample_prompts for s in lc.sample_seeds]
        images = pipe(prompts, seed=seeds, height=lc.sample_size, width=lc.sample_size)
        return image_grid(images, cols=len(lc.sample_seeds))

    def finish(self, model: Flux, folder: Path) -> Path:
        save_state_dict(model.state_dict(), folder / TRANSFORMER_FILE, metadata=params_metadata(model.params))
        copy_file(Path(self.cfg.model.autoencoder), folder / AUTOENCODER_FILE)
        return write_manifest(self.cfg, folder)


class FlowStage(TransformerStage):
    """FLUX.1 [pro]-like teacher: rectified flow from scratch, with caption dropout for classifier-free guidance."""

    def loss(self, model: Flux, b: LatentBatch, generator: torch.Generator) -> tuple[Tensor, dict]:
        txt, vec = self.drop_captions(b, self.obj.caption_dropout, generator)
        txt, vec = self.mix_texts(txt, vec, self.obj.text_mixup, generator)
        t = self.timesteps(b, generator)
        noise = _randn(b.x0.shape, generator, b.x0)
        velocity = lambda x, t: model(x, b.img_ids, txt, b.txt_ids, t, vec)  # noqa: E731
        return objectives.flow_matching_loss(velocity, b.x0, noise, t), {}


class GuidanceStage(TransformerStage):
    """FLUX.1 [dev]-like: one forward with the guidance scale w as input regresses the teacher's CFG output."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        self.teacher = load_transformer(self.obj.teacher, dtype=torch.float32, device=device).requires_grad_(False)
        if self.teacher.params.guidance_embed:
            raise ConfigError(f"{cfg.source}: objective.teacher {self.obj.teacher} embeds guidance; guidance "
                              "distillation needs a classifier-free-guidance teacher (the pro model)")

    def loss(self, model: Flux, b: LatentBatch, generator: torch.Generator) -> tuple[Tensor, dict]:
        txt, vec = self.drop_captions(b, self.obj.caption_dropout, generator)
        t = self.timesteps(b, generator)
        noise = _randn(b.x0.shape, generator, b.x0)
        lo, hi = self.obj.guidance_min, self.obj.guidance_max
        w = (lo + (hi - lo) * torch.rand(len(b), generator=generator)).to(self.device)
        x_t = objectives.interpolate(b.x0, noise, t)
        with torch.no_grad():
            v_cond, v_uncond = self.cond_uncond(self.teacher, x_t, b, txt, vec, t)
        v = model(x_t, b.img_ids, txt, b.txt_ids, t, vec, guidance=w)
        return objectives.guidance_distillation_loss(v, v_cond, v_uncond, w), {}


class FewStepStage(TransformerStage):
    """FLUX.1 [schnell]-like: trajectory distillation onto the few-step schedule (unshifted, or with the sampler's
    shift). At a schedule point t (drawn uniformly, or as objective.segment_weights say; x_t from the data, or for
    a share `student_rollout` from the student's own steps), one student Euler step to the next point t' must land
    where `teacher_substeps` Euler steps of the guided teacher land: v_student(x_t, t) = (x_t' - x_t) / (t' - t)."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        self.teacher = load_transformer(self.obj.teacher, dtype=torch.float32, device=device).requires_grad_(False)

    def teacher_velocity(self, b: LatentBatch):
        g = self.obj.teacher_guidance

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if self.teacher.params.guidance_embed:  # dev: guidance is an input
                guidance = torch.full((len(b),), g, device=x.device, dtype=x.dtype)
                return self.teacher(x, b.img_ids, b.txt, b.txt_ids, t, b.vec, guidance=guidance)
            v_cond, v_uncond = self.cond_uncond(self.teacher, x, b, b.txt, b.vec, t)  # pro: true CFG
            return v_uncond + g * (v_cond - v_uncond)

        return velocity

    def loss(self, model: Flux, b: LatentBatch, generator: torch.Generator) -> tuple[Tensor, dict]:
        segments = objectives.schedule_segments(self.obj.student_steps, b.x0.shape[1], shift=self.obj.shift,
                                                schedule=self.cfg.shift_schedule())
        pick = objectives.pick_segments(len(segments), len(b), generator, self.obj.segment_weights)
        t = torch.tensor([segments[i][0][-1] for i in pick], dtype=torch.float32, device=self.device)
        t_next = torch.tensor([segments[i][1] for i in pick], dtype=torch.float32, device=self.device)
        noise = _randn(b.x0.shape, generator, b.x0)
        x_t = objectives.interpolate(b.x0, noise, t)
        with torch.no_grad():
            if self.obj.student_rollout > 0:  # (draws nothing more at 0: earlier recipes keep their streams)
                own = (torch.rand(len(b), generator=generator) < self.obj.student_rollout).nonzero()[:, 0]
                if len(own):
                    paths = [segments[pick[i]][0] for i in own.tolist()]
                    own = own.to(self.device)
                    velocity = lambda x, t, rows: model(  # noqa: E731
                        x, b.img_ids[own[rows]], b.txt[own[rows]], b.txt_ids[own[rows]], t, b.vec[own[rows]])
                    x_t[own] = objectives.own_steps(velocity, noise[own], paths)
            target = objectives.jump_target(self.teacher_velocity(b), x_t, t, t_next, self.obj.teacher_substeps)
        v = model(x_t, b.img_ids, b.txt, b.txt_ids, t, b.vec)
        return objectives.fewstep_distillation_loss(v, target), {}


class LoRAStage(TransformerStage):
    """A LoRA (DreamBooth-style): the frozen model.init_from learns new content (the held-out star) through
    low-rank updates of the target layers, by flow matching on a few captioned images. `model` is the adapter's
    weights alone (LoRAWeights): the EMA, the checkpoints and the finished files hold just those."""

    def build_model(self) -> LoRAWeights:
        self.base = load_transformer(self.cfg.model.init_from, dtype=torch.float32, device=self.device)
        self.base.requires_grad_(False)
        return LoRAWeights(self.base, self.obj.targets, self.obj.rank, self.obj.alpha)

    @contextmanager
    def applied(self, weights: LoRAWeights):
        """The base model with `weights` attached (hooks added for the duration, so EMA and training weights
        can take turns on one base)."""
        add_adapter(self.base, weights.adapter(self.cfg.run.name))
        try:
            yield self.base
        finally:
            unload_adapters(self.base)

    def next_batch(self) -> LatentBatch:
        indices = next(self.batches)
        batch = self.latent_batch(indices)
        batch.prior = torch.tensor([i >= self.dataset.teach_images for i in indices], device=self.device)
        return batch

    def loss(self, model: LoRAWeights, b: LatentBatch, generator: torch.Generator) -> tuple[Tensor, dict]:
        txt, vec = self.drop_captions(b, self.obj.caption_dropout, generator)
        t = self.timesteps(b, generator)
        noise = _randn(b.x0.shape, generator, b.x0)
        x_t, target = objectives.interpolate(b.x0, noise, t), noise - b.x0
        guidance = None
        if self.base.params.guidance_embed:
            guidance = torch.full((len(b),), self.obj.guidance, device=self.device)
        if self.obj.prior_target == "base" and b.prior is not None and b.prior.any():
            rows = b.prior.nonzero()[:, 0]
            if guidance is not None:
                lo, hi = self.obj.prior_guidance
                guidance[rows] = (lo + (hi - lo) * torch.rand(len(rows), generator=generator)).to(self.device)
            with torch.no_grad():  # the base alone (no adapter attached yet)
                target[rows] = self.base(x_t[rows], b.img_ids[rows], txt[rows], b.txt_ids[rows], t[rows], vec[rows],
                                         guidance=None if guidance is None else guidance[rows]).to(target.dtype)
        with self.applied(model) as flux:
            v = flux(x_t, b.img_ids, txt, b.txt_ids, t, vec, guidance=guidance)
        return torch.nn.functional.mse_loss(v.float(), target.float()), {}

    @torch.no_grad()
    def sample_grid(self, model: LoRAWeights) -> Image.Image:
        with self.applied(model) as flux:
            return super().sample_grid(flux)

    def finish(self, model: LoRAWeights, folder: Path) -> Path:
        """The adapter in each of export.layouts: <name>.safetensors (PEFT keys, alpha in the header), and
        <name>-kohya / <name>-comfy.safetensors on request."""
        from ..lora import save_lora

        metadata = {"fluxion.base_model": base_model_name(self.cfg.model.init_from), "fluxion.recipe": self.cfg.source,
                    "fluxion.steps": str(self.cfg.run.steps)}
        adapter = model.adapter(self.cfg.run.name)
        for layout in self.cfg.export.layouts:
            suffix = "" if layout == "peft" else f"-{layout}"
            out = save_lora(adapter, folder / f"{self.cfg.run.name}{suffix}.safetensors", layout=layout,
                            model=self.base, metadata=metadata)
        return out


STAGES = {"vae": VAEStage, "flow": FlowStage, "guidance": GuidanceStage, "fewstep": FewStepStage,
          "lora": LoRAStage}

