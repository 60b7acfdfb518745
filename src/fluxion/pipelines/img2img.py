"""FluxImg2ImgPipeline: image to image (SDEdit-style `strength`), called as diffusers' FluxImg2ImgPipeline is, so
scripts switch by one import and get the same image for the same seed.

Order of work, as diffusers 0.42: the init image is preprocessed to (height, width); the full schedule of
`num_inference_steps` is shifted for the output's token count and then cut at
`t_start = int(N - min(N * strength, N))`; the init image is VAE-encoded and a posterior *sample* drawn with the
generator (one image: `generator[0]` of a list), then the noise for the whole batch; the start is
`sigma * noise + (1 - sigma) * image_latents` with sigma = schedule[t_start].
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import noised, pack
from .base import FluxBasePipeline
from .guidance import GuidanceValue
from .image_inputs import init_image

IMAGE_CALL_DEFAULTS = {"guidance_scale": 7.0, "strength": 0.6, "num_inference_steps": 28}  # diffusers' img2img


class FluxImg2ImgPipeline(FluxBasePipeline):
    CALL_DEFAULTS = IMAGE_CALL_DEFAULTS

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: GuidanceValue | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float | None = None,
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
    ):
        """diffusers' FluxImg2ImgPipeline arguments (guidance 7.0, strength 0.6, 28 steps), plus `cache` /
        `cache_threshold`, guidance schedules and `guidance_start` / `guidance_end` as FluxPipeline takes them.

        `image`: a PIL image, numpy array, tensor or a list of them (one, or as many as divide the batch), resized
        to (height, width), which default to the model's size, not the image's; a tensor with the VAE's latent
        channels is taken as already-encoded latents. `latents`: packed start latents
        [batch * num_images_per_prompt, tokens, 64], used as given (the image is then neither encoded nor noised).
        """
        a = self._args_from(locals())
        self._check_latents(a)
        pixels = init_image(image, a.height, a.width, a.total, (self.vae.config.z_channels, *self._latent_grid(a)))
        text, negative = self._encode_prompts(a)
        schedule, t_start = self._schedule(a)
        start = self._img2img_start(a, pixels, schedule, t_start)
        x, stats = self._denoise(a, text, negative, start, schedule, t_start)
        return self._finish(a, x, a.num_inference_steps, stats, negative is not None, {"strength": a.strength})

    def _img2img_start(self, a, pixels: Tensor, schedule: Tensor, t_start: int) -> Tensor:
        """Packed start latents: the image's posterior sample (drawn first), then the noise, mixed at the cut's
        sigma; or the caller's `latents` as given (shared with FluxControlNetImg2ImgPipeline)."""
        if a.latents is not None:
            return a.latents
        z = self._init_image_latents(a, pixels)
        return pack(noised(z, self._noise(a), schedule[t_start]))
