"""FluxPipeline: text to image, called as diffusers' FluxPipeline is, so scripts switch by one import."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import pack
from . import regional as R
from .base import FluxBasePipeline
from .guidance import GuidanceValue


class FluxPipeline(FluxBasePipeline):
    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: GuidanceValue | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: GuidanceValue | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        cache: str | None = None,
        cache_threshold: float | None = None,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        regional_prompts: list[str] | None = None,
        regional_masks: list | None = None,
        regional_base_ratio: float = 0.2,
        regional_steps: int | None = None,
    ):
        """diffusers' FluxPipeline arguments, plus:
        - `cache="fbcache"` with `cache_threshold` (first-block step cache);
        - `guidance_scale` / `true_cfg_scale` as schedules, `guidance_start` / `guidance_end` (see
          `fluxion.pipelines.guidance`);
        - `regional_prompts` with `regional_masks` (one image-size mask per prompt, white = the region),
          `regional_base_ratio` (weight of the base prompt's pass) and `regional_steps` (steps with the regional
          pass, default a third): see `fluxion.pipelines.regional`.
        """
        a = self._args_from(locals())
        self._check_latents(a)
        regions = R.check(regional_prompts, regional_masks, regional_base_ratio, regional_steps, a.num_inference_steps)
        text, negative = self._encode_prompts(a)
        regional = R.prepare(self, a, regions, text.pooled) if regions is not None else None
        schedule, _ = self._schedule(a)
        latents = a.latents if a.latents is not None else pack(self._noise(a))
        x, stats = self._denoise(a, text, negative, latents, schedule, regional=regional)
        extra = R.describe(regions) if regions is not None else {}
        return self._finish(a, x, len(schedule) - 1, stats, negative is not None, extra)
