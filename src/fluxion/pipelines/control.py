"""FluxControlPipeline: FLUX.1 Canny / Depth [dev] structural conditioning, called as diffusers'
FluxControlPipeline.

The control image (a Canny edge map, a depth map: `fluxion.control`) is VAE-encoded and packed, and its channels
are concatenated after the noisy latent's at every step: [noisy | control], twice the output channels. Two kinds of
model take that: a full Control model (flux1-canny-dev, flux1-depth-dev), and a 64-channel base after a control
LoRA is loaded (`load_lora_weights` widens the base's input layer with zero columns, as diffusers does;
`unload_lora_weights(reset_to_overwritten_params=True)` gives the base back).

Generator draws in diffusers' order: the control image, repeated to the batch first (one draw of the whole
batch), then the noise.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import pack
from ..lora.expand import OVERWRITTEN_ATTR
from .base import FluxBasePipeline
from .guidance import GuidanceValue
from .image_inputs import preprocess_image


class FluxControlPipeline(FluxBasePipeline):
    CALL_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 3.5}

    def _check_model(self) -> None:
        """A Control model (in = 2 x out), or a base model (in = out) waiting for a control LoRA."""
        c = self.transformer.config
        if c.in_channels not in (c.out_channels, 2 * c.out_channels):
            from . import model_kind_hint

            raise ValueError(f"FluxControlPipeline drives Control models ({c.out_channels} noisy + {c.out_channels} "
                             f"control channels) or a base model with a control LoRA; this transformer takes "
                             f"{c.in_channels} input channels: {model_kind_hint(c)}")

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        control_image=None,
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
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        cache: str | None = None,
        cache_threshold: float | None = None,
    ):
        """diffusers' FluxControlPipeline arguments. `control_image`: one image for every prompt, or one per
        prompt; PIL images and arrays are resized to height x width (default 1024 x 1024) and scaled to [-1, 1];
        a single [B, 3, H, W] tensor is taken as given (already in [-1, 1], as diffusers takes it) and a
        [B, tokens, C] tensor as already encoded, packed control latents. Plus `cache` / `cache_threshold`."""
        a = self._args_from(locals())
        self._check_latents(a)
        control = self._control_input(a, control_image)
        text, negative = self._encode_prompts(a)
        if control.ndim == 4:  # pixels: one draw for the whole (repeated) batch, before the noise
            control = pack(self.encode_image(control, a.generator))
        control = control.to(self.device)
        x = a.latents if a.latents is not None else pack(self._noise(a))
        schedule, _ = self._schedule(a)
        x, stats = self._denoise(a, text, negative, x, schedule, img_cond=control)
        widened = OVERWRITTEN_ATTR in self.transformer.__dict__
        extra = {"control_lora": self.get_active_adapters()} if widened else {}
        return self._finish(a, x, len(schedule) - 1, stats, negative is not None, extra)

    def _control_input(self, a, control_image) -> Tensor:
        """The control image repeated to the batch: pixels [total, 3, H, W] in [-1, 1], or packed latents."""
        c = self.transformer.config
        if c.in_channels == c.out_channels:
            raise ValueError(f"this transformer takes {c.in_channels} input channels, a base model: load a control "
                             "LoRA (Canny / Depth) with load_lora_weights first, or use FluxPipeline")
        if control_image is None:
            raise ValueError("FluxControlPipeline needs control_image (a Canny edge map or depth map: see "
                             "fluxion.control)")
        tokens = (a.height // self.vae_scale_factor // 2) * (a.width // self.vae_scale_factor // 2)
        if isinstance(control_image, Tensor) and control_image.ndim == 3:
            want, what = (tokens, c.in_channels - c.out_channels), "packed control latents [B, tokens, channels]"
        elif isinstance(control_image, Tensor) and control_image.ndim == 4:
            want, what = (3, a.height, a.width), "a control image tensor [B, 3, height, width] in [-1, 1]"
        else:
            x = preprocess_image(control_image, a.height, a.width, "control_image")
            want, what = None, None
        if want is not None:
            if tuple(control_image.shape[1:]) != want or not torch.isfinite(control_image).all():
                raise ValueError(f"control_image: {what} must be [B, {', '.join(map(str, want))}] (finite) for "
                                 f"{a.height}x{a.width}, got {list(control_image.shape)}")
            x = control_image.detach().float()
        n = x.shape[0]
        if n not in (1, a.batch):
            raise ValueError(f"got {n} control images for {a.batch} prompts: give one, or one per prompt")
        return x.repeat_interleave(a.total if n == 1 else a.num_images_per_prompt, dim=0)
