"""The one denoising core every pipeline variant runs: Euler steps over a rectified-flow schedule, with the
variant's conditioning given as explicit, named inputs (as the reference's `denoise`).

What a variant may add, each optional and independent:
- `latents` and `schedule`: where to start (img2img and inpainting start part-way down a cut schedule);
- `img_cond`: channels concatenated to the image tokens at every step (Fill: masked image + mask; Control:
  the encoded control image); the model predicts the velocity of the first `latents.shape[-1]` channels;
- `ref_tokens` / `ref_ids`: extra image tokens appended to the sequence (Kontext's reference image, ids with
  first coordinate 1); predictions for them are dropped;
- `blend(i, x)`: replaces the latents after step i (inpainting keeps the re-noised original outside the mask);
- `guidance` / `true_cfg`: one value per step (guidance schedules; a true-CFG value <= 1 skips the negative
  pass at that step); a step's value may be a tuple with one value per image (per-sample guidance,
  `fluxion.pipelines.per_sample`): the negative pass then runs when any image's value is above 1, and an image
  whose value is <= 1 keeps its conditional prediction exactly;
- `regional`: a masked pass over region prompts, blended with the base prompt's pass for its first steps;
- `residuals(i, x, t)`: per-block additions for the image stream (ControlNets), shared by the CFG passes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..flow import euler
from ..model.step_runner import StepRunner
from ..model.transformer import BlockResiduals, FluxTransformer


class NonFiniteLatents(ValueError):
    """A generation's latents left the finite numbers (the step is named in the message)."""


@dataclass
class TextConditioning:
    embeds: Tensor  # T5 [B, L, D]
    pooled: Tensor  # CLIP pooled [B, P]
    ids: Tensor  # [L, 3]


@dataclass
class RegionalInputs:
    """A regional pass: the region prompts' T5 embeddings concatenated, and the attention mask over
    [region text, image tokens] (`fluxion.pipelines.regional.attention_mask`)."""

    text: TextConditioning
    mask: Tensor  # bool [L_txt + N, L_txt + N]
    base_ratio: float = 0.2  # weight of the base prompt's (unmasked) prediction
    steps: int = 10  # the regional pass runs for the first `steps` steps, then the base prompt alone


@dataclass
class DenoiseInputs:
    latents: Tensor  # packed initial latents [B, N, C]
    img_ids: Tensor  # [N, 3]
    schedule: Tensor  # the noise levels run, t_0 > ... > t_n = 0
    text: TextConditioning
    negative: TextConditioning | None = None
    guidance: list[float | tuple[float, ...]] | None = None  # distilled guidance per step (per image: a tuple);
    # None for models without the embedder
    true_cfg: list[float | tuple[float, ...]] | None = None  # per step (per image: a tuple), with `negative`
    img_cond: Tensor | None = None  # [B, N, extra channels]
    ref_tokens: Tensor | None = None  # [B, M, C]
    ref_ids: Tensor | None = None  # [M, 3]
    blend: Callable[[int, Tensor], Tensor] | None = None
    regional: RegionalInputs | None = None
    residuals: Callable[[int, Tensor, Tensor], BlockResiduals | None] | None = None
    cache_threshold: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.schedule) - 1


def denoise(
    transformer: FluxTransformer,
    inp: DenoiseInputs,
    progress: Callable | None = None,
    on_step: Callable[[int, Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict]:
    """Run the schedule from `inp.latents`; returns (final packed latents, step-cache stats of the main stream).

    `on_step(i, x)` (the pipeline's callback) sees the latents after step i and after the variant's blend."""
    n = inp.steps
    timesteps = inp.schedule[:-1].tolist()
    runner = lambda guidances: StepRunner(transformer, inp.cache_threshold, timesteps, guidances)  # noqa: E731
    g_all = inp.guidance
    pos = runner(g_all)
    cfg = inp.true_cfg if inp.negative is not None else None
    cfg_steps = [cfg is not None and _above_one(cfg[i]) for i in range(n)]
    batched = all(cfg_steps) and inp.negative.embeds.shape == inp.text.embeds.shape
    if batched:  # one transformer call on [cond; uncond] instead of two
        both = TextConditioning(torch.cat([inp.text.embeds, inp.negative.embeds]),
                                torch.cat([inp.text.pooled, inp.negative.pooled]), inp.text.ids)
    neg = runner(g_all) if any(cfg_steps) and not batched else None
    reg = runner(g_all) if inp.regional is not None else None
    width = inp.latents.shape[-1]
    img_ids = inp.img_ids if inp.ref_ids is None else torch.cat([inp.img_ids, inp.ref_ids])
    n_img = inp.latents.shape[1]

    def model_input(x: Tensor) -> Tensor:
        if inp.img_cond is not None:
            x = torch.cat([x, inp.img_cond.to(x.dtype)], dim=-1)
        if inp.ref_tokens is not None:
            x = torch.cat([x, inp.ref_tokens.to(x.dtype)], dim=1)
        return x

    def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
        g = None if g_all is None else _rows(g_all[i], x.shape[0], torch.float32, x.device)
        res = inp.residuals(i, x, t) if inp.residuals is not None else None
        h = model_input(x)

        def run(r: StepRunner, text: TextConditioning, xs=h, ts=t, gs=g, mask=None) -> Tensor:
            return r(i, xs, img_ids, text.embeds, text.ids, ts, text.pooled, gs, mask, res)[:, :n_img, :width]

        if batched:
            v, v_neg = run(pos, both, torch.cat([h, h]), torch.cat([t, t]), None if g is None else torch.cat([g, g])
                           ).chunk(2)
        else:
            v = run(pos, inp.text)
            v_neg = run(neg, inp.negative) if cfg_steps[i] else None
        if reg is not None and i < inp.regional.steps:
            r = inp.regional.base_ratio
            v = (1 - r) * run(reg, inp.regional.text, mask=inp.regional.mask) + r * v
        if v_neg is None:
            return v
        if not isinstance(cfg[i], tuple):
            return v_neg + cfg[i] * (v - v_neg)
        c = _rows(cfg[i], v.shape[0], v.dtype, v.device).view(-1, *[1] * (v.dim() - 1))
        on = _rows(tuple(float(k > 1) for k in cfg[i]), v.shape[0], torch.float32, v.device).view_as(c) > 0
        return torch.where(on, v_neg + c * (v - v_neg), v)  # an image with cfg <= 1 keeps v exactly

    def after_step(i: int, x: Tensor) -> Tensor:
        if inp.blend is not None:
            x = inp.blend(i, x)
        if on_step is not None:
            x = on_step(i, x)
        if not bool(torch.isfinite(x).all()):  # one reduction per step: stop before a black image is written
            raise NonFiniteLatents(f"the latents became NaN or infinite at step {i + 1} of {n} (non-finite weights, "
                                   "inputs, or a callback's output): no image was made")
        return x

    x = euler(velocity, inp.latents, inp.schedule, progress, after_step)
    return x, dict(pos.stats)


def _above_one(value) -> bool:
    return any(v > 1 for v in value) if isinstance(value, tuple) else value > 1


def _rows(value, batch: int, dtype, device) -> Tensor:
    """One step's value as a [batch] tensor: a number for every row, or one value per image (a tuple)."""
    if not isinstance(value, tuple):
        return torch.full((batch,), float(value), dtype=dtype, device=device)
    if len(value) != batch:
        raise ValueError(f"per-sample guidance has {len(value)} values for a batch of {batch} images")
    return torch.tensor(value, dtype=dtype, device=device)
