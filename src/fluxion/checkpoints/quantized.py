"""Quantized Linear layers while loading: weights stored quantized (fp8 .safetensors, GGUF) and quantize-at-load.

Both plug into `materialize` as its `replace` callback, which builds each Linear layer as a QuantLinear from
the file before the float layer would be filled, so a full-precision copy of the model never exists.

fp8 .safetensors files keep float8 weights (e4m3fn, or e5m2), optionally with one scale per weight stored as
`<layer>.scale_weight` (ComfyUI "scaled fp8") or `<layer>.weight_scale`; the real weight is `fp8 * scale`.
Marker and activation-scale tensors those files carry (`scaled_fp8`, `<layer>.scale_input`, `<layer>.input_scale`)
are ignored: fluxion does not quantize activations.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.linear import FP8, KEEP_FLOAT, QuantLinear, fits, is_kept
from .loading import Recipe, Replacer, TensorStore, read_tensor
from .safetensors_file import CheckpointError

FP8_DTYPES = {dtype: name for name, dtype in FP8.items()}
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_SUFFIXES = (".scale_input", ".input_scale")
IGNORED_KEYS = ("scaled_fp8",)


class Fp8Store(TensorStore):
    """A TensorStore over fp8 files: scale tensors are hidden (used, not loaded); `get` returns real values."""

    def __init__(self, store: TensorStore):
        super().__init__(store.files, store.prefix)
        self.scales: dict[str, str] = {}  # weight name -> its scale tensor's name
        self._hidden: dict = {}  # name -> (file, key) of tensors used but not model tensors
        for key in list(self._where):
            hit = next((s for s in WEIGHT_SCALE_SUFFIXES if key.endswith(s)), None)
            if hit:
                self.scales[key[: -len(hit)] + ".weight"] = key
                self._hidden[key] = self._where.pop(key)
            elif key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES):
                self._hidden[key] = self._where.pop(key)
        for weight, scale_key in self.scales.items():
            if weight not in self._where:
                raise CheckpointError(f"{self.describe()}: scale {store.prefix + scale_key!r} has no weight {weight!r}")
            if FP8_DTYPES.get(self.dtype(weight)) is None:
                raise CheckpointError(f"{self.file_of(weight)}: {weight!r} has a scale but is stored as "
                                      f"{self.dtype(weight)}, not float8")

    def scale(self, name: str) -> Tensor:
        key = self.scales.get(name)
        if key is None:
            return torch.ones((), dtype=torch.float32)
        f, stored = self._hidden[key]
        value = f.get(stored, torch.float32)
        if value.numel() != 1:
            raise CheckpointError(f"{f.path}: {stored!r} has shape {list(value.shape)}; fluxion reads one scale "
                                  "per weight (per-tensor scaled fp8)")
        return value.reshape(())

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        if self.dtype(name) not in FP8_DTYPES:
            return super().get(name, dtype)
        out = super().get(name, dtype if dtype is not None and dtype not in FP8_DTYPES else torch.float32)
        return out.mul_(self.scale(name).to(out.dtype)) if name in self.scales else out

    def quantized(self, name: str) -> tuple[str, Tensor, Tensor] | None:
        """(qtype, storage, scale) of a 2-D float8 weight, as QuantLinear keeps it; None for other tensors."""
        dtype = self.dtype(name)
        if dtype not in FP8_DTYPES or len(self.shape(name)) != 2:
            return None
        return FP8_DTYPES[dtype], super().get(name).view(torch.uint8), self.scale(name)


def holds_fp8(store: TensorStore) -> bool:
    return any(store.dtype(k) in FP8_DTYPES for k in store.keys())


def compute_dtype(store: TensorStore) -> torch.dtype:
    """The dtype an fp8 file's model computes in when none is asked: its non-float8 floats' (else bfloat16)."""
    for k in store.keys():
        dtype = store.dtype(k)
        if dtype.is_floating_point and dtype not in FP8_DTYPES:
            return dtype
    return torch.bfloat16


def linear_replacer(store, recipes: dict[str, Recipe] | None, dtype: torch.dtype | None,
                    quantize: str | None = None, keep=KEEP_FLOAT) -> Replacer:
    """A `materialize` callback building Linear layers as QuantLinear.

    A weight stored quantized (float8, GGML blocks; `store.quantized(name)`) is kept as stored, never requantized.
    Otherwise, with `quantize`, a layer not matching `keep` is read in `dtype` and quantized (so the result equals
    loading in `dtype` then `quantize_model`). Everything else is left to the normal, float filling.
    """
    stored_quantized = getattr(store, "quantized", None)

    def recipe(name: str) -> Recipe:
        return recipes[name] if recipes is not None else Recipe((name,))

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Linear:
            return None
        weight = recipe(f"{name}.weight")
        stored = stored_quantized(weight.sources[0]) if stored_quantized and weight.combine == "same" else None
        wanted = quantize is not None and not is_kept(name, keep) and fits(quantize, module.in_features)
        if stored is None and not wanted:
            return None
        bias = None if module.bias is None else read_tensor(recipe(f"{name}.bias"), store, dtype)
        grad = module.bias is not None and module.bias.requires_grad
        if stored is not None:
            qtype, data, scale = stored
            return QuantLinear(module.in_features, module.out_features, qtype, data, scale, bias, dtype, grad)
        return QuantLinear.quantize(read_tensor(weight, store, dtype), bias, quantize, bias_requires_grad=grad)

    return replace
