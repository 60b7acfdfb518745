"""FLUX.1 Redux: an image prompt. `FluxPriorReduxPipeline` turns pictures into the text conditioning a FLUX
pipeline takes: `pipe(**prior(image))`.

Per image i (diffusers 0.42.1's order of operations):
    prompt_embeds_i = cat([T5(prompt_i) padded to 512, redux_down(silu(redux_up(SigLIP(image_i))))], dim=1)
                      * prompt_embeds_scale_i
    pooled_i        = CLIP(prompt_i) * pooled_prompt_embeds_scale_i
then both are summed over the images to a batch of one. Without text encoders the text part is zeros
[n, 512, txt_in_features] and [n, pooled_dim] (768, CLIP-L's width, unless told otherwise) and a prompt is
ignored with a warning. Differences from diffusers, where it fails or drops input: with text encoders and no
prompt the empty prompt "" is encoded (BFL's default; diffusers crashes), `prompt_embeds` given without text
encoders are used (diffusers replaces them by zeros), one row of `prompt_embeds` is repeated per image, and
integer scales are taken. Not a `FluxBasePipeline`: it has no transformer and does no denoising.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..checkpoints.safetensors_file import CheckpointError
from ..model.redux import KEYS, ReduxImageEncoder
from ..model.text_encoders import CLIPEmbedder, T5Embedder, load_tokenizer

log = logging.getLogger(__name__)
T5_LENGTH = 512  # diffusers' prior always pads T5 to 512 tokens
TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass
class FluxPriorReduxPipelineOutput(Mapping):
    """`prompt_embeds` [1, L + N, D] and `pooled_prompt_embeds` [1, P]; a mapping, so `pipe(**output)` works."""

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor

    def __getitem__(self, key: str) -> Tensor:
        if key not in ("prompt_embeds", "pooled_prompt_embeds"):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(("prompt_embeds", "pooled_prompt_embeds"))

    def __len__(self) -> int:
        return 2

    def to_tuple(self) -> tuple[Tensor, Tensor]:
        return self.prompt_embeds, self.pooled_prompt_embeds


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, Tensor))


def _to_pil_list(image) -> list[Image.Image]:
    """PIL pictures as given; arrays [H, W, C] / [B, H, W, C] and tensors [C, H, W] / [B, C, H, W] in [0, 1] as
    8-bit pictures (the SigLIP processor's PIL path: what it would do with a picture of these pixels)."""
    items = image if isinstance(image, list) else [image]
    out = []
    for x in items:
        if isinstance(x, Image.Image):
            out.append(x)
            continue
        if isinstance(x, Tensor):
            arr = x.detach().float().cpu().numpy()
            arr = arr[None] if arr.ndim == 3 else arr
            arr = arr.transpose(0, 2, 3, 1) if arr.ndim == 4 else arr
        else:
            arr = np.asarray(x, dtype=np.float32)
            arr = arr[None] if arr.ndim == 3 else arr
        for a in arr:
            out.append(Image.fromarray(np.round(a * 255).astype(np.uint8)).convert("RGB"))
    return out


class FluxPriorReduxPipeline:
    def __init__(self, image_encoder, feature_extractor, image_embedder: ReduxImageEncoder, text_encoder=None,
                 tokenizer=None, text_encoder_2=None, tokenizer_2=None, pooled_dim: int = 768):
        self.image_encoder = image_encoder.eval()
        self.feature_extractor = feature_extractor
        self.image_embedder = image_embedder.eval()
        given = {"text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
                 "tokenizer_2": tokenizer_2}
        have = [k for k, v in given.items() if v is not None]
        if have and len(have) != 4:
            raise ValueError(f"FluxPriorReduxPipeline takes all four text parts ({', '.join(TEXT_PARTS)}) or none; "
                             f"got only {', '.join(have)}")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.pooled_dim = int(text_encoder.config.hidden_size) if text_encoder is not None and hasattr(
            getattr(text_encoder, "config", None), "hidden_size") else pooled_dim
        self._progress = {"disable": False}

    # ------------------------------------------------------------ parts

    @property
    def components(self) -> dict:
        return {"image_encoder": self.image_encoder, "feature_extractor": self.feature_extractor,
                "image_embedder": self.image_embedder, **{k: getattr(self, k) for k in TEXT_PARTS}}

    @property
    def device(self) -> torch.device:
        return next(self.image_embedder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_embedder.dtype

    def to(self, device=None, dtype=None) -> "FluxPriorReduxPipeline":
        for m in (self.image_encoder, self.image_embedder, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:  # no loop to show; kept for diffusers-style scripts
        self._progress.update(kwargs)

    # ------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype=None, dtype=None,
                        image_encoder=None, feature_extractor=None, image_embedder=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, pooled_dim: int = 768, **kwargs):
        """A diffusers Redux folder (image_encoder/, feature_extractor/, image_embedder/). The image embedder may
        instead be BFL's original `flux1-redux-dev.safetensors`: lying in the folder (in place of image_embedder/),
        or given as `image_embedder=PATH`. Text parts are optional (as diffusers: pass them from a FLUX pipeline,
        `text_encoder=pipe.text_encoder, ...`); folders named text_encoder/ etc. inside are not read unless given
        as paths."""
        import transformers

        from .base import _weights_dtype

        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such Redux folder (fluxion reads local folders only)")
        ignored = set(kwargs) - {"use_safetensors", "local_files_only", "variant", "low_cpu_mem_usage", "revision"}
        if ignored:
            log.warning("from_pretrained ignores %s", sorted(ignored))
        wdtype = _weights_dtype(dtype or torch_dtype or torch.float32)
        transformers.utils.logging.set_verbosity_error()
        if image_embedder is None:
            if (root / "image_embedder").is_dir():
                image_embedder = root / "image_embedder"
            else:
                files = [f for f in sorted(root.glob("*.safetensors")) if _has_redux_keys(f)]
                if len(files) != 1:
                    raise CheckpointError(f"{root}: no image_embedder/ and {len(files)} Redux weight files (a "
                                          "diffusers Redux folder has image_encoder/, feature_extractor/, "
                                          "image_embedder/; or put flux1-redux-dev.safetensors there)")
                image_embedder = files[0]
        if isinstance(image_embedder, (str, os.PathLike)):
            image_embedder = ReduxImageEncoder.from_pretrained(image_embedder, wdtype)
        if image_encoder is None or isinstance(image_encoder, (str, os.PathLike)):
            where = Path(image_encoder) if image_encoder is not None else root / "image_encoder"
            if not where.is_dir():
                raise CheckpointError(f"{root}: missing image_encoder/ (the SigLIP vision tower)")
            image_encoder = transformers.SiglipVisionModel.from_pretrained(str(where), dtype=wdtype)
        if feature_extractor is None or isinstance(feature_extractor, (str, os.PathLike)):
            where = Path(feature_extractor) if feature_extractor is not None else root / "feature_extractor"
            if not where.is_dir():
                raise CheckpointError(f"{root}: missing feature_extractor/ (the SigLIP image processor config)")
            feature_extractor = transformers.SiglipImageProcessor.from_pretrained(str(where))
        if isinstance(text_encoder, (str, os.PathLike)):
            text_encoder = transformers.CLIPTextModel.from_pretrained(str(text_encoder), dtype=wdtype)
        if isinstance(text_encoder_2, (str, os.PathLike)):
            text_encoder_2 = transformers.T5EncoderModel.from_pretrained(str(text_encoder_2), dtype=wdtype)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(Path(tokenizer))
        if isinstance(tokenizer_2, (str, os.PathLike)):
            tokenizer_2 = load_tokenizer(Path(tokenizer_2))
        if image_encoder.config.hidden_size != image_embedder.config.redux_dim:
            raise CheckpointError(f"the SigLIP encoder's width {image_encoder.config.hidden_size} differs from the "
                                  f"Redux embedder's redux_dim {image_embedder.config.redux_dim}")
        if text_encoder_2 is not None and text_encoder_2.config.d_model != image_embedder.config.txt_in_features:
            raise CheckpointError(f"the T5 encoder's width {text_encoder_2.config.d_model} differs from the Redux "
                                  f"embedder's txt_in_features {image_embedder.config.txt_in_features}")
        return cls(image_encoder, feature_extractor, image_embedder, text_encoder, tokenizer, text_encoder_2,
                   tokenizer_2, pooled_dim=pooled_dim)

    # ------------------------------------------------------------ checks

    @staticmethod
    def _image_count(image) -> int:
        """How many pictures `image` holds; ValueError for anything that is not a picture or a list of them."""
        if isinstance(image, list):
            if not image:
                raise ValueError("image is an empty list: pass at least one picture")
            bad = [type(x).__name__ for x in image if not _is_image(x)]
            if bad:
                raise ValueError(f"image: a list of PIL images, numpy arrays or tensors, got a list holding {bad[0]}")
            return sum(_image_count_one(x) for x in image)
        if not _is_image(image):
            raise ValueError(f"image must be a PIL image, a numpy array [H, W, C] / [B, H, W, C], a tensor "
                             f"[C, H, W] / [B, C, H, W] in [0, 1], or a list of them; got {type(image).__name__}")
        return _image_count_one(image)

    def check_inputs(self, image, prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, prompt_embeds_scale,
                     pooled_prompt_embeds_scale) -> int:
        n = self._image_count(image)
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt_2 or prompt_embeds, not both")
        for name, p in (("prompt", prompt), ("prompt_2", prompt_2)):
            if p is not None and not isinstance(p, (str, list)):
                raise ValueError(f"{name} must be a str or a list of str, got {type(p).__name__}")
            if isinstance(p, list) and len(p) != n:
                raise ValueError(f"{name}: {len(p)} prompts for {n} images (give one per image, or one string)")
        if (prompt_embeds is None) != (pooled_prompt_embeds is None):
            raise ValueError("prompt_embeds and pooled_prompt_embeds go together (pass both or neither)")
        if prompt_embeds is not None:
            d = self.image_embedder.config.txt_in_features
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] not in (1, n) or prompt_embeds.shape[-1] != d:
                raise ValueError(f"prompt_embeds must be [1 or {n}, L, {d}], got {list(prompt_embeds.shape)}")
            if pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError(f"pooled_prompt_embeds must be [{prompt_embeds.shape[0]}, P], got "
                                 f"{list(pooled_prompt_embeds.shape)}")
        for name, scale in (("prompt_embeds_scale", prompt_embeds_scale),
                            ("pooled_prompt_embeds_scale", pooled_prompt_embeds_scale)):
            values = scale if isinstance(scale, (list, tuple)) else [scale]
            if isinstance(scale, (list, tuple)) and len(scale) != n:
                raise ValueError(f"{name}: {len(scale)} weights for {n} images (give one per image, or one number)")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                    raise ValueError(f"{name} must be a finite number or a list of them, got {v!r}")
        for x in image if isinstance(image, list) else [image]:
            if isinstance(x, (np.ndarray, Tensor)):
                if (x.size if isinstance(x, np.ndarray) else x.numel()) == 0:
                    raise ValueError("image: an empty array or tensor")
                lo, hi = float(x.min()), float(x.max())
                if not (0 <= lo and hi <= 1):
                    raise ValueError(f"image arrays and tensors hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        return n

    # ------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode_image(self, image) -> Tensor:
        """SigLIP last hidden states [n, N, redux_dim] (the processor's PIL path: RGB, bicubic resize, rescale,
        normalise)."""
        pixels = self.feature_extractor.preprocess(images=_to_pil_list(image), do_resize=True, return_tensors="pt",
                                                   do_convert_rgb=True).pixel_values
        enc = self.image_encoder
        p = next(enc.parameters())
        return enc(pixel_values=pixels.to(p.device, p.dtype)).last_hidden_state

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], prompt_2: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """(T5 [n, 512, D], CLIP pooled [n, P]) as diffusers' prior encodes them."""
        clip, t5 = CLIPEmbedder(self.tokenizer, self.text_encoder), T5Embedder(self.tokenizer_2, self.text_encoder_2)
        pooled = clip(prompt)
        embeds = t5(prompt_2 if prompt_2 is not None else prompt, T5_LENGTH)
        return embeds, pooled

    @torch.no_grad()
    def __call__(self, image, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                 prompt_embeds_scale: float | list[float] = 1.0, pooled_prompt_embeds_scale: float | list[float] = 1.0,
                 return_dict: bool = True):
        n = self.check_inputs(image, prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, prompt_embeds_scale,
                              pooled_prompt_embeds_scale)
        device, dtype = self.device, self.dtype
        image_embeds = self.image_embedder(self.encode_image(image).to(device, dtype))
        if prompt_embeds is not None:
            embeds, pooled = prompt_embeds.to(device, dtype), pooled_prompt_embeds.to(device, dtype)
            embeds, pooled = embeds.expand(n, -1, -1), pooled.expand(n, -1)
        elif self.text_encoder is not None:
            prompts = [prompt] * n if isinstance(prompt, str) else (prompt or [""] * n)
            prompts_2 = [prompt_2] * n if isinstance(prompt_2, str) else prompt_2
            embeds, pooled = self.encode_prompt(prompts, prompts_2)
            embeds, pooled = embeds.to(device, dtype), pooled.to(device, dtype)
        else:
            if prompt is not None or prompt_2 is not None:
                log.warning("the prompt is ignored: this Redux prior has no text encoders (pass text_encoder=..., "
                            "tokenizer=..., text_encoder_2=..., tokenizer_2=... to from_pretrained to use one)")
            embeds = torch.zeros(n, T5_LENGTH, self.image_embedder.config.txt_in_features, device=device, dtype=dtype)
            pooled = torch.zeros(n, self.pooled_dim, device=device, dtype=dtype)
        embeds = torch.cat([embeds, image_embeds], dim=1)
        scales = prompt_embeds_scale if isinstance(prompt_embeds_scale, (list, tuple)) else [prompt_embeds_scale] * n
        pooled_scales = (pooled_prompt_embeds_scale if isinstance(pooled_prompt_embeds_scale, (list, tuple))
                         else [pooled_prompt_embeds_scale] * n)
        embeds = embeds * torch.tensor([float(s) for s in scales], device=device, dtype=dtype)[:, None, None]
        pooled = pooled * torch.tensor([float(s) for s in pooled_scales], device=device, dtype=dtype)[:, None]
        out = FluxPriorReduxPipelineOutput(embeds.sum(0, keepdim=True), pooled.sum(0, keepdim=True))
        return out if return_dict else out.to_tuple()


def _image_count_one(x) -> int:
    if isinstance(x, Image.Image):
        return 1
    nd = x.ndim
    if nd == 3:
        return 1
    if nd == 4:
        return int(x.shape[0])
    raise ValueError(f"an image array or tensor is [H, W, C] / [C, H, W] or batched with 4 dims; got {nd} dims")


def _has_redux_keys(path: Path) -> bool:
    from ..checkpoints.safetensors_file import SafetensorsFile

    try:
        return set(SafetensorsFile(path).keys()) == set(KEYS)
    except (CheckpointError, OSError, ValueError):
        return False
