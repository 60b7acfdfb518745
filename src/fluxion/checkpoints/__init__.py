"""Checkpoint loading: one module per format, one entry point per model part.

`load_transformer(path)` takes an original single file (optionally `model.diffusion_model.`-prefixed),
a diffusers `transformer/` folder (sharded or not) or a pipeline folder holding one.
`load_autoencoder(path)` takes `ae.safetensors` or a diffusers `vae/` folder.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.autoencoder import AutoEncoder, AutoEncoderConfig
from ..model.transformer import FluxConfig, FluxTransformer
from . import diffusers as diffusers_format
from . import original as original_format
from .loading import TensorStore, materialize
from .safetensors_file import CheckpointError, SafetensorsFile, save_safetensors

__all__ = [
    "CheckpointError",
    "SafetensorsFile",
    "load_transformer",
    "load_autoencoder",
    "save_transformer",
    "save_autoencoder",
    "inspect_checkpoint",
]


@dataclass
class Resolved:
    """Where a model part's tensors are and how they are named."""

    store: TensorStore
    layout: str  # "original" | "diffusers"
    folder: Path


def _resolve(path: str | Path, subfolder: str, diffusers_marker: str) -> Resolved:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and (path / subfolder).is_dir() and not (path / "config.json").is_file():
        path = path / subfolder
    if path.is_file() and path.suffix == ".gguf":
        raise CheckpointError(f"{path}: GGUF files are read by fluxion.quant (not available in this build)")
    if path.is_file() and not (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
        raise CheckpointError(f"{path}: not a .safetensors file (or shard index)")
    probe = TensorStore.open(path)
    keys = probe.keys()
    if any(k.startswith(diffusers_marker) for k in keys):
        return Resolved(probe, "diffusers", path if path.is_dir() else path.parent)
    prefix = original_format.detect_prefix(keys)
    store = TensorStore(probe.files, strip_prefix=prefix) if prefix else probe
    return Resolved(store, "original", path if path.is_dir() else path.parent)


def _dtype(dtype, torch_dtype):
    return dtype if dtype is not None else torch_dtype


def load_transformer(
    path: str | Path, dtype: torch.dtype | None = None, *, torch_dtype: torch.dtype | None = None, axes_dim=None
) -> FluxTransformer:
    """FluxTransformer from any supported file or folder; `dtype=None` keeps the stored dtype (zero-copy)."""
    r = _resolve(path, "transformer", "x_embedder.")
    if r.layout == "diffusers":
        config = diffusers_format.infer_flux_config(r.store, r.folder, axes_dim)
        recipes = diffusers_format.transformer_recipes(config, r.store)
    else:
        config = original_format.infer_flux_config(r.store, axes_dim)
        recipes = None
    model = materialize(lambda: FluxTransformer(config), recipes, r.store, _dtype(dtype, torch_dtype))
    return model.eval()


def load_autoencoder(
    path: str | Path, dtype: torch.dtype | None = None, *, torch_dtype: torch.dtype | None = None, **overrides
) -> AutoEncoder:
    """AutoEncoder from `ae.safetensors` or a diffusers `vae/` folder; `overrides` set config fields shapes can't tell."""
    r = _resolve(path, "vae", "encoder.down_blocks.")
    if r.layout == "diffusers":
        config = diffusers_format.infer_autoencoder_config(r.store, r.folder, **overrides)
        recipes = diffusers_format.autoencoder_recipes(config, r.store)
    else:
        config = original_format.infer_autoencoder_config(r.store, **overrides)
        recipes = None
    model = materialize(lambda: AutoEncoder(config), recipes, r.store, _dtype(dtype, torch_dtype))
    return model.eval()


def save_transformer(model: FluxTransformer, path: str | Path) -> None:
    """Original single-file layout, with our config in the metadata (read back by load_transformer)."""
    meta = {original_format.CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    save_safetensors(dict(model.state_dict()), path, metadata=meta)


def save_autoencoder(model: AutoEncoder, path: str | Path) -> None:
    meta = {original_format.CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    save_safetensors(dict(model.state_dict()), path, metadata=meta)


def _infer_config(r: Resolved, part: str) -> FluxConfig | AutoEncoderConfig:
    if part == "transformer":
        if r.layout == "diffusers":
            return diffusers_format.infer_flux_config(r.store, r.folder)
        return original_format.infer_flux_config(r.store)
    if r.layout == "diffusers":
        return diffusers_format.infer_autoencoder_config(r.store, r.folder)
    return original_format.infer_autoencoder_config(r.store)


PARTS = {  # part -> (pipeline subfolder, a key prefix only the diffusers layout has, a key every layout has)
    "transformer": ("transformer", "x_embedder.", ("img_in.weight", "x_embedder.weight")),
    "autoencoder": ("vae", "encoder.down_blocks.", ("encoder.conv_in.weight",)),
}


def inspect_checkpoint(path: str | Path) -> dict:
    """What `fluxion info` prints: part, format, inferred config, parameter count, dtypes.

    A missing, truncated or corrupt file raises its own CheckpointError; only "this is not that part" is probed.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    for part, (sub, marker, telltales) in PARTS.items():
        r = _resolve(path, sub, marker)
        if not any(t in r.store for t in telltales):
            continue
        config = _infer_config(r, part)
        dtypes: dict[str, int] = {}
        for k in r.store.keys():
            name = str(r.store.dtype(k)).replace("torch.", "")
            dtypes[name] = dtypes.get(name, 0) + math.prod(r.store.shape(k))
        files = len(r.store.files)
        info = {
            "path": str(path),
            "part": part,
            "format": f"{r.layout} layout, {files} file{'s' if files > 1 else ''}"
            + (f", key prefix {r.store.prefix!r}" if r.store.prefix else ""),
            "config": config.to_dict(),
            "parameters": sum(dtypes.values()),
            "dtypes": dtypes,
            "bytes": r.store.nbytes(),
        }
        if part == "transformer":
            info["variant"] = "dev-style (guidance embedder)" if config.guidance_embed else "schnell-style (no guidance embedder)"
        return info
    raise CheckpointError(f"{path}: neither a FLUX transformer nor a FLUX autoencoder checkpoint")


