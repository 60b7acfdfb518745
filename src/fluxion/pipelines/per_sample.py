"""Per-sample guidance: one call's images each get their own `guidance_scale` and `true_cfg_scale` (issue #17).

`FluxBasePipeline.guidance_per_sample(guidance_scale=[...], true_cfg_scale=[...])` sets `SAMPLE_GUIDANCE` (a
ContextVar: this thread or asyncio task only) for the calls inside it. Each list has one finite number per image
of the call (batch * num_images_per_prompt, in output order); either may be None (the call's own value then
applies to every image). Image k is then denoised as the call with `guidance_scale=guidance_scale[k]` (the
distilled-guidance embedding of its rows, repeated for the stacked [cond; uncond] rows of true CFG) and
`true_cfg_scale=true_cfg_scale[k]` (the combination v_neg + cfg * (v - v_neg) of its rows; an image with a value
<= 1 keeps its conditional prediction v exactly) would denoise it alone. The values are constants over the
steps; the call's `guidance_start` / `guidance_end` window still switches true CFG off outside it.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleGuidance:
    guidance: tuple[float, ...] | None
    true_cfg: tuple[float, ...] | None

    @property
    def n(self) -> int:
        return len(self.guidance if self.guidance is not None else self.true_cfg)


SAMPLE_GUIDANCE: ContextVar[SampleGuidance | None] = ContextVar("fluxion_sample_guidance", default=None)


def _values(values, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"per-sample {name} must be a list with one number per image, got {type(values).__name__}")
    if not values:
        raise ValueError(f"per-sample {name} must name at least one image, got an empty list")
    out = []
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"per-sample {name}[{k}] must be a finite number, got {v!r}")
        out.append(float(v))
    return tuple(out)


def make(guidance_scale=None, true_cfg_scale=None) -> SampleGuidance | None:
    """The checked table (None when both are None)."""
    g = _values(guidance_scale, "guidance_scale")
    c = _values(true_cfg_scale, "true_cfg_scale")
    if g is not None and c is not None and len(g) != len(c):
        raise ValueError(f"per-sample guidance_scale has {len(g)} values and true_cfg_scale {len(c)}: give one "
                         "value per image in both")
    if g is None and c is None:
        return None
    return SampleGuidance(g, c)


def current() -> SampleGuidance | None:
    return SAMPLE_GUIDANCE.get()


def check(total: int) -> None:
    """A call of `total` images inside `guidance_per_sample`: the count must match (before any model runs)."""
    table = SAMPLE_GUIDANCE.get()
    if table is not None and table.n != total:
        raise ValueError(f"per-sample guidance was given for {table.n} images, but this call makes {total} "
                         "(batch * num_images_per_prompt); pass one value per image")
