"""Checkpoint loading: one module per format, one entry point per model part.

`load_transformer(path)` takes an original single file (optionally `model.diffusion_model.`-prefixed),
a diffusers `transformer/` folder (sharded or not) or a pipeline folder holding one.
`load_autoencoder(path)` takes `ae.safetensors` or a diffusers `vae/` folder.

Quantized transformers: GGUF files (`flux1-dev-Q8_0.gguf`, or a folder holding one) and fp8 .safetensors load
as QuantLinear layers (fluxion.quant); `load_transformer(..., quantize="q8_0")` quantizes a full-precision
checkpoint while loading, and `quantize_to_gguf` writes a GGUF file.

The T5 encoder from GGUF (llama.cpp names) or fp8 files: `load_t5_encoder` / `write_t5_gguf` (`t5`).
`release_pages` / `stream_blocks` (`pages`) give the resident pages of memory-mapped weights back.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.autoencoder import AutoEncoder, AutoEncoderConfig
from ..model.transformer import FluxConfig, FluxTransformer
from ..quant.linear import KEEP_FLOAT, QuantLinear, writable_qtype
from . import diffusers as diffusers_format
from . import original as original_format
from . import quantized as quantized_format
from .gguf import GGUFStore, write_gguf
from .pages import release_pages, stream_blocks
from .loading import RecipeSource, TensorStore, check_recipes, identity_recipes, materialize
from .safetensors_file import CheckpointError, SafetensorsFile, save_safetensors
from .t5 import load_t5_encoder, write_t5_gguf

__all__ = [
    "CheckpointError",
    "SafetensorsFile",
    "load_transformer",
    "load_autoencoder",
    "save_transformer",
    "save_autoencoder",
    "inspect_checkpoint",
    "quantize_to_gguf",
    "write_gguf",
    "load_t5_encoder",
    "write_t5_gguf",
    "release_pages",
    "stream_blocks",
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
    gguf_file = _single_gguf(path)
    if gguf_file is not None:
        store = GGUFStore(gguf_file)
        store.check_flux()
        return Resolved(store, "original", gguf_file.parent)
    if path.is_file() and not (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
        raise CheckpointError(f"{path}: not a .safetensors file (or shard index)")
    probe = TensorStore.open(path)
    keys = probe.keys()
    if any(k.startswith(diffusers_marker) for k in keys):
        return Resolved(probe, "diffusers", path if path.is_dir() else path.parent)
    prefix = original_format.detect_prefix(keys)
    store = TensorStore(probe.files, strip_prefix=prefix) if prefix else probe
    return Resolved(store, "original", path if path.is_dir() else path.parent)


def _single_gguf(path: Path) -> Path | None:
    """A .gguf file, or the one .gguf of a folder holding no .safetensors."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.index.json")):
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(
                f"{path}: several .gguf files ({found[0].name}, {found[1].name}, ...): pass the file to load"
            )
        return found[0] if found else None
    return None


def _dtype(dtype, torch_dtype):
    return dtype if dtype is not None else torch_dtype


def _transformer_store(r: Resolved):
    """The store to read a transformer from: fp8 files get their scales applied; GGUF stores are ready."""
    if isinstance(r.store, TensorStore) and quantized_format.holds_fp8(r.store):
        return quantized_format.Fp8Store(r.store)
    return r.store


def _transformer_layout(r: Resolved, store, axes_dim=None):
    if r.layout == "diffusers":
        config = diffusers_format.infer_flux_config(store, r.folder, axes_dim)
        return config, diffusers_format.transformer_recipes(config, store)
    return original_format.infer_flux_config(store, axes_dim), None


def load_transformer(
    path: str | Path,
    dtype: torch.dtype | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    axes_dim=None,
    quantize: str | None = None,
    keep=KEEP_FLOAT,
) -> FluxTransformer:
    """FluxTransformer from any supported file or folder; `dtype=None` keeps the stored dtype (zero-copy).

    GGUF files and fp8 .safetensors keep their quantized weights (as QuantLinear; with `dtype=None` the model
    computes in the file's float dtype, else bfloat16). `quantize` ("int8", "w8a8", "fp8", "q8_0", "q4_0", "q4_1",
    "q5_0", "q5_1") quantizes the other Linear layers while loading, one layer at a time, except those matching
    `keep` (fluxion.quant.KEEP_FLOAT): the same model as loading in `dtype` and calling `quantize_model`.
    """
    quantize = writable_qtype(quantize) if quantize is not None else None
    dtype = _dtype(dtype, torch_dtype)
    r = _resolve(path, "transformer", "x_embedder.")
    store = _transformer_store(r)
    if dtype is None and isinstance(store, GGUFStore):
        dtype = store.compute_dtype()
    elif dtype is None and isinstance(store, quantized_format.Fp8Store):
        dtype = quantized_format.compute_dtype(store)
    config, recipes = _transformer_layout(r, store, axes_dim)
    replace = None
    if quantize is not None or hasattr(store, "quantized"):
        replace = quantized_format.linear_replacer(store, recipes, dtype, quantize, keep)
    model = materialize(lambda: FluxTransformer(config), recipes, store, dtype, replace)
    return model.eval()


def quantize_to_gguf(src: str | Path, dst: str | Path, qtype: str = "Q8_0", keep=KEEP_FLOAT) -> dict[str, str]:
    """Write any transformer checkpoint fluxion reads as a GGUF file (original names, our config in its metadata),
    streaming one tensor at a time. Returns {tensor name: GGML type}; see `write_gguf` for the per-tensor rules."""
    r = _resolve(src, "transformer", "x_embedder.")
    store = _transformer_store(r)
    config, recipes = _transformer_layout(r, store)
    with torch.device("meta"):
        model = FluxTransformer(config)
    check_recipes(model, recipes or identity_recipes(list(model.state_dict())), store)  # fail before writing
    return write_gguf(RecipeSource(model, recipes, store), dst, qtype, keep=keep, config=config.to_dict())


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
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(f"{quantized[0]} (and {len(quantized) - 1} more layers) are quantized: save_transformer "
                         "writes float weights; write a GGUF file from the float checkpoint instead (quantize_to_gguf)")
    meta = {original_format.CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    save_safetensors(dict(model.state_dict()), path, metadata=meta)


def save_autoencoder(model: AutoEncoder, path: str | Path) -> None:
    meta = {original_format.CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    save_safetensors(dict(model.state_dict()), path, metadata=meta)


def _infer_config(r: Resolved, part: str) -> FluxConfig | AutoEncoderConfig:
    if part == "transformer":
        return _transformer_layout(r, _transformer_store(r))[0]
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
        is_gguf = isinstance(r.store, GGUFStore)
        store = _transformer_store(r) if part == "transformer" else r.store
        for k in store.keys():
            name = store.qtype(k) if is_gguf else str(store.dtype(k)).replace("torch.", "")
            dtypes[name] = dtypes.get(name, 0) + math.prod(store.shape(k))
        files = len(r.store.files)
        info = {
            "path": str(path),
            "part": part,
            "format": ("GGUF, " if is_gguf else "") + f"{r.layout} layout, {files} file{'s' if files > 1 else ''}"
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


