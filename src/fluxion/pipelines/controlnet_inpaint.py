"""FluxControlNetInpaintPipeline: inpainting (as FluxInpaintPipeline) with ControlNets, called as diffusers'
pipeline of the same name."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .controlnet import FluxControlNetPipeline
from .guidance import GuidanceValue
from .img2img import IMAGE_CALL_DEFAULTS
from .inpaint import FluxInpaintPipeline


class FluxControlNetInpaintPipeline(FluxControlNetPipeline, FluxInpaintPipeline):
    """diffusers' FluxControlNetInpaintPipeline: inpainting (as FluxInpaintPipeline: mask binarised, re-noised
    original blended outside it after every step, `padding_mask_crop`) with ControlNets. Generator draws in
    diffusers' order: the control image(s), the init image, the noise, the masked image (encoded, unused by
    64-channel models). The control image is resized to (height, width), never cropped. With `padding_mask_crop`
    the generated crop is pasted back into the original, as FluxInpaintPipeline (and diffusers' own
    FluxInpaintPipeline) does; diffusers' ControlNet inpaint variant returns the bare crop instead."""

    CALL_DEFAULTS = IMAGE_CALL_DEFAULTS

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: Tensor | None = None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float | None = None,
        padding_mask_crop: int | None = None,
        sigmas: list[float] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: GuidanceValue | None = None,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_mode: int | list[int] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        cache: str | None = None,
        cache_threshold: float | None = None,
    ):
        """diffusers' FluxControlNetInpaintPipeline arguments (strength 0.6, 28 steps, guidance 7.0); `image`,
        `mask_image`, `masked_image_latents`, `padding_mask_crop` and `latents` as FluxInpaintPipeline takes them,
        the control arguments as FluxControlNetPipeline's."""
        if self.controlnet is None:
            raise ValueError("FluxControlNetInpaintPipeline has no ControlNet: pass controlnet= to from_pretrained")
        a = self._args_from(locals())
        prep = self._inpaint_inputs(a, image, mask_image, masked_image_latents, padding_mask_crop)
        plan = self._control_plan(a, control_image, control_mode, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end)
        text, _ = self._encode_prompts(a)
        conds = self._control_inputs(a, plan)  # the control draws come first
        schedule, t_start = self._schedule(a)
        start, blend = self._inpaint_start(a, prep, schedule, t_start)  # image sample, noise, masked image
        x, stats = self._denoise(a, text, None, start, schedule, t_start, blend=blend,
                                 residuals=self._residuals(a, text, schedule, t_start, plan, conds))
        extra = {"strength": a.strength, "padding_mask_crop": padding_mask_crop, **self._describe(plan)}
        images = self._pasted(prep, x, a, image, mask_image)
        return self._finish(a, x, a.num_inference_steps, stats, False, extra, images)
