"""Tiny random diffusers FluxControlNetModels for the ControlNet tests (diffusers is the test-only oracle), and
the conversion of a diffusers net with a hint block to XLabs' original layout."""
from __future__ import annotations

from pathlib import Path

import torch

from fixtures import TINY_TRANSFORMER_CONFIG, randomize_parameters_

TINY_CONTROLNET_CONFIG = dict(
    patch_size=1,
    in_channels=TINY_TRANSFORMER_CONFIG["in_channels"],
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)


def diffusers_controlnet(seed: int = 0, **overrides):
    """A diffusers FluxControlNetModel with every parameter random (the zero-init projections included)."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(**{**TINY_CONTROLNET_CONFIG, **overrides})
    randomize_parameters_(net, seed=seed + 500)
    return net.eval()


def save_diffusers_controlnet(folder, seed: int = 0, **overrides) -> Path:
    net = diffusers_controlnet(seed, **overrides)
    net.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def to_xlabs_layout(state_dict: dict) -> dict:
    """A diffusers ControlNet state dict (double blocks only, with a hint block) in XLabs' original layout."""
    from fixtures import diffusers_to_original_transformer

    sd = dict(state_dict)
    out = {}
    for k in list(sd):
        if k.startswith("controlnet_blocks."):
            out[k] = sd.pop(k)
        elif k.startswith("controlnet_x_embedder."):
            out[k.replace("controlnet_x_embedder", "pos_embed_input")] = sd.pop(k)
        elif k.startswith("input_hint_block."):
            name = k[len("input_hint_block."):]
            part, _, suffix = name.rpartition(".")
            index = 0 if part == "conv_in" else 14 if part == "conv_out" else 2 + 2 * int(part.split(".")[1])
            out[f"input_hint_block.{index}.{suffix}"] = sd.pop(k)
    h = sd["x_embedder.weight"].shape[0]
    sd |= {"norm_out.linear.weight": torch.zeros(2 * h, h), "norm_out.linear.bias": torch.zeros(2 * h),
           "proj_out.weight": torch.zeros(4, h), "proj_out.bias": torch.zeros(4)}
    converted = diffusers_to_original_transformer(sd)
    out |= {k: v for k, v in converted.items() if not k.startswith("final_layer.")}
    return {k: v.contiguous() for k, v in out.items()}
