"""FluxKontextPipeline: in-context image editing (FLUX.1 Kontext [dev]), called as diffusers' FluxKontextPipeline.

As diffusers 0.42 computes it: `height`/`width` give only the aspect ratio and `max_area` the pixel count of the
output (floored to multiples of 2 * vae_scale_factor). The reference image is resized with lanczos to the
preferred Kontext resolution closest to its aspect ratio (`_auto_resize=False`: its own size, floored), encoded
with the VAE posterior's mean (no generator draw) and packed; at every step its tokens, with ids whose first
coordinate is 1, follow the noisy tokens, and their predictions are dropped (before true CFG combines).
A tensor with the VAE's latent channels is taken as already-encoded latents. Without `image`: text to image.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import image_ids, pack
from .base import FluxBasePipeline
from .guidance import GuidanceValue
from .image_inputs import preprocess_image, size_of

PREFERRED_KONTEXT_RESOLUTIONS = (  # (width, height), ~1 MP, the sizes Kontext was trained on
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


def output_size(height: float, width: float, max_area: float, multiple: int) -> tuple[int, int]:
    """(height, width) of the output: the aspect ratio of width/height at about `max_area` pixels, floored."""
    ratio = width / height
    w, h = round((max_area * ratio) ** 0.5), round((max_area / ratio) ** 0.5)
    return h // multiple * multiple, w // multiple * multiple


def reference_size(height: int, width: int, multiple: int, auto_resize: bool = True) -> tuple[int, int]:
    """(height, width) the reference image is resized to: its size floored to `multiple`, or with `auto_resize`
    the preferred resolution nearest to that floored size's aspect ratio."""
    height, width = height - height % multiple, width - width % multiple
    if height <= 0 or width <= 0:
        raise ValueError(f"image must be at least {multiple}x{multiple} pixels")
    if auto_resize:
        ratio = width / height
        _, width, height = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // multiple * multiple, width // multiple * multiple


class FluxKontextPipeline(FluxBasePipeline):
    CALL_DEFAULTS = {"guidance_scale": 3.5, "num_inference_steps": 28}

    @torch.no_grad()
    def generate(
        self,
        image=None,
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
        max_area: int = 1024**2,
        _auto_resize: bool = True,
        cache: str | None = None,
        cache_threshold: float | None = None,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
    ):
        """diffusers' FluxKontextPipeline arguments (`image`: a PIL image, array or tensor in [0, 1], a list of
        one kind, or latents [B, C_latent, h, w]), plus FluxPipeline's `cache`, guidance schedules and window."""
        if isinstance(max_area, bool) or not isinstance(max_area, (int, float)) or not max_area > 0:
            raise ValueError(f"max_area must be a number of pixels > 0, got {max_area!r}")
        side, multiple = self.defaults.sample_size * self.vae_scale_factor, self.vae_scale_factor * 2
        for name, v in (("height", height), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name} must be a positive number (it sets the aspect ratio), got {v!r}")
        out_h, out_w = output_size(height or side, width or side, max_area, multiple)
        if out_h < multiple or out_w < multiple:
            raise ValueError(f"max_area {max_area} gives a {out_w}x{out_h} output: too small (at least "
                             f"{multiple}x{multiple})")
        a = self._args_from(locals(), height=out_h, width=out_w)
        self._check_latents(a)
        ref = self._reference(image, a.total, multiple, _auto_resize) if image is not None else None
        text, negative = self._encode_prompts(a)
        extras, extra = {}, {"max_area": max_area, "auto_resize": _auto_resize}
        if ref is not None:
            given_latents = ref.shape[1] == self._latent_channels
            z = ref if given_latents else self.encode_image(ref, sample=False)  # the mean: no generator draw
            z = z.to(self.device, self.transformer.dtype).repeat(a.total // z.shape[0], 1, 1, 1)
            extras = {"ref_tokens": pack(z), "ref_ids": image_ids(z.shape[2], z.shape[3], self.device, index=1)}
            f = self.vae_scale_factor if given_latents else 1
            extra.update(reference_height=ref.shape[2] * f, reference_width=ref.shape[3] * f)
        schedule, _ = self._schedule(a)
        latents = a.latents if a.latents is not None else pack(self._noise(a))
        x, stats = self._denoise(a, text, negative, latents, schedule, **extras)
        return self._finish(a, x, len(schedule) - 1, stats, negative is not None, extra)

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def _reference(self, image, total: int, multiple: int, auto_resize: bool) -> Tensor:
        """The reference as pixels [B, 3, h, w] in [-1, 1] at its Kontext size, or given latents; checked only."""
        if isinstance(image, Tensor) and image.ndim == 4 and image.shape[1] == self._latent_channels:
            if image.shape[2] % 2 or image.shape[3] % 2 or not torch.isfinite(image).all():
                raise ValueError(f"image latents must be finite with an even height and width, got "
                                 f"{list(image.shape)}")
            ref = image.float()
        else:
            ref = preprocess_image(image, *reference_size(*size_of(image), multiple, auto_resize))
        if total % ref.shape[0]:
            raise ValueError(f"got {ref.shape[0]} images for {total} outputs: give one image, or one per output "
                             "(a number that divides the batch)")
        return ref
