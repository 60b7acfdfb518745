"""Quick measurements of one quantized layer at real widths (for bench scripts and choosing types)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .linear import QuantLinear


def _layer_and_input(out_features: int, in_features: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # weights ~ N(0, 1/in) as trained layers roughly are; inputs with a few outlier channels, as in real activations
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    b = 0.1 * torch.randn(out_features, generator=gen)
    x = torch.randn(tokens, in_features, generator=gen)
    x[:, torch.randperm(in_features, generator=gen)[:8]] *= 20
    return w.bfloat16(), b.bfloat16(), x.bfloat16()


def relative_error_vs_bf16(qtype: str, out_features: int, in_features: int, tokens: int = 256, seed: int = 0) -> float:
    """||y_q - y|| / ||y||: a `qtype` layer vs the same random layer in bf16, both computing in bf16."""
    w, b, x = _layer_and_input(out_features, in_features, tokens, seed)
    ref = F.linear(x, w, b).float()
    with torch.no_grad():
        out = QuantLinear.quantize(w, b, qtype)(x).float()
    return float((out - ref).norm() / ref.norm())


def seconds_per_call(qtype: str | None, out_features: int, in_features: int, tokens: int = 1024,
                     repeats: int = 3) -> float:
    """Best-of-`repeats` forward time of a bf16 layer (`qtype=None`) or a quantized one, on the current threads."""
    w, b, x = _layer_and_input(out_features, in_features, tokens, 0)
    layer = (lambda t: F.linear(t, w, b)) if qtype is None else QuantLinear.quantize(w, b, qtype)
    best = float("inf")
    with torch.no_grad():
        layer(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - t0)
    return best
