"""Test helpers (not tests) for quantization: a tiny fluxion transformer and its inputs, built without diffusers.

hidden 64 (2 heads of 32): every Linear input width (16 for img_in, 64, 256, 320) is whole 32-value GGML blocks,
except img_in's, which the default keep-rules leave in float anyway.
"""
from __future__ import annotations

import torch

from fixtures import randomize_parameters_
from fluxion.model.transformer import FluxConfig, FluxTransformer

TINY = dict(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
            depth_single_blocks=2, axes_dim=(8, 12, 12))


def tiny_model(seed: int = 0, **overrides) -> FluxTransformer:
    return randomize_parameters_(FluxTransformer(FluxConfig(**{**TINY, **overrides})), seed=seed).eval()


def tiny_inputs(config: FluxConfig, batch: int = 1, side: int = 4, text: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = side * side
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(n) // side, torch.arange(n) % side
    return dict(
        img=torch.randn(batch, n, config.in_channels, generator=g),
        img_ids=img_ids,
        txt=torch.randn(batch, text, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(text, 3),
        timesteps=torch.full((batch,), 0.5),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if config.guidance_embed else None,
    )


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())
