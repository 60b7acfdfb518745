"""FluxPipeline: text to image, called as diffusers' FluxPipeline is, so scripts switch by one import."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoints import CheckpointError, load_autoencoder, load_transformer
from .checkpoints.pages import release_pages, stream_blocks
from .compute import DtypePlan, log_once, parse_dtype, plan, storage_dtype, use_compute_dtype
from .lora.pipeline_mixin import LoraMixin
from .model.autoencoder import AutoEncoder
from .model.text_encoders import CLIPEmbedder, T5Embedder, load_tokenizer
from .model.step_cache import StepCache
from .model.transformer import FluxTransformer
from .sampling import (
    DEV_SCHEDULE,
    ScheduleConfig,
    euler,
    get_schedule,
    image_ids,
    initial_noise,
    latent_grid,
    pack,
    text_ids,
    unpack,
)

log = logging.getLogger(__name__)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _weights_dtype(value) -> torch.dtype:
    """torch_dtype as diffusers takes it (a torch dtype), or its name ("bfloat16", "torch.float16")."""
    if isinstance(value, str):
        value = getattr(torch, value.strip().removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating-point torch dtype such as torch.bfloat16 (or its name), "
                         f"got {value!r}")
    return value


def default_model_dir() -> Path:
    """The shipped fluxion-mini, or $FLUXION_MODEL."""
    return Path(os.environ.get("FLUXION_MODEL", REPO_ROOT / "models" / "fluxion-mini"))


@dataclass
class PipelineDefaults:
    """Call defaults. diffusers' values, except max_sequence_length 256 for schnell-style models;
    a model folder may set its own in model_index.json under `_fluxion_defaults` (fluxion-mini does)."""

    sample_size: int = 128  # in latent pixels; x vae_scale_factor gives the image side
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None  # used with true_cfg_scale > 1 when the call gives none

    @classmethod
    def for_model(cls, guidance_embed: bool, **overrides) -> "PipelineDefaults":
        return cls(**{"max_sequence_length": 512 if guidance_embed else 256, **overrides})


@dataclass
class FluxPipelineOutput:
    images: list[Image.Image] | np.ndarray | Tensor
    parameters: list[dict] = field(default_factory=list)  # generation parameters, one dict per image


class FluxPipeline(LoraMixin):
    def __init__(
        self,
        transformer: FluxTransformer,
        vae: AutoEncoder,
        text_encoder: CLIPEmbedder,
        text_encoder_2: T5Embedder,
        schedule: ScheduleConfig = DEV_SCHEDULE,
        defaults: PipelineDefaults | None = None,
        model_path: str | None = None,
        compute_dtype: str | torch.dtype | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.clip = text_encoder
        self.t5 = text_encoder_2
        self.schedule = schedule
        self.defaults = defaults or PipelineDefaults.for_model(transformer.config.guidance_embed)
        self.model_path = model_path
        self._device = torch.device("cpu")
        self._offload_device: torch.device | None = None
        self._release_after_use = False  # CPU offload: give back each part's mapped file pages after it runs
        self._block_hooks: list = []  # CPU sequential offload: per-block page release hooks
        self._progress = {"disable": False}
        self._cache: tuple[str | None, float | None] = (None, None)  # set by enable_cache
        self.set_compute_dtype(compute_dtype)

    # ------------------------------------------------------------ loading and placement

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        compute_dtype: str | torch.dtype | None = None,
        **kwargs,
    ) -> "FluxPipeline":
        """Load a diffusers-layout FLUX folder (model_index.json, transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/).

        With no path, the shipped fluxion-mini. Weights load in float32 unless a dtype is given (as diffusers).
        `quantize` ("int8", "w8a8", "fp8", "q8_0", "q4_0", ...) quantizes the transformer while loading.
        `compute_dtype` ("auto", "float32", "bfloat16"): see `set_compute_dtype`.
        As in diffusers, `transformer=`, `vae=`, `text_encoder_2=` replace a part: a loaded model, or here also
        a file (e.g. `transformer="flux1-dev-Q4_0.gguf"`, `text_encoder_2="t5-v1_1-xxl-encoder-Q8_0.gguf"`).
        """
        parse_dtype(compute_dtype)  # a bad value fails before anything loads
        parts = {k: kwargs.pop(k) for k in ("transformer", "vae", "text_encoder_2") if kwargs.get(k) is not None}
        root = Path(pretrained_model_name_or_path) if pretrained_model_name_or_path else default_model_dir()
        if not root.is_dir():
            hint = " (fluxion reads local folders only; no weights are downloaded)" if "/" in str(root) else ""
            raise CheckpointError(f"{root}: no such model folder{hint}")
        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if sub not in parts and not (root / sub).is_dir():
                raise CheckpointError(f"{root}: missing {sub}/ (a diffusers FLUX folder has transformer/, vae/, "
                                      "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
        ignored = set(kwargs) - {"use_safetensors", "local_files_only", "variant", "low_cpu_mem_usage", "revision"}
        if ignored:
            log.warning("from_pretrained ignores %s", sorted(ignored))
        schedule = DEV_SCHEDULE
        sched_file = root / "scheduler" / "scheduler_config.json"
        if sched_file.is_file():
            try:
                schedule = ScheduleConfig.from_dict(json.loads(sched_file.read_text()))
            except (ValueError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{sched_file}: not a valid scheduler config ({e})") from None
        index = root / "model_index.json"
        try:
            extra = json.loads(index.read_text()).get("_fluxion_defaults", {}) if index.is_file() else {}
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid model_index.json ({e})") from None
        known = set(PipelineDefaults.__dataclass_fields__)
        if not isinstance(extra, dict) or set(extra) - known:
            raise CheckpointError(f"{index}: _fluxion_defaults may set {sorted(known)}, got {extra!r}")
        wdtype = _weights_dtype(dtype or torch_dtype or torch.float32)
        transformer = parts.get("transformer", root / "transformer")
        if isinstance(transformer, (str, os.PathLike)):
            transformer = load_transformer(transformer, wdtype, quantize=quantize)
        vae = parts.get("vae", root / "vae")
        vae = load_autoencoder(vae, wdtype) if isinstance(vae, (str, os.PathLike)) else vae
        clip = CLIPEmbedder.from_folders(root / "text_encoder", root / "tokenizer", wdtype)
        t5 = parts.get("text_encoder_2")
        if t5 is None:
            t5 = T5Embedder.from_folders(root / "text_encoder_2", root / "tokenizer_2", wdtype)
        elif isinstance(t5, (str, os.PathLike)):
            t5 = T5Embedder.from_checkpoint(t5, root / "tokenizer_2", wdtype)
        elif not isinstance(t5, T5Embedder):  # a transformers T5EncoderModel, as diffusers users pass it
            t5 = T5Embedder(load_tokenizer(root / "tokenizer_2"), t5)
        defaults = PipelineDefaults.for_model(transformer.config.guidance_embed, **extra)
        return cls(transformer, vae, clip, t5, schedule, defaults, str(root), compute_dtype)

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.clip.model,
                "text_encoder_2": self.t5.model}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FluxPipeline":
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            self._device = torch.device(device)
        for m in self.components().values():
            m.to(device=self._device, dtype=dtype)
        self.set_compute_dtype(self._compute_override)  # the device or the storage dtype may have changed
        return self

    def set_compute_dtype(self, compute_dtype: str | torch.dtype | None = None) -> dict[str, DtypePlan]:
        """Choose the dtype each part computes in; weights keep their storage dtype (`fluxion.compute`).

        None / "auto": bf16 weights compute in bf16 where the CPU has bf16 units, and in float32 (upcast per
        layer, per call) where it has not; "float32" / "bfloat16" force it ($FLUXION_COMPUTE_DTYPE too).
        Returns the plan per part (also kept as `compute_plans`); the choice is logged once.
        """
        self._compute_override = compute_dtype
        plans = {}
        for name, module in self.components().items():
            p = plan(storage_dtype(module), self._offload_device or self._device, compute_dtype)
            if p.upcasts or getattr(module, "_fluxion_compute_dtype", None) is not None:
                use_compute_dtype(module, p.compute)
            log_once(p)
            plans[name] = p
        self.compute_plans = plans
        return plans

    @property
    def device(self) -> torch.device:
        return self._device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """Keep every part on the CPU and move each to the accelerator only while it runs.

        On a CPU-only machine everything already runs where it lives; there, each part's memory-mapped weights
        (zero-copy .safetensors tensors, GGUF/fp8 quantized weights) give their resident pages back once it has
        run (`fluxion.checkpoints.pages.release_pages`): the text encoders after the prompts are encoded, the
        transformer before the VAE decodes. The page cache keeps the data, so the next call re-reads it from
        memory; weights held as copies (converted dtypes) are not affected.
        """
        target = torch.device(device) if device is not None else (
            torch.device("cuda", gpu_id or 0) if torch.cuda.is_available() else torch.device("cpu")
        )
        self._offload_device = target if target.type != "cpu" else None  # set first: .to() plans for it
        self._release_after_use = target.type == "cpu"
        self.to("cpu")
        self._device = target
        return self

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """`enable_model_cpu_offload`, and on a CPU-only machine also stream the transformer's and T5's blocks:
        each block gives its mapped pages back right after its forward, so about one block's weights are
        resident at a time (the page cache re-serves them at the next step). With an accelerator, parts move
        whole (per-part placement is the finest we do there)."""
        self.enable_model_cpu_offload(gpu_id, device)
        if self._release_after_use and not self._block_hooks:
            for model in (self.transformer, self.t5.model):
                self._block_hooks += stream_blocks(model)
        return self

    def enable_vae_tiling(self, **kwargs):
        """Decode (and encode) large images in overlapping VAE tiles: see `AutoEncoder.enable_tiling`."""
        self.vae.enable_tiling(**kwargs)
        return self

    def disable_vae_tiling(self):
        self.vae.disable_tiling()
        return self

    def enable_vae_slicing(self):
        """Decode a batch one image at a time: see `AutoEncoder.enable_slicing`."""
        self.vae.enable_slicing()
        return self

    def disable_vae_slicing(self):
        self.vae.disable_slicing()
        return self

    def enable_cache(self, kind: str = "fbcache", threshold: float = 0.1) -> None:
        """Step caching for every later call (a call's `cache=` / `cache_threshold=` still win)."""
        if kind != "fbcache":
            raise ValueError(f"cache kind must be 'fbcache', got {kind!r}")
        self._cache = (kind, threshold)

    def disable_cache(self) -> None:
        self._cache = (None, None)

    def set_progress_bar_config(self, **kwargs):
        self._progress.update(kwargs)

    @contextlib.contextmanager
    def _placed(self, module: torch.nn.Module):
        if self._offload_device is None:
            try:
                yield module
            finally:
                if self._release_after_use:
                    release_pages(module)
            return
        module.to(self._offload_device)
        try:
            yield module
        finally:
            module.to("cpu")

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    # ------------------------------------------------------------ prompts

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        **_,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(T5 embeddings [B*n, L, D], CLIP pooled [B*n, P], text ids [L, 3]); prompt_2 goes to T5."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = prompts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        length = max_sequence_length or self.defaults.max_sequence_length
        dtype = self.transformer.compute_dtype
        with self._placed(self.clip.model):
            pooled = self.clip(prompts).to(self.device, dtype)
        with self._placed(self.t5.model):
            embeds = self.t5(prompts_2, length).to(self.device, dtype)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, pooled, text_ids(embeds.shape[1], self.device)

    # ------------------------------------------------------------ generation

    def __call__(self, *args, joint_attention_kwargs: dict | None = None, **kwargs):
        """Generate images; takes diffusers' FluxPipeline arguments (see `generate`)."""
        with self.lora_scale((joint_attention_kwargs or {}).get("scale")):
            return self.generate(*args, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
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
    ):
        """diffusers' FluxPipeline arguments, plus `cache="fbcache"` with `cache_threshold` (first-block step cache)."""
        d = self.defaults
        cache = cache if cache is not None else self._cache[0]
        cache_threshold = cache_threshold if cache_threshold is not None else self._cache[1]
        if cache not in (None, "none", "fbcache"):
            raise ValueError(f"cache must be None or 'fbcache', got {cache!r}")
        if cache == "fbcache" and not (isinstance(cache_threshold, (int, float)) and cache_threshold > 0):
            raise ValueError(f"cache_threshold must be a number > 0 with cache='fbcache', got {cache_threshold!r}")
        threshold = float(cache_threshold) if cache == "fbcache" else 0.0
        height = height or d.sample_size * self.vae_scale_factor
        width = width or d.sample_size * self.vae_scale_factor
        num_inference_steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        max_sequence_length = max_sequence_length or d.max_sequence_length
        true_cfg_scale = d.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        if negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = d.negative_prompt
        batch = self._check_inputs(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt, negative_prompt_2, height, width,
            num_inference_steps, sigmas, num_images_per_prompt, output_type, max_sequence_length, generator,
        )
        total = batch * num_images_per_prompt
        lat_h, lat_w = latent_grid(height, width, self.vae_scale_factor)
        channels = self.transformer.config.in_channels // 4
        n_tokens = (lat_h // 2) * (lat_w // 2)
        if latents is not None and tuple(latents.shape) != (total, n_tokens, self.transformer.config.in_channels):
            raise ValueError(
                f"latents must be packed [batch*num_images_per_prompt, tokens, channels] = "
                f"[{total}, {n_tokens}, {self.transformer.config.in_channels}] for {height}x{width}, "
                f"got {list(latents.shape)}"
            )

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds, txt_ids = self.encode_prompt(
                prompt, prompt_2, num_images_per_prompt, max_sequence_length
            )
        else:
            prompt_embeds = prompt_embeds.to(self.device, self.transformer.compute_dtype)
            pooled_prompt_embeds = pooled_prompt_embeds.to(self.device, self.transformer.compute_dtype)
            txt_ids = text_ids(prompt_embeds.shape[1], self.device)
        do_true_cfg = true_cfg_scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if do_true_cfg:
            if negative_prompt_embeds is None:
                negative_prompt = self._match_batch(negative_prompt, batch, "negative_prompt")
                negative_prompt_2 = None if negative_prompt_2 is None else self._match_batch(
                    negative_prompt_2, batch, "negative_prompt_2")
                negative_prompt_embeds, negative_pooled_prompt_embeds, neg_txt_ids = self.encode_prompt(
                    negative_prompt, negative_prompt_2, num_images_per_prompt, max_sequence_length
                )
            else:
                neg_txt_ids = text_ids(negative_prompt_embeds.shape[1], self.device)

        if latents is None:  # drawn in the weights' dtype, as diffusers draws it: the same seed, the same noise
            noise = initial_noise(total, channels, lat_h, lat_w, generator, self.transformer.dtype, self.device)
            latents = pack(noise)
        latents = latents.to(self.device, self.transformer.compute_dtype)
        img_ids = image_ids(lat_h, lat_w, self.device)
        schedule = get_schedule(num_inference_steps, n_tokens, self.schedule, sigmas)
        guidance = (
            torch.full((total,), float(guidance_scale), device=self.device, dtype=torch.float32)
            if self.transformer.config.guidance_embed
            else None
        )

        batched_cfg = do_true_cfg and negative_prompt_embeds.shape == prompt_embeds.shape
        if batched_cfg:  # one transformer call on [cond; uncond] instead of two
            cfg_txt = torch.cat([prompt_embeds, negative_prompt_embeds])
            cfg_pooled = torch.cat([pooled_prompt_embeds, negative_pooled_prompt_embeds])
            cfg_guidance = None if guidance is None else torch.cat([guidance, guidance])

        steps_t = schedule[:-1].tolist()
        step_cache, neg_step_cache = StepCache(threshold, steps_t), StepCache(threshold, steps_t)  # one per call stream

        def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
            if batched_cfg:
                v, v_neg = self.transformer(
                    torch.cat([x, x]), img_ids, cfg_txt, txt_ids, torch.cat([t, t]), cfg_pooled, cfg_guidance,
                    cache=step_cache,
                ).chunk(2)
                return v_neg + true_cfg_scale * (v - v_neg)
            v = self.transformer(x, img_ids, prompt_embeds, txt_ids, t, pooled_prompt_embeds, guidance, cache=step_cache)
            if do_true_cfg:
                v_neg = self.transformer(x, img_ids, negative_prompt_embeds, neg_txt_ids, t,
                                         negative_pooled_prompt_embeds, guidance, cache=neg_step_cache)
                v = v_neg + true_cfg_scale * (v - v_neg)
            return v

        def after_step(i: int, x: Tensor) -> Tensor:  # diffusers' callback: (pipe, i, t, tensors) -> tensors
            out = callback_on_step_end(self, i, schedule[i] * 1000, {"latents": x}) or {}
            return out.get("latents", x)

        with self._placed(self.transformer):
            latents = euler(velocity, latents, schedule, self._progress_bar,
                            after_step if callback_on_step_end is not None else None)
        self.last_cache_stats = dict(step_cache.stats)  # steps seen / skipped by the step cache (benchmarks read it)

        params = [
            {
                "prompt": p,
                "negative_prompt": n if do_true_cfg else None,
                "true_cfg_scale": true_cfg_scale if do_true_cfg else None,
                "height": height,
                "width": width,
                "num_inference_steps": len(schedule) - 1,
                "guidance_scale": guidance_scale if self.transformer.config.guidance_embed else None,
                "max_sequence_length": max_sequence_length,
                "cache": f"fbcache:{threshold:g}" if threshold else None,
                "model": self.model_path,
            }
            for p, n in zip(self._prompt_list(prompt, batch), self._prompt_list(negative_prompt, batch))
            for _ in range(num_images_per_prompt)
        ]
        images = latents if output_type == "latent" else self.decode(latents, height, width, output_type)
        if not return_dict:
            return (images,)
        return FluxPipelineOutput(images=images, parameters=params)

    @torch.no_grad()
    def decode(self, latents: Tensor, height: int, width: int, output_type: str = "pil"):
        """Packed latents -> images in [0, 1] as PIL, numpy [B, H, W, 3] or tensor [B, 3, H, W]."""
        lat_h, lat_w = latent_grid(height, width, self.vae_scale_factor)
        with self._placed(self.vae):
            x = self.vae.decode(unpack(latents, lat_h, lat_w).to(self.device))
        x = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
        if output_type == "pt":
            return x
        arr = x.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]

    # ------------------------------------------------------------ helpers

    def _progress_bar(self, steps):
        from tqdm.auto import tqdm

        return tqdm(steps, desc="sampling", unit="step", **self._progress)

    @staticmethod
    def _prompt_list(prompt, batch: int) -> list:
        if prompt is None or isinstance(prompt, str):
            return [prompt] * batch
        return list(prompt)

    @staticmethod
    def _match_batch(value: str | list[str], batch: int, name: str) -> list[str]:
        if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a str or a list of str, got {type(value).__name__}")
        values = [value] * batch if isinstance(value, str) else list(value)
        if len(values) != batch:
            raise ValueError(f"{name} has {len(values)} entries but there are {batch} prompts")
        return values

    def _check_inputs(
        self, prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt, negative_prompt_2, height, width,
        steps, sigmas, num_images_per_prompt, output_type, max_sequence_length, generator,
    ) -> int:
        """All argument checks, before any model runs; returns the number of prompts."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt (str or list of str) or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
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
            cfg = self.transformer.config
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg.context_in_dim:
                raise ValueError(f"prompt_embeds must be [B, L, {cfg.context_in_dim}], got {list(prompt_embeds.shape)}")
            if tuple(pooled_prompt_embeds.shape) != (batch, cfg.vec_in_dim):
                raise ValueError(
                    f"pooled_prompt_embeds must be [{batch}, {cfg.vec_in_dim}], got {list(pooled_prompt_embeds.shape)}"
                )
        for name, value in (("prompt_2", prompt_2), ("negative_prompt", negative_prompt),
                            ("negative_prompt_2", negative_prompt_2)):
            if value is not None and not isinstance(value, str):
                self._match_batch(value, batch, name)
        if sigmas is not None:
            s = list(sigmas)
            if not s or any(not 0 < float(v) <= 1 for v in s):
                raise ValueError(f"sigmas must be a non-empty list of values in (0, 1], got {s!r}")
        multiple = self.vae_scale_factor * 2
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}")
        if sigmas is None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512], got {max_sequence_length!r}")
        if isinstance(generator, list) and len(generator) != batch * num_images_per_prompt:
            raise ValueError(
                f"got {len(generator)} generators for {batch * num_images_per_prompt} images "
                "(one per image, or a single generator)"
            )
        return batch
