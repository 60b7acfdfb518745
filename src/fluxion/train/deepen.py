"""Growing a trained transformer in depth: single-stream blocks appended with zero gates, so the deeper model
computes exactly what the trained one does and training starts from it rather than from scratch. Used by reflow
(a deeper student) and by `fluxion train` when `init_from`'s model has fewer single blocks than the config asks
for (a deeper fluxion-mini started from the shipped one)."""
from __future__ import annotations

import torch

from ..model.transformer import FluxConfig, FluxTransformer


def deepened(start: FluxTransformer, single_blocks: int, setting: str = "depth_single_blocks") -> FluxTransformer:
    """`start` with single-stream blocks appended up to `single_blocks`, each with a zero gate (its modulation's
    gate rows), so it adds nothing until trained; one error, naming the config's `setting`, if `single_blocks` is
    fewer than `start` has."""
    have = start.config.depth_single_blocks
    if single_blocks < have:
        raise ValueError(f"{setting} must be at least the start point's {have}, got {single_blocks}")
    deep = FluxTransformer(FluxConfig(**{**start.config.to_dict(), "depth_single_blocks": single_blocks}))
    missing, unexpected = deep.load_state_dict(start.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("single_blocks.") for k in missing), (missing, unexpected)
    dim = deep.config.hidden_size
    with torch.no_grad():
        for block in deep.single_blocks[have:]:
            block.modulation.lin.weight[2 * dim:].zero_()  # (shift, scale, gate): the gate's rows
            block.modulation.lin.bias[2 * dim:].zero_()
    return deep.float()
