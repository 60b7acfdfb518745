"""Rectified flow, the maths both sampling and training use.

A clean latent x0 and noise n meet on the straight line x_sigma = (1 - sigma) x0 + sigma n; the model predicts
the velocity n - x0; sampling walks sigma from 1 (or from an img2img start) down to 0 with Euler steps on FLUX's
shifted schedule. Also here: 2x2 latent packing and the position ids of packed tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------- schedule


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """FLUX's shift: t' = e^mu / (e^mu + (1/t - 1)^sigma); t = 0 stays 0."""
    out = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return torch.where(t > 0, out, torch.zeros_like(t))


def resolution_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """mu grows linearly with the number of image tokens (dev's resolution-dependent shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class ScheduleConfig:
    """What diffusers' FlowMatchEulerDiscreteScheduler config says of the schedule."""

    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift: float = 1.0  # static shift, used when use_dynamic_shifting is False

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


DEV_SCHEDULE = ScheduleConfig(use_dynamic_shifting=True)
SCHNELL_SCHEDULE = ScheduleConfig(use_dynamic_shifting=False, shift=1.0)


def get_schedule(
    num_steps: int, image_seq_len: int, config: ScheduleConfig = DEV_SCHEDULE, sigmas: Sequence[float] | None = None
) -> Tensor:
    """Noise levels t_0 = 1 > ... > t_n = 0 (float32, n + 1 values).

    `sigmas` replaces the default `linspace(1, 1/n, n)` before shifting, as in diffusers.
    """
    if sigmas is None:
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    else:
        t = torch.as_tensor(list(sigmas), dtype=torch.float64)
        if t.ndim != 1 or len(t) < 1 or not torch.all((t > 0) & (t <= 1)):
            raise ValueError("sigmas must be a non-empty 1-D sequence of values in (0, 1]")
    if config.use_dynamic_shifting:
        mu = resolution_shift(
            image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        t = time_shift(mu, 1.0, t)
    elif config.shift != 1.0:
        t = config.shift * t / (1 + (config.shift - 1) * t)
    return torch.cat([t, torch.zeros(1, dtype=t.dtype)]).float()


def strength_start(num_steps: int, strength: float) -> int:
    """Index of the first step an img2img run keeps, as diffusers cuts: t_start = int(max(N - min(N*s, N), 0))
    (truncation); the schedule is shifted for all N steps first, then cut."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


# ---------------------------------------------------------------- latents


def pack(z: Tensor) -> Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, C*4] with channel order (c, ph, pw)."""
    b, c, hh, ww = z.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {hh}x{ww}")
    z = z.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(x: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of `pack`: [B, h*w, C*4] -> [B, C, 2h, 2w] for a latent grid of latent_height x latent_width."""
    b, n, d = x.shape
    h, w = latent_height // 2, latent_width // 2
    if n != h * w:
        raise ValueError(f"{n} packed tokens do not fit a {latent_height}x{latent_width} latent grid")
    x = x.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, latent_height, latent_width)


def image_ids(latent_height: int, latent_width: int, device=None, index: int = 0) -> Tensor:
    """[h*w, 3] ids (index, row, col) of the packed token grid; index 0 for the image being made, 1 for
    Kontext's reference tokens."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(seq_len: int, device=None) -> Tensor:
    return torch.zeros(seq_len, 3, device=device)


def latent_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent height/width for an image, as diffusers rounds it (2 * (H // (2f)))."""
    return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def initial_noise(
    batch: int,
    channels: int,
    latent_height: int,
    latent_width: int,
    generator: torch.Generator | list[torch.Generator] | None,
    dtype: torch.dtype,
    device="cpu",
) -> Tensor:
    """Standard-normal latents drawn unpacked, as diffusers draws them (per-sample when given a list)."""
    shape = (batch, channels, latent_height, latent_width)
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        draws = [torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator]
        return torch.cat(draws).to(device)
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


# ---------------------------------------------------------------- the line between data and noise


def noised(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """x_sigma = sigma * noise + (1 - sigma) * x0 (diffusers' scale_noise), sigma per batch item or one value."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    s = s.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) if s.ndim else s.to(x0.dtype)
    return s * noise + (1 - s) * x0


# ---------------------------------------------------------------- the Euler loop

Velocity = Callable[[Tensor, Tensor, int], Tensor]  # (x, t [B], step index) -> v


def euler(
    velocity: Velocity,
    x: Tensor,
    schedule: Tensor,
    progress: Callable | None = None,
    on_step: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """x <- x + (t_next - t_cur) * v(x, t_cur), stepping in float32 and storing in x's dtype (as diffusers).

    `on_step(i, x)` sees the latents after step i and may return replacements.
    """
    steps = range(len(schedule) - 1)
    for i in progress(steps) if progress else steps:
        t_cur, t_next = schedule[i], schedule[i + 1]
        t = torch.full((x.shape[0],), float(t_cur), dtype=x.dtype, device=x.device)
        v = velocity(x, t, i)
        x = (x.float() + (t_next - t_cur) * v.float()).to(x.dtype)
        if on_step is not None:
            x = on_step(i, x)
    return x


# ---------------------------------------------------------------- training: noise levels, target, loss


SIGMA_DENSITIES = ("uniform", "logit_normal", "mode", "u_shaped")


def sample_sigmas(n: int, method: str = "logit_normal", generator: torch.Generator | None = None,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
    """Noise levels in (0, 1) drawn by density: uniform, logit-normal (SD3's default), 'mode' or 'u_shaped'."""
    if method == "uniform":
        return torch.rand(n, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    if method == "u_shaped":  # density ∝ cosh(4 (t - 1/2)) (Rectified Flow++): most weight near both ends
        u = torch.rand(n, generator=generator)
        return 0.5 + torch.asinh((2 * u - 1) * math.sinh(2.0)) / 4.0
    if method == "mode":
        u = torch.rand(n, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown timestep sampling {method!r}: use {', '.join(SIGMA_DENSITIES)}")


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def loss_weights(sigma: Tensor, scheme: str = "none") -> Tensor:
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma.clamp_min(1e-4) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {scheme!r}: use none, sigma_sqrt or cosmap")


def flow_loss_per_row(pred: Tensor, target: Tensor, sigma: Tensor, scheme: str = "none") -> Tensor:
    """Each sample's weighted mean squared velocity error [B]: the trainer averages these over its global batch."""
    return loss_weights(sigma, scheme) * (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def flow_loss(pred: Tensor, target: Tensor, sigma: Tensor, scheme: str = "none") -> Tensor:
    return flow_loss_per_row(pred, target, sigma, scheme).mean()
