"""What every FLUX pipeline shares: loading (`from_pretrained`, `from_pipe`), its parts under diffusers' names,
prompt and image encoding, decoding, output and metadata, and the steps of a call that variants compose
(arguments and their checks: `arguments.py`; placement and offload: `placement.py`).

Each variant (text2image, img2img, inpaint, fill, control, kontext) is a small module that checks its own
inputs, prepares the latents and conditioning in diffusers' order, and runs `core.denoise`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..checkpoints import CheckpointError, load_autoencoder, load_transformer
from ..compute import parse_dtype
from ..flow import (
    DEV_SCHEDULE, ScheduleConfig, get_schedule, image_ids, initial_noise, latent_grid, strength_start, text_ids,
    unpack,
)
from ..lora.pipeline_mixin import LoraMixin
from ..model.autoencoder import AutoEncoder
from ..model.text_encoders import CLIPEmbedder, T5Embedder, load_tokenizer
from ..model.transformer import FluxTransformer
from . import guidance as G
from . import per_sample as PS
from .arguments import CALL_NAMES, CallArgs, PipelineDefaults, check_call, match_batch, prompt_list
from .core import DenoiseInputs, TextConditioning, denoise
from .placement import Placement

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[3]
PART_NAMES = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def default_model_dir() -> Path:
    """The shipped fluxion-mini, or $FLUXION_MODEL."""
    return Path(os.environ.get("FLUXION_MODEL", REPO_ROOT / "models" / "fluxion-mini"))


def _weights_dtype(value) -> torch.dtype:
    """torch_dtype as diffusers takes it (a torch dtype), or its name ("bfloat16", "torch.float16")."""
    if isinstance(value, str):
        value = getattr(torch, value.strip().removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating-point torch dtype such as torch.bfloat16 (or its name), "
                         f"got {value!r}")
    return value


@dataclass
class FluxPipelineOutput:
    images: list[Image.Image] | np.ndarray | Tensor
    parameters: list[dict] = field(default_factory=list)  # generation parameters, one dict per image
    cache_stats: dict = field(default_factory=dict)  # steps seen / reused by the step cache in this call


class FluxBasePipeline(Placement, LoraMixin):
    CALL_DEFAULTS: dict = {}  # diffusers' call defaults of this class, over PipelineDefaults' (the folder's win)

    def __init__(
        self,
        transformer: FluxTransformer,
        vae: AutoEncoder,
        text_encoder: CLIPEmbedder,
        text_encoder_2: T5Embedder,
        schedule: ScheduleConfig = DEV_SCHEDULE,
        defaults: PipelineDefaults | dict | None = None,
        model_path: str | None = None,
        compute_dtype: str | torch.dtype | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.clip = text_encoder
        self.t5 = text_encoder_2
        self.schedule = schedule
        self._folder_defaults = {} if isinstance(defaults, PipelineDefaults) or defaults is None else dict(defaults)
        self.defaults = defaults if isinstance(defaults, PipelineDefaults) else PipelineDefaults.for_model(
            transformer.config.guidance_embed, **{**self.CALL_DEFAULTS, **self._folder_defaults})
        self.model_path = model_path
        self._device = torch.device("cpu")
        self._offload_device: torch.device | None = None
        self._release_after_use = False  # CPU offload: give back each part's mapped file pages after it runs
        self._block_hooks: list = []  # CPU sequential offload: per-block page release hooks
        self._progress = {"disable": False}
        self._cache: tuple[str | None, float | None] = (None, None)  # set by enable_cache
        self.set_compute_dtype(compute_dtype)
        self._check_model()

    def _check_model(self) -> None:
        """A variant refuses a transformer it cannot drive (overridden where the channel layout differs)."""
        c = self.transformer.config
        if c.in_channels != c.out_channels:
            from . import model_kind_hint

            raise ValueError(f"{type(self).__name__} drives {c.out_channels}-channel models; this transformer takes "
                             f"{c.in_channels} input channels: {model_kind_hint(c)}")

    # ------------------------------------------------------------ parts, as diffusers names them

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.clip.model

    @property
    def tokenizer(self):
        return self.clip.tokenizer

    @property
    def text_encoder_2(self) -> torch.nn.Module:
        return self.t5.model

    @property
    def tokenizer_2(self):
        return self.t5.tokenizer

    @property
    def scheduler(self) -> ScheduleConfig:
        return self.schedule

    @property
    def components(self) -> dict:
        """The loaded parts under diffusers' names (pass them to another pipeline's `from_pretrained`)."""
        return {name: getattr(self, name) for name in PART_NAMES}

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.clip.model,
                "text_encoder_2": self.t5.model}

    # ------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        compute_dtype: str | torch.dtype | None = None,
        **kwargs,
    ):
        """Load a diffusers-layout FLUX folder (model_index.json, transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/).

        With no path, the shipped fluxion-mini. Weights load in float32 unless a dtype is given (as diffusers).
        `quantize` ("int8", "w8a8", "fp8", "q8_0", "q4_0", ...) quantizes the transformer while loading.
        `compute_dtype` ("auto", "float32", "bfloat16"): see `set_compute_dtype`.
        As in diffusers, any part (`transformer=`, `vae=`, `text_encoder=`, `tokenizer=`, `text_encoder_2=`,
        `tokenizer_2=`, `scheduler=`) may be given instead of read from the folder: a loaded model, or for the
        transformer, VAE and T5 also a file (e.g. `transformer="flux1-dev-Q4_0.gguf"`).
        """
        parse_dtype(compute_dtype)  # a bad value fails before anything loads
        parts = {k: kwargs.pop(k) for k in PART_NAMES if kwargs.get(k) is not None}
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
        schedule = _schedule_of(parts.get("scheduler"), root / "scheduler" / "scheduler_config.json")
        index = root / "model_index.json"
        if not index.is_file():  # without it we would guess the model's defaults (size, CFG) silently
            raise CheckpointError(f"{root}: no model_index.json (a diffusers FLUX folder has one, naming its parts)")
        try:
            extra = json.loads(index.read_text()).get("_fluxion_defaults", {})
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid model_index.json ({e})") from None
        known = {f.name for f in fields(PipelineDefaults)}
        if not isinstance(extra, dict) or set(extra) - known:
            raise CheckpointError(f"{index}: _fluxion_defaults may set {sorted(known)}, got {extra!r}")
        wdtype = _weights_dtype(dtype or torch_dtype or torch.float32)
        transformer = parts.get("transformer", root / "transformer")
        if isinstance(transformer, (str, os.PathLike)):
            transformer = load_transformer(transformer, wdtype, quantize=quantize)
        cls._check_transformer_early(transformer.config)
        vae = parts.get("vae", root / "vae")
        vae = load_autoencoder(vae, wdtype) if isinstance(vae, (str, os.PathLike)) else vae
        clip = _text_part(CLIPEmbedder, parts.get("text_encoder"), parts.get("tokenizer"),
                          root / "text_encoder", root / "tokenizer", wdtype)
        t5 = parts.get("text_encoder_2")
        if isinstance(t5, (str, os.PathLike)):  # a single file (GGUF, fp8, .safetensors)
            t5 = T5Embedder.from_checkpoint(t5, root / "tokenizer_2", wdtype)
            t5 = replace(t5, tokenizer=parts["tokenizer_2"]) if "tokenizer_2" in parts else t5
        else:
            t5 = _text_part(T5Embedder, t5, parts.get("tokenizer_2"), root / "text_encoder_2", root / "tokenizer_2",
                            wdtype)
        return cls(transformer, vae, clip, t5, schedule, extra, str(root), compute_dtype)

    @classmethod
    def _check_transformer_early(cls, config) -> None:
        """Refuse a model this class cannot drive right after the transformer loads (before the rest)."""
        probe = object.__new__(cls)
        probe.transformer = type("T", (), {"config": config})()
        probe._check_model()

    @classmethod
    def from_pipe(cls, pipeline: "FluxBasePipeline", **kwargs):
        """A pipeline of this class on the same loaded parts (no reload, no copy), as diffusers' `from_pipe`;
        keyword arguments replace parts (`transformer=...`) or set `compute_dtype`."""
        parts = {k: kwargs.pop(k, None) for k in ("transformer", "vae")}
        if kwargs.keys() - {"compute_dtype", "torch_dtype"}:
            raise TypeError(f"from_pipe() got unexpected keyword arguments {sorted(kwargs.keys() - {'compute_dtype'})}")
        new = cls(parts["transformer"] or pipeline.transformer, parts["vae"] or pipeline.vae, pipeline.clip,
                  pipeline.t5, pipeline.schedule, pipeline._folder_defaults, pipeline.model_path,
                  kwargs.get("compute_dtype", pipeline._compute_override))
        new._device, new._offload_device = pipeline._device, pipeline._offload_device
        new._release_after_use, new._cache = pipeline._release_after_use, pipeline._cache
        new._progress = dict(pipeline._progress)
        return new

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    # ------------------------------------------------------------ prompts and images

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

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, generator=None, sample: bool = True) -> Tensor:
        """Pixels in [-1, 1] [B, 3, H, W] -> scaled latents [B, C, H/f, W/f]: a sample of the VAE posterior
        drawn with `generator` (as diffusers' `retrieve_latents`; a list gives one generator per image), or its
        mean when `sample` is False (no draw)."""
        with self._placed(self.vae):
            x = pixels.to(self.device, self.vae.dtype)
            if isinstance(generator, list):
                z = torch.cat([self.vae.encode(x[i : i + 1], sample, generator[i]) for i in range(x.shape[0])])
            else:
                z = self.vae.encode(x, sample, generator)
        return z.to(self.transformer.dtype)

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

    # ------------------------------------------------------------ one call, in steps a variant composes

    def __call__(self, *args, joint_attention_kwargs: dict | None = None, **kwargs):
        """Run the variant's `generate` (diffusers' call arguments); `joint_attention_kwargs={"scale": s}` scales
        the loaded LoRA adapters for this call only."""
        with self.lora_scale((joint_attention_kwargs or {}).get("scale")):
            return self.generate(*args, **kwargs)

    def generate(self, *args, **kwargs):
        raise NotImplementedError

    @contextlib.contextmanager
    def guidance_per_sample(self, guidance_scale=None, true_cfg_scale=None):
        """Per-sample guidance: the calls inside give image k `guidance_scale[k]` and `true_cfg_scale[k]`, as
        if it ran alone with those values (`fluxion.pipelines.per_sample`). One finite number per image of the
        call (batch * num_images_per_prompt, in output order); either may be None (the call's value then holds).
        With `true_cfg_scale`, the call runs true CFG when any image's value is above 1 (the variant must take a
        negative prompt); an image with a value <= 1 keeps its conditional prediction. This thread or task only.

            with pipe.guidance_per_sample(guidance_scale=[3.5, 5.0], true_cfg_scale=[1.0, 4.0]):
                out = pipe(["p1", "p2"], negative_prompt=["", "blurry"], generator=[g1, g2])

        Bad values are ValueErrors here; a count that does not match the call's images, at the call, before any
        model runs. Yields the `SampleGuidance` set (None when both are None)."""
        table = PS.make(guidance_scale, true_cfg_scale)
        token = PS.SAMPLE_GUIDANCE.set(table)
        try:
            yield table
        finally:
            PS.SAMPLE_GUIDANCE.reset(token)

    def _args_from(self, call: dict, **overrides) -> CallArgs:
        """The common arguments out of a variant's call (its `locals()`), defaults filled in and checked.

        A variant whose signature has no `negative_prompt` runs without true CFG (as its diffusers twin), whatever
        the model folder's defaults say; one with `strength` gets the folder's default strength for None."""
        kw = {k: call[k] for k in CALL_NAMES if k in call}
        table = PS.current()
        if table is not None and table.true_cfg is not None:  # true CFG runs when any image asks for it
            kw["true_cfg_scale"] = max(table.true_cfg)
        if "negative_prompt" not in call:
            if table is not None and table.true_cfg is not None:
                raise ValueError(f"per-image true_cfg_scale given to {type(self).__name__}, which runs without true "
                                 "CFG (it takes no negative prompt)")
            kw["true_cfg_scale"] = 1.0
        if "strength" in call and call["strength"] is None:
            kw["strength"] = self.defaults.strength
        return self._common_args(**{**kw, **overrides})

    def _common_args(self, *, cache: str | None = None, cache_threshold: float | None = None, **kw) -> CallArgs:
        """Fill the defaults of the common arguments and check them all, before any model runs."""
        d = self.defaults
        cache = cache if cache is not None else self._cache[0]
        cache_threshold = cache_threshold if cache_threshold is not None else self._cache[1]
        if cache not in (None, "none", "fbcache"):
            raise ValueError(f"cache must be None or 'fbcache', got {cache!r}")
        if cache == "fbcache" and not (isinstance(cache_threshold, (int, float)) and 0 < cache_threshold < math.inf):
            raise ValueError(f"cache_threshold must be a number > 0 with cache='fbcache', got {cache_threshold!r}")
        kw["cache_threshold"] = float(cache_threshold) if cache == "fbcache" else 0.0
        side = d.sample_size * self.vae_scale_factor
        kw["height"] = side if kw.get("height") is None else kw["height"]
        kw["width"] = side if kw.get("width") is None else kw["width"]
        for name in ("num_inference_steps", "guidance_scale", "true_cfg_scale", "max_sequence_length"):
            if kw.get(name) is None:
                kw[name] = getattr(d, name)
        if kw.get("negative_prompt") is None and kw.get("negative_prompt_embeds") is None and kw["true_cfg_scale"] != 1.0:
            kw["negative_prompt"] = d.negative_prompt
        a = CallArgs(**kw)
        a.batch = check_call(self, a)
        self._check_lora_per_sample(a.total)  # per-sample LoRA weights, when set, must count this call's images
        PS.check(a.total)  # so must per-sample guidance values
        return a

    def _encode_prompts(self, a: CallArgs) -> tuple[TextConditioning, TextConditioning | None]:
        """The prompt's conditioning and, with true CFG, the negative prompt's, one row per image."""
        if a.prompt_embeds is None:
            text = TextConditioning(*self.encode_prompt(a.prompt, a.prompt_2, a.num_images_per_prompt,
                                                        a.max_sequence_length))
        else:
            dtype = self.transformer.compute_dtype
            embeds = a.prompt_embeds.to(self.device, dtype)
            text = TextConditioning(embeds, a.pooled_prompt_embeds.to(self.device, dtype),
                                    text_ids(embeds.shape[1], self.device))
        if not a.do_true_cfg:
            return text, None
        if a.negative_prompt_embeds is None:
            neg = match_batch(a.negative_prompt, a.batch, "negative_prompt")
            neg_2 = None if a.negative_prompt_2 is None else match_batch(a.negative_prompt_2, a.batch,
                                                                               "negative_prompt_2")
            return text, TextConditioning(*self.encode_prompt(neg, neg_2, a.num_images_per_prompt,
                                                              a.max_sequence_length))
        dtype = self.transformer.compute_dtype
        embeds = a.negative_prompt_embeds.to(self.device, dtype)
        return text, TextConditioning(embeds, a.negative_pooled_prompt_embeds.to(self.device, dtype),
                                      text_ids(embeds.shape[1], self.device))

    def _latent_grid(self, a: CallArgs) -> tuple[int, int]:
        return latent_grid(a.height, a.width, self.vae_scale_factor)

    def _schedule(self, a: CallArgs) -> tuple[Tensor, int]:
        """(the full schedule for the output's token count, shifted; the index `a.strength` starts at)."""
        lat_h, lat_w = self._latent_grid(a)
        schedule = get_schedule(a.num_inference_steps, (lat_h // 2) * (lat_w // 2), self.schedule, a.sigmas)
        return schedule, strength_start(len(schedule) - 1, a.strength)

    def _noise(self, a: CallArgs) -> Tensor:
        """Standard-normal latents [total, C, h, w], drawn in the weights' dtype as diffusers draws them."""
        lat_h, lat_w = self._latent_grid(a)
        channels = self.transformer.config.out_channels // 4
        return initial_noise(a.total, channels, lat_h, lat_w, a.generator, self.transformer.dtype, self.device)

    def _init_image_latents(self, a: CallArgs, image: Tensor) -> Tensor:
        """The init image's latents [total, C, h, w] as diffusers' img2img, inpaint and Fill prepare them (before
        the noise is drawn): pixels (`image_inputs.init_image`) are VAE-encoded and *sampled* with the call's
        generator (a list: generator[i] for image i), latents are taken as given (no draw); then tiled over the
        batch (`cat([z] * k)`, not interleaved)."""
        z = image.to(self.device, self.transformer.dtype) if image.shape[1] == self.vae.config.z_channels \
            else self.encode_image(image, a.generator)
        return torch.cat([z] * (a.total // z.shape[0]))

    def _check_latents(self, a: CallArgs) -> None:
        lat_h, lat_w = self._latent_grid(a)
        want = (a.total, (lat_h // 2) * (lat_w // 2), self.transformer.config.out_channels)
        if a.latents is not None and tuple(a.latents.shape) != want:
            raise ValueError(f"latents must be packed [batch*num_images_per_prompt, tokens, channels] = "
                             f"{list(want)} for {a.height}x{a.width}, got {list(a.latents.shape)}")

    def _denoise(self, a: CallArgs, text: TextConditioning, negative: TextConditioning | None, latents: Tensor,
                 schedule: Tensor, t_start: int = 0, **extras) -> tuple[Tensor, dict]:
        """Run the core from packed `latents` over `schedule[t_start:]` with this call's guidance per step."""
        lat_h, lat_w = self._latent_grid(a)
        run = schedule[t_start:]
        steps = len(run) - 1
        g = G.per_step(a.guidance_scale, schedule, t_start, "guidance_scale") \
            if self.transformer.config.guidance_embed else None
        cfg = None
        if negative is not None:
            cfg = G.window(G.per_step(a.true_cfg_scale, schedule, t_start, "true_cfg_scale"), a.guidance_start,
                           a.guidance_end)
        table = PS.current()
        if table is not None:  # one value per image and step: a tuple over the images at each step
            if g is not None and table.guidance is not None:
                g = [table.guidance] * steps
            if cfg is not None and table.true_cfg is not None:
                rows = [G.window([c] * steps, a.guidance_start, a.guidance_end) for c in table.true_cfg]
                cfg = [tuple(r[i] for r in rows) for i in range(steps)]
        inputs = DenoiseInputs(
            latents=latents.to(self.device, self.transformer.compute_dtype), img_ids=image_ids(lat_h, lat_w, self.device),
            schedule=run, text=text, negative=negative, guidance=g, true_cfg=cfg,
            cache_threshold=a.cache_threshold, **extras,
        )

        def callback(i: int, x: Tensor) -> Tensor:  # diffusers' callback: (pipe, i, t, tensors) -> tensors
            out = a.callback_on_step_end(self, i, run[i] * 1000, {"latents": x}) or {}
            latents = out.get("latents", x)
            if not isinstance(latents, Tensor) or latents.shape != x.shape:
                raise ValueError(f"callback_on_step_end returned latents of shape "
                                 f"{list(getattr(latents, 'shape', []))} at step {i}; they must keep {list(x.shape)}")
            return latents

        on_step = callback if a.callback_on_step_end is not None else None
        with self._placed(self.transformer):
            x, stats = denoise(self.transformer, inputs, self._progress_bar if steps else None, on_step)
        return x, stats

    def _finish(self, a: CallArgs, latents: Tensor, steps: int, stats: dict, negative_used: bool,
                extra: dict | None = None, images=None):
        """Decode (unless given `images`) and wrap with one parameters dict per image (PNG metadata)."""
        guided = self.transformer.config.guidance_embed
        params = [
            {
                "pipeline": type(self).__name__,
                "prompt": p,
                "negative_prompt": n if negative_used else None,
                "true_cfg_scale": G.describe(a.true_cfg_scale) if negative_used else None,
                "height": a.height,
                "width": a.width,
                "num_inference_steps": steps,
                "guidance_scale": G.describe(a.guidance_scale) if guided else None,
                "max_sequence_length": a.max_sequence_length,
                "cache": f"fbcache:{a.cache_threshold:g}" if a.cache_threshold else None,
                "model": self.model_path,
                **(extra or {}),
            }
            for p, n in zip(prompt_list(a.prompt, a.batch), prompt_list(a.negative_prompt, a.batch))
            for _ in range(a.num_images_per_prompt)
        ]
        table = PS.current()
        if table is not None and table.n == len(params):  # the values each image ran with
            for k, d in enumerate(params):
                if table.guidance is not None and guided:
                    d["guidance_scale"] = table.guidance[k]
                if table.true_cfg is not None and negative_used:  # <= 1: as its own call, which runs no CFG
                    on = table.true_cfg[k] > 1
                    d["true_cfg_scale"] = table.true_cfg[k] if on else None
                    d["negative_prompt"] = d["negative_prompt"] if on else None
        if images is None:
            images = latents if a.output_type == "latent" else self.decode(latents, a.height, a.width, a.output_type)
        if not a.return_dict:
            return (images,)
        return FluxPipelineOutput(images=images, parameters=params, cache_stats=stats)

def _schedule_of(given, config_file: Path) -> ScheduleConfig:
    """A scheduler part given as diffusers passes one (an object with `.config`, a dict, or our ScheduleConfig),
    else the folder's scheduler_config.json, else dev's."""
    if isinstance(given, ScheduleConfig):
        return given
    if given is not None:
        config = getattr(given, "config", given)
        try:
            return ScheduleConfig.from_dict(dict(config))
        except (ValueError, TypeError) as e:
            raise ValueError(f"scheduler must be a ScheduleConfig, a dict or a scheduler with .config, got "
                             f"{type(given).__name__} ({e})") from None
    if not config_file.is_file():
        return DEV_SCHEDULE
    try:
        return ScheduleConfig.from_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{config_file}: not a valid scheduler config ({e})") from None


def _text_part(kind, model, tokenizer, model_dir: Path, tokenizer_dir: Path, dtype):
    """A text encoder from given parts (an embedder, a transformers model, a tokenizer) or the folder."""
    if isinstance(model, kind):
        return replace(model, tokenizer=tokenizer) if tokenizer is not None else model
    if model is None and tokenizer is None:
        return kind.from_folders(model_dir, tokenizer_dir, dtype)
    if model is None:
        return kind(tokenizer, kind.from_folders(model_dir, tokenizer_dir, dtype).model)
    return kind(tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir), model)
