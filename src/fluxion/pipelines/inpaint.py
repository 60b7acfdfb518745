"""FluxInpaintPipeline: repaint the white part of a mask with a base (64-channel) FLUX model, called as diffusers'
FluxInpaintPipeline is, with the same image for the same seed.

As diffusers 0.42: the start is prepared as img2img's (image sample, then noise, strength cut); the mask is
greyscale, binarised at 0.5, nearest-downsampled to the latent grid and packed; after each step but the last
the clean image latents, re-noised to the next sigma with the same noise, replace the latents outside the mask;
after the last step the clean latents do. `padding_mask_crop` works on a crop around the mask, resized with
resize_mode="fill", and pastes the result back into the original (`image_inputs.overlay`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flow import noised, pack
from .base import CallArgs, FluxBasePipeline
from .guidance import GuidanceValue
from .image_inputs import init_image, overlay, padding_crop, preprocess_mask
from .img2img import IMAGE_CALL_DEFAULTS


@dataclass
class InpaintInputs:
    box: tuple | None  # padding_mask_crop's crop box
    shape: tuple[int, int, int]  # latent (channels, h, w)
    pixels: Tensor
    mask: Tensor  # [n, 1, H, W], 1 = repaint
    draw_masked_image: Callable[[], None]


class FluxInpaintPipeline(FluxBasePipeline):
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
        mask_image=None,
        masked_image_latents: Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
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
        """diffusers' FluxInpaintPipeline arguments (guidance 7.0, strength 0.6, 28 steps), plus the extras
        FluxPipeline takes (`cache`, guidance schedules, `guidance_start` / `guidance_end`).

        `image` as FluxImg2ImgPipeline takes it; `mask_image` (white = repaint) one mask or as many as divide the
        batch; `padding_mask_crop` (pixels) needs a PIL image and mask and output_type="pil". `latents`: the start
        and the noise the original is re-noised with, unpacked [batch * num_images_per_prompt, 16, h, w] as
        diffusers takes them here. `masked_image_latents` are only drawn for (64-channel models do not use them).
        """
        a = self._args_from(locals())
        prep = self._inpaint_inputs(a, image, mask_image, masked_image_latents, padding_mask_crop)
        text, negative = self._encode_prompts(a)
        schedule, t_start = self._schedule(a)
        start, blend = self._inpaint_start(a, prep, schedule, t_start)
        x, stats = self._denoise(a, text, negative, start, schedule, t_start, blend=blend)
        return self._finish(a, x, a.num_inference_steps, stats, negative is not None,
                            {"strength": a.strength, "padding_mask_crop": padding_mask_crop},
                            self._pasted(prep, x, a, image, mask_image))

    # the steps of an inpainting call, shared with FluxControlNetInpaintPipeline

    def _inpaint_inputs(self, a: CallArgs, image, mask_image, masked_image_latents, padding_mask_crop) -> InpaintInputs:
        """Preprocess and check the image, the mask and `masked_image_latents` (before any model runs)."""
        box = padding_crop(image, mask_image, padding_mask_crop, a.output_type, a.width, a.height)
        resize = "default" if box is None else "fill"
        shape = (self.vae.config.z_channels, *self._latent_grid(a))
        pixels = init_image(image, a.height, a.width, a.total, shape, crop=box, resize_mode=resize)
        if mask_image is None:
            raise ValueError("mask_image is required (white = the region to repaint)")
        mask = preprocess_mask(mask_image, a.height, a.width, crop=box, resize_mode=resize)
        if a.total % mask.shape[0]:
            raise ValueError(f"mask_image holds {mask.shape[0]} masks for {a.total} outputs (batch x "
                             "num_images_per_prompt): give one mask, or a number that divides the outputs")
        draw_masked_image = self._masked_image_draw(a, pixels, mask, masked_image_latents)
        if a.latents is not None and tuple(a.latents.shape) != (a.total, *shape):
            raise ValueError(f"latents must be unpacked [batch*num_images_per_prompt, channels, h, w] = "
                             f"{[a.total, *shape]} for {a.height}x{a.width}, got {list(a.latents.shape)}")
        return InpaintInputs(box, shape, pixels, mask, draw_masked_image)

    def _inpaint_start(self, a: CallArgs, prep: InpaintInputs, schedule: Tensor, t_start: int):
        """(packed start latents, the per-step blend), drawing as diffusers does: the image sample, the noise,
        the masked image."""
        z = self._init_image_latents(a, prep.pixels)  # draw 1: the image sample
        if a.latents is None:
            noise = self._noise(a)  # draw 2
            start = noised(z, noise, schedule[t_start])
        else:
            noise = start = a.latents.to(self.device, z.dtype)
        prep.draw_masked_image()  # draw 3
        shape, mask = prep.shape, prep.mask
        keep = F.interpolate(mask, size=shape[1:]).repeat(a.total // mask.shape[0], shape[0], 1, 1)
        dtype = self.transformer.compute_dtype
        z, noise, keep = (pack(t).to(self.device, dtype) for t in (z, noise, keep))
        run = schedule[t_start:]

        def blend(i: int, x: Tensor) -> Tensor:
            original = z if i == len(run) - 2 else noised(z, noise, run[i + 1])
            return (1 - keep) * original + keep * x

        return pack(start), blend

    def _pasted(self, prep: InpaintInputs, x: Tensor, a: CallArgs, image, mask_image):
        """With `padding_mask_crop`: the generated crop pasted back into the original (PIL images); else None."""
        if prep.box is None:
            return None
        return [overlay(mask_image, image, im, prep.box) for im in self.decode(x, a.height, a.width, "pil")]

    def _masked_image_draw(self, a: CallArgs, pixels: Tensor, mask: Tensor, given) -> Callable[[], None]:
        """Check `masked_image_latents`; return what stands in for diffusers' encoding of the masked image.

        diffusers samples the masked image's VAE posterior after the noise (a generator draw) although 64-channel
        models never use it: a draw of the same shape leaves a reused generator where diffusers leaves it,
        without running the VAE encoder. Latents given with the VAE's channels are not drawn for."""
        c, h, w = self.vae.config.z_channels, *self._latent_grid(a)
        if given is None:
            if pixels.shape[1] != 3:
                raise ValueError("image given as latents needs masked_image_latents too (latents cannot be masked)")
            n, m = pixels.shape[0], mask.shape[0]
            if n != m and 1 not in (n, m):
                raise ValueError(f"{n} images and {m} masks: give one of either, or as many of each")
            n = max(n, m)
        else:
            want = [(c, h, w), (3, a.height, a.width)]
            if not isinstance(given, Tensor) or given.ndim != 4 or tuple(given.shape[1:]) not in want:
                got = list(given.shape) if isinstance(given, Tensor) else type(given).__name__
                raise ValueError(f"masked_image_latents must be a tensor [n, {c}, {h}, {w}] (latents) or "
                                 f"[n, 3, {a.height}, {a.width}] (pixels), got {got}")
            n = given.shape[0]
            if a.total % n:
                raise ValueError(f"masked_image_latents holds {n} items for {a.total} outputs: give a number that "
                                 "divides the outputs")
            if given.shape[1] == c:
                return lambda: None
        gens = a.generator if isinstance(a.generator, list) else [a.generator]
        dtype = self.vae.dtype

        def draw() -> None:
            if len(gens) > 1:  # diffusers' randn_tensor: one (1, ...) draw per item from its own generator
                for g in gens[:n]:
                    torch.randn((1, c, h, w), generator=g, dtype=dtype, device=g.device)
            else:
                torch.randn((n, c, h, w), generator=gens[0], dtype=dtype,
                            device=gens[0].device if gens[0] is not None else self.device)

        return draw
