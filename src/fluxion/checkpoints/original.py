"""The original Black Forest Labs layout (flux1-dev.safetensors, ae.safetensors): our own parameter names.

Configs are inferred from tensor shapes; what shapes cannot tell (RoPE axes, norm groups) comes from
fluxion's own metadata when present, else from the official values.
"""
from __future__ import annotations

import json
import re
import warnings

from ..model.autoencoder import AutoEncoderConfig
from ..model.transformer import FluxConfig
from .loading import TensorStore
from .safetensors_file import CheckpointError

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
CONFIG_METADATA_KEY = "fluxion_config"


def detect_prefix(keys: list[str], prefixes=TRANSFORMER_PREFIXES) -> str:
    for p in prefixes:
        if any(k.startswith(p) for k in keys):
            return p
    return ""


def count_blocks(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise CheckpointError(f"block numbering has gaps: missing {pattern.split('.')[0]} {missing}")
    return len(found)


def default_axes_dim(head_dim: int) -> tuple[int, ...]:
    """RoPE split of a head: official (16, 56, 56) at 128; otherwise a quarter for axis 0, the rest halved."""
    if head_dim == 128:
        return (16, 56, 56)
    first = 2 * max(1, head_dim // 8)
    rest = (head_dim - first) // 2
    rest -= rest % 2
    first = head_dim - 2 * rest
    return (first, rest, rest)


def stored_config(store: TensorStore) -> dict:
    raw = store.metadata().get(CONFIG_METADATA_KEY)
    return json.loads(raw) if raw else {}


def infer_flux_config(store: TensorStore, axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """FluxConfig from original-layout tensor shapes."""
    keys = store.keys()
    for needed in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"):
        if needed not in store:
            raise CheckpointError(
                f"{store.describe()}: not a FLUX transformer in the original layout (no {needed!r})"
            )
    hidden, in_channels = store.shape("img_in.weight")
    depth = count_blocks(keys, r"double_blocks\.(\d+)\.")
    depth_single = count_blocks(keys, r"single_blocks\.(\d+)\.")
    if depth:
        head_dim = store.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = store.shape("double_blocks.0.img_mlp.0.weight")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in store
    elif depth_single:
        head_dim = store.shape("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = store.shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError(f"{store.describe()}: a FLUX transformer with no blocks")
    meta = stored_config(store)
    if axes_dim is None:
        axes_dim = tuple(meta["axes_dim"]) if "axes_dim" in meta else default_axes_dim(head_dim)
        if "axes_dim" not in meta and head_dim != 128:
            warnings.warn(
                f"{store.describe()}: head dim {head_dim} is not FLUX.1's 128 and the file does not say its RoPE "
                f"axes; assuming axes_dim={axes_dim} (pass axes_dim=... to load_transformer to choose)",
                stacklevel=3,
            )
    return FluxConfig(
        in_channels=in_channels,
        out_channels=store.shape("final_layer.linear.weight")[0],
        vec_in_dim=store.shape("vector_in.in_layer.weight")[1],
        context_in_dim=store.shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=axes_dim,
        theta=int(meta.get("theta", 10_000)),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in store,
    )


def infer_autoencoder_config(store: TensorStore, **overrides) -> AutoEncoderConfig:
    """AutoEncoderConfig from original-layout tensor shapes (ae.safetensors)."""
    keys = store.keys()
    if "encoder.conv_in.weight" not in store or "decoder.conv_in.weight" not in store:
        raise CheckpointError(f"{store.describe()}: not a FLUX autoencoder in the original layout (no encoder.conv_in)")
    ch, in_channels = store.shape("encoder.conv_in.weight")[:2]
    levels = count_blocks(keys, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(store.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    meta = stored_config(store)
    values = dict(
        in_channels=in_channels,
        out_ch=store.shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=count_blocks(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=store.shape("decoder.conv_in.weight")[1],
    )
    for k in ("scale_factor", "shift_factor", "norm_groups", "resolution"):
        if k in meta:
            values[k] = meta[k]
    values.update(overrides)
    if "norm_groups" not in values:
        values["norm_groups"] = default_norm_groups([ch * m for m in ch_mult], store)
    return AutoEncoderConfig(**values)


def default_norm_groups(channels: list[int], store: TensorStore) -> int:
    """32 (FLUX's) when every channel count allows it, else the largest count up to 32 that divides them all."""
    groups = next(g for g in range(32, 0, -1) if all(c % g == 0 for c in channels))
    if groups != 32:
        warnings.warn(
            f"{store.describe()}: channel counts {channels} do not divide into FLUX's 32 norm groups and the file "
            f"does not say its group count; assuming {groups} (pass norm_groups=... to load_autoencoder to choose)",
            stacklevel=3,
        )
    return groups
