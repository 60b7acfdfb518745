"""FluxControlNetImg2ImgPipeline: img2img (`strength`, as FluxImg2ImgPipeline) with ControlNets, called as
diffusers' pipeline of the same name."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .controlnet import FluxControlNetPipeline
from .guidance import GuidanceValue
from .image_inputs import init_image
from .img2img import IMAGE_CALL_DEFAULTS, FluxImg2ImgPipeline


class FluxControlNetImg2ImgPipeline(FluxControlNetPipeline, FluxImg2ImgPipeline):
    """diffusers' FluxControlNetImg2ImgPipeline: img2img (`strength`, as FluxImg2ImgPipeline) with ControlNets.
    Generator draws in diffusers' order: the control image(s), the init image, the noise; the control window
    counts the steps run after the strength cut."""

    CALL_DEFAULTS = IMAGE_CALL_DEFAULTS

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
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
        """diffusers' FluxControlNetImg2ImgPipeline arguments (strength 0.6, 28 steps, guidance 7.0); `image` as
        FluxImg2ImgPipeline takes it, the control arguments as FluxControlNetPipeline's."""
        if self.controlnet is None:
            raise ValueError("FluxControlNetImg2ImgPipeline has no ControlNet: pass controlnet= to from_pretrained")
        a = self._args_from(locals())
        self._check_latents(a)
        pixels = init_image(image, a.height, a.width, a.total, (self.vae.config.z_channels, *self._latent_grid(a)))
        plan = self._control_plan(a, control_image, control_mode, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end)
        text, _ = self._encode_prompts(a)
        conds = self._control_inputs(a, plan)
        schedule, t_start = self._schedule(a)
        start = self._img2img_start(a, pixels, schedule, t_start)  # the init image's sample, then the noise
        x, stats = self._denoise(a, text, None, start, schedule, t_start,
                                 residuals=self._residuals(a, text, schedule, t_start, plan, conds))
        return self._finish(a, x, a.num_inference_steps, stats, False,
                            {"strength": a.strength, **self._describe(plan)})
