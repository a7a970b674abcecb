"""The training objectives, each a few lines to check against its paper: VAE, flow matching, guidance and
few-step distillation. Velocities are functions (x_t, t) -> v, so the maths is testable without a model."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampling import FLUX_SHIFT, ShiftSchedule, get_schedule, time_shift

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> v (B, ...)


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against `like`."""
    return t.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# -- VAE ------------------------------------------------------------------------------------------------------------
def vae_loss(x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, *, l1_weight: float = 1.0,
             mse_weight: float = 1.0, kl_weight: float = 1e-5) -> tuple[Tensor, dict[str, Tensor]]:
    """Reconstruction (L1 + MSE) plus the KL divergence of N(mean, exp(logvar)) from N(0, 1), all per-element
    means, computed in float32; returns the total and its parts."""
    x, recon, mean, logvar = x.float(), recon.float(), mean.float(), logvar.float()
    l1 = (recon - x).abs().mean()
    mse = (recon - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return l1_weight * l1 + mse_weight * mse + kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl}


# -- rectified flow -------------------------------------------------------------------------------------------------
def sample_timesteps(n: int, generator: torch.Generator, *, mean: float = 0.0, std: float = 1.0,
                     mu: float | None = None) -> Tensor:
    """Logit-normal t = sigmoid(N(mean, std)) (SD3), optionally moved by FLUX's resolution shift
    exp(mu) / (exp(mu) + 1/t - 1), which is the same as adding mu to the mean: (n,) float32 in (0, 1)."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return time_shift(mu, 1.0, t) if mu is not None else t


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The straight path from data (t=0) to noise (t=1): x_t = (1 - t) x0 + t eps."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(velocity: Velocity, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Regress the constant velocity of the straight path, v = eps - x0, at x_t (rectified flow)."""
    v = velocity(interpolate(x0, noise, t), t)
    return F.mse_loss(v.float(), (noise - x0).float())


# -- guidance distillation ------------------------------------------------------------------------------------------
def guidance_target(v_cond: Tensor, v_uncond: Tensor, w: Tensor) -> Tensor:
    """The teacher's classifier-free guidance output v_uncond + w (v_cond - v_uncond), w (B,)."""
    return v_uncond + _bcast(w, v_cond) * (v_cond - v_uncond)


def guidance_distillation_loss(v_student: Tensor, v_cond: Tensor, v_uncond: Tensor, w: Tensor) -> Tensor:
    """One student forward with w as input regresses the teacher's two-forward CFG output (FLUX.1 [dev])."""
    return F.mse_loss(v_student.float(), guidance_target(v_cond, v_uncond, w).float())


# -- few-step (trajectory) distillation -----------------------------------------------------------------------------
def euler(velocity: Velocity, x: Tensor, t: Tensor, t_next: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = v(x, t) from t to t_next (both (B,)) in `steps` equal Euler steps, in float32."""
    x = x.float()
    for i in range(steps):
        a = t + (t_next - t) * (i / steps)
        b = t + (t_next - t) * ((i + 1) / steps)
        x = x + _bcast(b - a, x) * velocity(x, a).float()
    return x


def jump_target(velocity: Velocity, x: Tensor, t: Tensor, t_next: Tensor, substeps: int) -> Tensor:
    """The velocity that lands one student Euler step where `substeps` teacher steps land:
    (x_{t'} - x_t) / (t' - t)."""
    x_next = euler(velocity, x, t, t_next, substeps)
    return (x_next - x.float()) / _bcast(t_next - t, x_next)


def schedule_segments(student_steps: list[int], image_seq_len: int, shift: bool,
                      schedule: ShiftSchedule = FLUX_SHIFT) -> list[tuple[list[float], float]]:
    """Every step of every schedule a few-step student learns, as the schedule's points up to the step's start and
    the step's end; e.g. 2 unshifted steps: ([1.0], 0.5), ([1.0, 0.5], 0.0)."""
    segments = []
    for n in student_steps:
        times = get_schedule(n, image_seq_len, shift=shift, schedule=schedule)
        segments += [(times[:k + 1], times[k + 1]) for k in range(n)]
    return segments


def pick_segments(count: int, batch: int, generator: torch.Generator, weights: list[float] | None = None) -> Tensor:
    """Which of `count` segments each sample of the batch learns: uniformly, or in proportion to `weights`."""
    if not weights:  # randint, as before weights existed: earlier recipes keep their random streams
        return torch.randint(count, (batch,), generator=generator)
    return torch.multinomial(torch.tensor(weights, dtype=torch.float64), batch, replacement=True, generator=generator)


def own_steps(velocity: Callable[[Tensor, Tensor, Tensor], Tensor], noise: Tensor,
              paths: list[list[float]]) -> Tensor:
    """Euler steps of `velocity(x, t, rows)` from each sample's noise along its path of schedule points (1.0 first),
    to the path's last point: where a sampler's own earlier steps put the sample, not where noising the data does.
    Each step runs only the rows still on their way; a path of [1.0] leaves the noise as it is."""
    x = noise.float().clone()
    for j in range(max(len(p) for p in paths) - 1):
        rows = [i for i, p in enumerate(paths) if len(p) - 1 > j]
        idx = torch.tensor(rows, device=x.device)
        t = torch.tensor([paths[i][j] for i in rows], dtype=torch.float32, device=x.device)
        t_next = torch.tensor([paths[i][j + 1] for i in rows], dtype=torch.float32, device=x.device)
        x[idx] = x[idx] + _bcast(t_next - t, x) * velocity(x[idx], t, idx).float()
    return x


def fewstep_distillation_loss(v_student: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(v_student.float(), target.float())
