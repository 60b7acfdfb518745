"""Control LoRAs (FLUX.1 Canny / Depth [dev] LoRA): a LoRA whose `img_in` (diffusers' `x_embedder`) matrices take
more input features than the base model's layer.

As diffusers' `FluxLoraLoaderMixin` (`_maybe_expand_transformer_param_shape_or_error_`): the layer is widened
with zero columns to the LoRA's input width and `config.in_channels` follows, so the base model's output is
unchanged for the original channels; the layer as it was is kept, and
`unload_lora_weights(reset_to_overwritten_params=True)` puts it back. A later LoRA whose `img_in` A matrix is
narrower than the (widened) layer gets zero columns too (diffusers' `_maybe_expand_lora_state_dict`).

The layer is widened in place (a new weight Parameter, same module), so hooks of adapters already on it stay;
their A matrices get zero columns as well.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .formats import TRANSFORMER, ClipNames, FluxNames, _Resolved, _resolve, _split_key
from .layers import _layer_state

INPUT_LAYER = "img_in"
OVERWRITTEN_ATTR = "_fluxion_overwritten"  # on the transformer: the InputLayer before the first widening


@dataclass
class InputLayer:
    """img_in as it was: its weight Parameter, in_features and the config's in_channels."""

    weight: nn.Parameter
    in_features: int
    in_channels: int


def _input_lora_keys(state_dict: Mapping[str, Tensor], transformer: nn.Module) -> list[str]:
    """The keys of A (down) matrices on img_in, in any layout the loader reads."""
    flux, clip = FluxNames(transformer), ClipNames(None)
    keys = []
    for key, value in state_dict.items():
        split = _split_key(key)
        if split is None or split[1] != "A" or not isinstance(value, Tensor) or value.ndim != 2:
            continue
        res = _resolve(split[0], flux, clip, False)
        if isinstance(res, _Resolved) and res.component == TRANSFORMER and res.target.module == INPUT_LAYER:
            keys.append(key)
    return keys


def fit_input_lora(state_dict: dict[str, Tensor],
                   transformer: nn.Module) -> tuple[dict[str, Tensor], InputLayer | None]:
    """Widen img_in when the LoRA's img_in A matrices are wider; zero-pad narrower ones.

    Returns (the state dict to parse, a copy when padded; the layer as it was before this call, or None when
    it was not widened): pass the latter to `restore_input_layer` to undo a load that fails later."""
    keys = _input_lora_keys(state_dict, transformer)
    if not keys:
        return state_dict, None
    layer = transformer.get_submodule(INPUT_LAYER)
    width = max(int(state_dict[k].shape[1]) for k in keys)
    before = None
    if width > int(layer.in_features):
        before = widen_input_layer(transformer, width)
    narrow = [k for k in keys if state_dict[k].shape[1] < int(layer.in_features)]
    if narrow:
        state_dict = dict(state_dict)
        for k in narrow:
            a = state_dict[k]
            state_dict[k] = torch.cat([a, a.new_zeros(a.shape[0], int(layer.in_features) - a.shape[1])], dim=1)
    return state_dict, before


@torch.no_grad()
def widen_input_layer(transformer: nn.Module, width: int) -> InputLayer:
    """img_in gets zero columns up to `width` inputs (config.in_channels follows); returns the layer as it was."""
    layer = transformer.get_submodule(INPUT_LAYER)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        raise ValueError(f"this LoRA needs {INPUT_LAYER} widened to {width} inputs, but its weight is not a plain "
                         "floating-point matrix (quantized?): load the model with img_in unquantized")
    state = _layer_state(layer)
    if state is not None and state.backup is not None:
        raise ValueError(f"this LoRA needs {INPUT_LAYER} widened to {width} inputs, but a fused LoRA is in it: "
                         "call unfuse_lora() first")
    before = InputLayer(layer.weight, int(layer.in_features), int(transformer.config.in_channels))
    wide = weight.new_zeros(weight.shape[0], width)
    wide[:, : weight.shape[1]] = weight
    _set_layer(transformer, nn.Parameter(wide, requires_grad=weight.requires_grad), width, width)
    if OVERWRITTEN_ATTR not in transformer.__dict__:
        transformer.__dict__[OVERWRITTEN_ATTR] = before  # plain attribute: not a parameter, not in state_dict
    return before


@torch.no_grad()
def restore_input_layer(transformer: nn.Module, layer_before: InputLayer | None = None) -> bool:
    """Put img_in back as it was before the first widening (or as `layer_before`); False if never widened."""
    original = transformer.__dict__.get(OVERWRITTEN_ATTR)
    target = layer_before or original
    if target is None:
        return False
    current = transformer.get_submodule(INPUT_LAYER).weight
    weight = target.weight
    weight.data = weight.data.to(current.device, current.dtype)  # the model may have moved since
    _set_layer(transformer, weight, target.in_features, target.in_channels)
    if target is original:
        del transformer.__dict__[OVERWRITTEN_ATTR]
    return True


def _set_layer(transformer: nn.Module, weight: nn.Parameter, in_features: int, in_channels: int) -> None:
    layer = transformer.get_submodule(INPUT_LAYER)
    layer.weight = weight
    layer.in_features = in_features
    layer.__dict__.pop("_upcast", None)  # a compute-dtype copy of the old weight (fluxion.compute)
    transformer.config.in_channels = in_channels
    state = _layer_state(layer)
    for pieces in (state.adapters.values() if state is not None else ()):
        for p in pieces:  # adapters already on the layer: their padding columns are zero
            a = p.A.data
            p.A.data = a[:, :in_features] if a.shape[1] >= in_features else torch.cat(
                [a, a.new_zeros(a.shape[0], in_features - a.shape[1])], dim=1)
