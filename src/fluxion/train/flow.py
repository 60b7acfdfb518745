"""Rectified-flow training math: noise levels, interpolation, velocity target, loss weighting."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_sigmas(n: int, method: str = "logit_normal", generator: torch.Generator | None = None,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
    """Noise levels in (0, 1) drawn by density: uniform, logit-normal (SD3's default) or 'mode'."""
    if method == "uniform":
        return torch.rand(n, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    if method == "mode":
        u = torch.rand(n, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown timestep sampling {method!r}: use uniform, logit_normal or mode")


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise, sigma broadcast over all but the batch dim."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


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


def flow_loss(pred: Tensor, target: Tensor, sigma: Tensor, scheme: str = "none") -> Tensor:
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (loss_weights(sigma, scheme) * per_sample).mean()
