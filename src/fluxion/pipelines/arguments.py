"""A pipeline call's arguments: the defaults a model folder may set, the common arguments of every variant with
their defaults filled in (`CallArgs`), and their checks, all made before any model runs (including whether the
request can fit in memory)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from ..flow import strength_start
from . import guidance as G

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineDefaults:
    """Call defaults: diffusers' values for each pipeline class (its `CALL_DEFAULTS`), except
    max_sequence_length 256 for schnell-style models; a model folder may set its own in model_index.json under
    `_fluxion_defaults` (fluxion-mini does), which win."""

    sample_size: int = 128  # in latent pixels; x vae_scale_factor gives the image side
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None  # used with true_cfg_scale > 1 when the call gives none
    strength: float = 0.6  # img2img, inpainting, Fill

    @classmethod
    def for_model(cls, guidance_embed: bool, **overrides) -> "PipelineDefaults":
        return cls(**{"max_sequence_length": 512 if guidance_embed else 256, **overrides})


@dataclass
class CallArgs:
    """One call's common arguments with defaults filled in and checked (`FluxBasePipeline._common_args`)."""

    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    true_cfg_scale: G.GuidanceValue = 1.0
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    sigmas: list[float] | None = None
    guidance_scale: G.GuidanceValue | None = None
    num_images_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    output_type: str = "pil"
    return_dict: bool = True
    callback_on_step_end: Callable | None = None
    max_sequence_length: int | None = None
    cache_threshold: float = 0.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    strength: float = 1.0  # img2img, inpainting, Fill: how far down the schedule to start
    batch: int = 1  # prompts

    @property
    def total(self) -> int:
        return self.batch * self.num_images_per_prompt

    @property
    def do_true_cfg(self) -> bool:
        has_negative = self.negative_prompt is not None or self.negative_prompt_embeds is not None
        return has_negative and G.may_exceed_one(self.true_cfg_scale)

    def generator_at(self, i: int):
        return self.generator[i] if isinstance(self.generator, list) else self.generator


CALL_NAMES = tuple(f.name for f in fields(CallArgs) if f.name != "batch") + ("cache",)


def prompt_list(prompt, batch: int) -> list:
    if prompt is None or isinstance(prompt, str):
        return [prompt] * batch
    return list(prompt)


def match_batch(value: str | list[str], batch: int, name: str) -> list[str]:
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a str or a list of str, got {type(value).__name__}")
    values = [value] * batch if isinstance(value, str) else list(value)
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries but there are {batch} prompts")
    return values


def check_call(pipe, a: CallArgs) -> int:
    """All common argument checks, before any model runs; returns the number of prompts."""
    prompt, prompt_embeds = a.prompt, a.prompt_embeds
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass a prompt (str or list of str) or prompt_embeds")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if prompt_embeds is not None and a.pooled_prompt_embeds is None:
        raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the CLIP pooled vector)")
    if prompt is not None:
        if isinstance(prompt, str):
            batch = 1
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            if not prompt:
                raise ValueError("prompt is an empty list: give at least one prompt")
            batch = len(prompt)
        else:
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    else:
        batch = prompt_embeds.shape[0]
        cfg = pipe.transformer.config
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.context_in_dim:
            raise ValueError(f"prompt_embeds must be [B, L, {cfg.context_in_dim}], got {list(prompt_embeds.shape)}")
        if tuple(a.pooled_prompt_embeds.shape) != (batch, cfg.vec_in_dim):
            raise ValueError(f"pooled_prompt_embeds must be [{batch}, {cfg.vec_in_dim}], "
                             f"got {list(a.pooled_prompt_embeds.shape)}")
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
        value = getattr(a, name)
        if value is not None and not isinstance(value, str):
            match_batch(value, batch, name)
    if a.sigmas is not None:
        s = list(a.sigmas)
        if (not s or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in s)
                or any(x <= y for x, y in zip(s, s[1:]))):
            raise ValueError(f"sigmas must be a non-empty, strictly decreasing list of values in (0, 1], got {s!r}")
    for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                 "negative_pooled_prompt_embeds"):
        value = getattr(a, name)
        if value is not None and (not isinstance(value, Tensor) or not torch.isfinite(value).all()):
            raise ValueError(f"{name} must be a tensor of finite numbers (it holds NaN or inf)"
                             if isinstance(value, Tensor) else f"{name} must be a tensor, got {type(value).__name__}")
    multiple = pipe.vae_scale_factor * 2
    for name in ("height", "width"):
        v = getattr(a, name)
        if not isinstance(v, int) or v <= 0 or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}")
    steps = a.num_inference_steps
    if a.sigmas is None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if a.sigmas is not None:
        a.num_inference_steps = len(list(a.sigmas))
    n = a.num_images_per_prompt
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
    if a.output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {a.output_type!r}")
    m = a.max_sequence_length
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 512:
        raise ValueError(f"max_sequence_length must be an integer in [1, 512], got {m!r}")
    if isinstance(a.generator, list) and len(a.generator) != batch * n:
        raise ValueError(f"got {len(a.generator)} generators for {batch * n} images "
                         "(one per image, or a single generator)")
    st = a.strength
    if isinstance(st, bool) or not isinstance(st, (int, float)) or not 0 < st <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {st!r}")
    run = a.num_inference_steps - strength_start(a.num_inference_steps, st)
    if run < 1:
        raise ValueError(f"strength {st} with {a.num_inference_steps} steps leaves no step to run: raise either")
    for name in ("guidance_scale", "true_cfg_scale"):
        G.check(getattr(a, name), a.num_inference_steps, run, name)
    G.check_window(a.guidance_start, a.guidance_end)
    check_fits_in_memory(pipe, a.batch * n * (2 if a.do_true_cfg else 1), a.height, a.width)
    return batch


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def activation_bytes(pipe, rows: int, height: int, width: int) -> int:
    """A generous estimate of the peak activation memory of one call (the weights are already loaded): the
    transformer's widest activations (the single blocks' fused projection, float32) for `rows` sequences, and
    the VAE decoder's full-resolution feature maps (one image at a time with slicing, one tile with tiling)."""
    c = pipe.transformer.config
    tokens = (height // (2 * pipe.vae_scale_factor)) * (width // (2 * pipe.vae_scale_factor)) + 512
    transformer = rows * tokens * c.hidden_size * int(3 + 2 * c.mlp_ratio) * 4 * 2
    vae = pipe.vae
    images = 1 if vae.use_slicing else rows
    side_h, side_w = (min(height, vae.tile_sample_min_size), min(width, vae.tile_sample_min_size)) \
        if getattr(vae, "use_tiling", False) else (height, width)
    decoder = images * side_h * side_w * vae.config.ch * vae.config.ch_mult[0] * 4 * 4
    return transformer + decoder


def check_fits_in_memory(pipe, rows: int, height: int, width: int) -> None:
    """Refuse, before allocating, a request whose activations cannot fit in this machine's available memory."""
    need, have = activation_bytes(pipe, rows, height, width), available_memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"a {height}x{width} image (batch of {rows} sequences) needs about {need / 2**30:.1f} GiB of "
                         f"activations, more than the {have / 2**30:.1f} GiB available: ask for a smaller size or "
                         "batch, or enable_vae_tiling()")
