"""FluxFillPipeline: FLUX.1 Fill [dev] inpainting and outpainting, called as diffusers' FluxFillPipeline.

Each token fed to the model is [noisy latent | masked-image latent | mask]: the mask (white = repaint) at full
resolution, each f x f pixel block moved into f^2 channels (f = the VAE's scale factor), packed 2x2 like the
latents. Generator draws in diffusers' order: a sample of the init image (even at strength 1.0, where it only
advances the generator), the noise, a sample of the masked image. Outpainting is a mask that covers the border.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import noised, pack
from .base import FluxBasePipeline
from .guidance import GuidanceValue
from .image_inputs import init_image, preprocess_mask


def pack_mask(mask: Tensor, f: int) -> Tensor:
    """[B, 1, H, W] -> [B, L, 4 f^2]: each f x f block into channels (py * f + px), then packed 2x2."""
    b, _, height, width = mask.shape
    h, w = height // f, width // f
    return pack(mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w))


def _tile(x: Tensor, total: int) -> Tensor:
    return x.repeat(total // x.shape[0], *([1] * (x.ndim - 1)))  # as diffusers: [a, b] -> [a, b, a, b]


def _check_count(n: int, total: int, name: str) -> None:
    if n > total or total % n:
        raise ValueError(f"got {n} {name} for {total} outputs (batch x num_images_per_prompt): give one, or a "
                         f"number that divides {total}")


class FluxFillPipeline(FluxBasePipeline):
    CALL_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 30.0, "strength": 1.0}

    def _check_model(self) -> None:
        c = self.transformer.config
        f = self.vae.downsample_factor if hasattr(self, "vae") else None
        if c.in_channels <= 2 * c.out_channels or (f and c.in_channels != 2 * c.out_channels + 4 * f * f):
            from . import model_kind_hint

            raise ValueError(f"FluxFillPipeline drives Fill models ({c.out_channels} noisy + {c.out_channels} "
                             f"masked-image + mask channels); this transformer takes {c.in_channels} input channels: "
                             f"{model_kind_hint(c)}")

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: Tensor | None = None,
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
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        cache: str | None = None,
        cache_threshold: float | None = None,
    ):
        """diffusers' FluxFillPipeline arguments: `image` and `mask_image` (white = repaint) are resized to
        height x width (default 1024 x 1024, not the image's size); an `image` tensor with the VAE's latent
        channels is taken as its latents. `masked_image_latents` (packed [B, tokens, masked-image + mask
        channels]) replaces `mask_image`; `image` is then needed only when the start is not pure noise
        (strength < 1). Plus `cache="fbcache"` / `cache_threshold` as FluxPipeline."""
        a = self._args_from(locals())
        self._check_latents(a)
        init, mask = self._fill_inputs(a, image, mask_image, masked_image_latents)
        text, negative = self._encode_prompts(a)
        schedule, t_start = self._schedule(a)
        x = a.latents
        if x is None:
            z = None if init is None else self.encode_image(init, a.generator) if init.shape[1] == 3 \
                else init.to(self.device, self.transformer.dtype)  # draw (a), unless given latents
            noise = self._noise(a)  # draw (b)
            x = pack(noise if z is None else noised(_tile(z, a.total), noise, schedule[t_start]))
        if masked_image_latents is None:
            masked = self.encode_image(init * (1 - mask), a.generator)  # draw (c)
            packed_mask = pack_mask(_tile(mask, a.total), self.vae_scale_factor).to(masked.device, masked.dtype)
            cond = torch.cat([pack(_tile(masked, a.total)), packed_mask], dim=-1)
        else:
            cond = masked_image_latents.to(self.device).expand(a.total, -1, -1)
        x, stats = self._denoise(a, text, negative, x, schedule, t_start, img_cond=cond)
        extra = {"strength": a.strength}
        if mask is not None:
            extra["mask_coverage"] = round(float(mask.mean()), 4)
        return self._finish(a, x, len(schedule) - 1 - t_start, stats, negative is not None, extra)

    def _fill_inputs(self, a, image, mask_image, masked_image_latents) -> tuple[Tensor | None, Tensor | None]:
        """(init image [n, 3, H, W] in [-1, 1] or None, binarised mask [m, 1, H, W] or None), all checked."""
        c = self.transformer.config
        if masked_image_latents is not None:
            if mask_image is not None:
                raise ValueError("pass mask_image or masked_image_latents, not both")
            want = ((a.height // self.vae_scale_factor // 2) * (a.width // self.vae_scale_factor // 2),
                    c.in_channels - c.out_channels)
            shape = tuple(getattr(masked_image_latents, "shape", ()))
            if len(shape) != 3 or shape[0] not in (1, a.total) or shape[1:] != want \
                    or not torch.isfinite(masked_image_latents).all():
                raise ValueError(f"masked_image_latents must be packed [1 or {a.total}, {want[0]}, {want[1]}] for "
                                 f"{a.height}x{a.width} (finite values), got {list(shape)}")
            first = 1.0 if a.sigmas is None else float(list(a.sigmas)[0])
            if image is None and a.latents is None and (a.strength < 1 or first < 1):
                raise ValueError("image is needed to start below pure noise (strength < 1 or sigmas[0] < 1)")
        elif image is None or mask_image is None:
            raise ValueError("FluxFillPipeline needs image and mask_image (white = the region to fill), or "
                             "masked_image_latents")
        lat_h, lat_w = self._latent_grid(a)
        init = init_image(image, a.height, a.width, a.total, (c.out_channels // 4, lat_h, lat_w)) \
            if image is not None else None
        mask = preprocess_mask(mask_image, a.height, a.width) if mask_image is not None else None
        if mask is not None:
            if init.shape[1] != 3:
                raise ValueError("image given as latents cannot be masked: pass masked_image_latents with it")
            _check_count(mask.shape[0], a.total, "masks")
            if init.shape[0] != mask.shape[0] and 1 not in (init.shape[0], mask.shape[0]):
                raise ValueError(f"got {init.shape[0]} images and {mask.shape[0]} masks: give as many of each, "
                                 "or one of either")
        return init, mask
