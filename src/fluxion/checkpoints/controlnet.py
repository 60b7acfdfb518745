"""Loading FLUX ControlNets, the config inferred from the tensors.

Two layouts:
- diffusers (`FluxControlNetModel.save_pretrained` folders, InstantX / Shakker-Labs single files): `x_embedder`,
  `transformer_blocks.i.attn.to_q`, ..., `controlnet_blocks.i`, `controlnet_x_embedder`, optional
  `controlnet_mode_embedder` (Union) and `input_hint_block.{conv_in, blocks.j, conv_out}`;
- XLabs' original layout (x-flux `ControlNetFlux`): BFL block names (`img_in`, `double_blocks.i.img_attn.qkv` with
  fused q;k;v rows, ...), `controlnet_blocks.i`, `pos_embed_input` (= `controlnet_x_embedder`) and
  `input_hint_block.{0, 2, ..., 14}`.
Anything else fails with one error naming the first tensor that belongs to neither.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..model.controlnet import FluxControlNetConfig, FluxControlNetModel
from . import diffusers as diffusers_format
from .loading import Recipe, TensorStore, materialize
from .original import count_blocks, default_axes_dim, detect_prefix
from .safetensors_file import CheckpointError

DIFFUSERS_MARKERS = ("x_embedder.", "controlnet_x_embedder.", "transformer_blocks.", "context_embedder.")
ORIGINAL_MARKERS = ("img_in.", "pos_embed_input.", "double_blocks.", "txt_in.")
_CONTROLNET_KEYS = re.compile(r"(controlnet_blocks|controlnet_single_blocks)\.\d+\.(weight|bias)$")


def _open(path: Path) -> tuple[TensorStore, Path]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "controlnet").is_dir():
        path = path / "controlnet"
    if path.is_file() and not (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
        raise CheckpointError(f"{path}: not a .safetensors file (or shard index)")
    store = TensorStore.open(path)
    prefix = detect_prefix(store.keys())
    if prefix:
        store = TensorStore(store.files, strip_prefix=prefix)
    return store, path if path.is_dir() else path.parent


def layout_of(store: TensorStore) -> str:
    """"diffusers" or "original" (XLabs), from the tensor names; a clear error for neither."""
    keys = store.keys()
    if any(k.startswith(DIFFUSERS_MARKERS) for k in keys):
        return "diffusers"
    if any(k.startswith(ORIGINAL_MARKERS) for k in keys):
        return "original"
    first = sorted(keys)[0] if keys else None
    raise CheckpointError(f"{store.describe()}: not a FLUX ControlNet: tensor {first!r} is neither diffusers' layout "
                          "(x_embedder, transformer_blocks.*, controlnet_blocks.*) nor XLabs' (img_in, "
                          "double_blocks.*, controlnet_blocks.*, pos_embed_input)")


def _need(store: TensorStore, names, what: str) -> None:
    for n in names:
        if n not in store:
            raise CheckpointError(f"{store.describe()}: not a FLUX ControlNet in {what} layout (no {n!r})")


def _hint(in_channels: int, out_channels: int | None, where: str) -> tuple[int | None, int]:
    if out_channels is None:
        return None, 1
    p = math.isqrt(max(1, in_channels // out_channels))
    if out_channels * p * p != in_channels:
        raise CheckpointError(f"{where}: the hint block gives {out_channels} channels, which no square patch packs "
                              f"into in_channels {in_channels}")
    return out_channels, p


def infer_config(store: TensorStore, layout: str, folder: Path) -> FluxControlNetConfig:
    keys = store.keys()
    if layout == "diffusers":
        _need(store, ("x_embedder.weight", "context_embedder.weight", "controlnet_x_embedder.weight",
                      "time_text_embed.text_embedder.linear_1.weight"), "diffusers'")
        cfg = diffusers_format.read_config(folder)
        hidden, in_channels = store.shape("x_embedder.weight")
        depth = count_blocks(keys, r"transformer_blocks\.(\d+)\.")
        single = count_blocks(keys, r"single_transformer_blocks\.(\d+)\.")
        block = "transformer_blocks.0" if depth else "single_transformer_blocks.0"
        head_dim = store.shape(f"{block}.attn.norm_q.weight")[0] if (depth or single) else \
            cfg.get("attention_head_dim", 128)
        mlp = store.shape("transformer_blocks.0.ff.net.0.proj.weight")[0] if depth else (
            store.shape("single_transformer_blocks.0.proj_mlp.weight")[0] if single else 4 * hidden)
        hint_out = store.shape("input_hint_block.conv_out.weight")[0] if "input_hint_block.conv_out.weight" in store \
            else None
        vec_in, ctx = store.shape("time_text_embed.text_embedder.linear_1.weight")[1], \
            store.shape("context_embedder.weight")[1]
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in store
        qkv_bias = f"{block}.attn.to_q.bias" in store if depth else True
        axes = tuple(cfg.get("axes_dims_rope", default_axes_dim(head_dim)))
        modes = store.shape("controlnet_mode_embedder.weight")[0] if "controlnet_mode_embedder.weight" in store \
            else None
    else:
        _need(store, ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight"), "XLabs'")
        hidden, in_channels = store.shape("img_in.weight")
        depth = count_blocks(keys, r"double_blocks\.(\d+)\.")
        single = count_blocks(keys, r"single_blocks\.(\d+)\.")
        head_dim = store.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0] if depth else (
            store.shape("single_blocks.0.norm.query_norm.scale")[0] if single else 128)
        mlp = store.shape("double_blocks.0.img_mlp.0.weight")[0] if depth else 4 * hidden
        hint_out = store.shape("input_hint_block.14.weight")[0] if "input_hint_block.14.weight" in store else None
        vec_in, ctx = store.shape("vector_in.in_layer.weight")[1], store.shape("txt_in.weight")[1]
        guidance = "guidance_in.in_layer.weight" in store
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in store if depth else True
        axes = default_axes_dim(head_dim)
        modes = None
    cec, patch = _hint(in_channels, hint_out, store.describe())
    try:
        return FluxControlNetConfig(
            in_channels=in_channels, vec_in_dim=vec_in, context_in_dim=ctx, hidden_size=hidden,
            mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth, depth_single_blocks=single,
            axes_dim=axes, qkv_bias=qkv_bias, guidance_embed=guidance, num_mode=modes,
            conditioning_embedding_channels=cec, patch_size=patch)
    except ValueError as e:
        raise CheckpointError(f"{store.describe()}: {e}") from None


HINT_DIFFUSERS = {0: "conv_in", **{2 + 2 * j: f"blocks.{j}" for j in range(6)}, 14: "conv_out"}


def recipes_for(config: FluxControlNetConfig, store: TensorStore, layout: str) -> dict[str, Recipe]:
    """Our tensor name -> where it comes from in the file."""
    if layout == "diffusers":
        recipes = {k: v for k, v in diffusers_format.transformer_recipes(config, store).items()
                   if not k.startswith("final_layer.")}
        x_embedder = "controlnet_x_embedder"
        hint = {i: f"input_hint_block.{name}" for i, name in HINT_DIFFUSERS.items()}
    else:
        recipes = {}
        x_embedder = "pos_embed_input"
        hint = {i: f"input_hint_block.{i}" for i in HINT_DIFFUSERS}
    for suffix in ("weight", "bias"):
        recipes[f"controlnet_x_embedder.{suffix}"] = Recipe((f"{x_embedder}.{suffix}",))
        if config.has_hint_block:
            for i, src in hint.items():
                recipes[f"input_hint_block.{i}.{suffix}"] = Recipe((f"{src}.{suffix}",))
    if config.num_mode is not None:
        recipes["controlnet_mode_embedder.weight"] = Recipe(("controlnet_mode_embedder.weight",))
    return recipes


def _complete(recipes: dict[str, Recipe], config: FluxControlNetConfig) -> dict[str, Recipe]:
    """Every remaining model tensor under its own name (original block names, controlnet_blocks)."""
    with torch.device("meta"):
        model = FluxControlNetModel(config)
    return {name: recipes.get(name, Recipe((name,))) for name in model.state_dict()}


def load_controlnet(path: str | Path, dtype: torch.dtype | None = None) -> FluxControlNetModel:
    """A FluxControlNetModel from a diffusers folder (config.json + safetensors), a diffusers-layout single file
    (InstantX) or an XLabs original file; `dtype=None` keeps the stored dtype."""
    store, folder = _open(Path(path))
    layout = layout_of(store)
    config = infer_config(store, layout, folder)
    recipes = _complete(recipes_for(config, store, layout), config)
    model = materialize(lambda: FluxControlNetModel(config), recipes, store, dtype)
    return model.eval()
