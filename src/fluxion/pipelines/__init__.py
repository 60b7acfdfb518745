"""FLUX pipelines, named and called as diffusers' are: one base (`base`), one denoising core (`core`), one
small module per variant."""
from __future__ import annotations

import importlib

from .base import FluxBasePipeline, FluxPipelineOutput, PipelineDefaults, default_model_dir
from .text2image import FluxPipeline

VARIANTS = {  # class name -> module (imported when first asked for)
    "FluxImg2ImgPipeline": "img2img",
    "FluxInpaintPipeline": "inpaint",
    "FluxFillPipeline": "fill",
    "FluxControlPipeline": "control",
    "FluxKontextPipeline": "kontext",
    "FluxControlNetPipeline": "controlnet",
    "FluxControlNetImg2ImgPipeline": "controlnet_img2img",
    "FluxControlNetInpaintPipeline": "controlnet_inpaint",
    "FluxPriorReduxPipeline": "redux",
}
__all__ = ["FluxBasePipeline", "FluxPipeline", "FluxPipelineOutput", "PipelineDefaults", "default_model_dir",
           "model_kind_hint", *VARIANTS]


def __getattr__(name):
    if name in VARIANTS:
        return getattr(importlib.import_module(f".{VARIANTS[name]}", __name__), name)
    raise AttributeError(name)


def model_kind_hint(config) -> str:
    """Which pipeline class drives a transformer, from its channel layout (for error messages)."""
    inc, outc = config.in_channels, config.out_channels
    if inc == outc:
        return "a text-to-image model: use FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline or FluxKontextPipeline"
    if inc == 2 * outc:
        return "a Control model (Canny/Depth, noisy + control-image channels): use FluxControlPipeline"
    if inc > 2 * outc:
        return "a Fill model (noisy + masked-image + mask channels): use FluxFillPipeline"
    return f"an unknown channel layout ({inc} in, {outc} out)"
