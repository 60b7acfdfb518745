"""QuantLinear: a Linear layer whose weight is stored quantized and dequantized on the fly in forward.

Weight storages (`qtype`):
* "int8": int8 [out, in] + a float32 scale per output row (symmetric, amax / 127);
* "w8a8": the same storage; forward also quantizes the input per token and multiplies in int8 (torch._int_mm);
* "F8_E4M3" / "F8_E5M2" ("fp8"): float8 [out, in] (kept as raw bytes) + one float32 scale per tensor;
* a GGML block type ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", and read-only "Q4_K", "Q5_K", "Q6_K"):
  raw uint8 blocks [out, row_bytes] (fluxion.quant.ggml).

Why dequantize-then-matmul for "int8" (measured with fluxion.quant.seconds_per_call on this repo's CPU, one
thread, bf16, 1024 tokens, weights 3072x12288 / 12288x3072): bf16 matmul 0.16 / 0.17 s; int8 dequantize + bf16
matmul 0.23 / 0.23 s; W8A8 (per-token int8 input, torch._int_mm, float32 rescale) 0.10 / 0.12 s. The int8
kernel is the fastest, but quantizing activations per token is inaccurate when a few input channels carry
outliers, as large transformers' activations do: with 8 of 12288 input channels 50x larger the output error
was 13% with W8A8 vs 1.0% weight-only (relative_error_vs_bf16 at 3072x3072, 8 channels 20x: 6.0% vs 0.9%).
So "int8" stays weight-only and the faster kernel is opt-in as "w8a8".

How the product is computed (`bench/quant_matmul.py`, one thread, 1280 tokens = a 512x512 image, FLUX.1's
3072->12288 and 12288->3072 layers, on both kinds of CPU): on a CPU, weights are dequantized 512 output rows at
a time and each tile multiplied at once (`fluxion.quant.kernels.chunked_linear`). Against the floor (the same
matmul on weights already in the compute dtype) that runs at 1.02-1.10x in float32 (AVX2-only CPU) and about
1.05-1.2x in bf16 (AVX-512 bf16), close to dequantizing the whole weight first but without its float copy
(151 MB for one float32 12288x3072 layer). Rejected: torch's packed CPU kernels, into which Q4_0/Q4_1 map exactly
(`_weight_int4pack_mm_for_cpu`: w = (q - 8) * scale + zero per 32-group) and int8 too (`_weight_int8pack_mm`):
at FLUX's token counts they ran 2.5-3.5x slower than the floor in bf16 and 60x slower in float32 (a scalar
path); they win only for a handful of tokens (16 tokens, bf16: 3.7 ms against 37 ms), which FLUX never has.
Dequantization itself converts the small integers to the compute dtype first and scales in place: twice as
fast as the mixed-dtype product, with identical values.

Only the weight is quantized; the bias stays a float parameter. `layer.weight` is a `QuantizedWeight` (shape,
dtype, device and `dequantize()`, but not a tensor), so code that would write into a float weight, such as
fusing a LoRA, refuses clearly; LoRA adapters themselves work (they are forward hooks on the layer).
The weight is dequantized into the input's dtype at every call (nothing is cached: memory is the point; with
gradients on, in one piece, since autograd would keep every tile anyway);
`module.to(dtype)` changes that compute dtype and the bias, and also rounds int8/fp8 scales to `dtype`
(a 2^-9 relative change in bf16, far under the quantization error; GGML scales live inside the blocks).
"""
from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import compute
from . import ggml, kernels
from .kernels import FP8

log = logging.getLogger(__name__)

ALIASES = {"int8": "int8", "w8a8": "w8a8", "fp8": "F8_E4M3", "fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2",
           "q8": "Q8_0", "q4": "Q4_0"}

#: Layers `quantize_model` (and the GGUF writer) leave in floating point, as fnmatch patterns on module names.
#: * the embedders (img_in, txt_in, time_in, vector_in, guidance_in) and final_layer: well under 1% of the
#:   weights, but at the model's ends, where an error is not averaged over many later layers and reaches every
#:   token (the input projections) or the predicted velocity directly (final_layer);
#: * the modulation linears: they turn one conditioning vector per image into the shift/scale/gate of every
#:   token of a block, so their error becomes a systematic per-channel error of whole activations; and since
#:   they multiply a single vector, dequantizing them every step would cost time for no compute saved.
#:   They are ~27% of FLUX.1's weights (3.2 B parameters): pass `keep=KEEP_EMBEDDERS` to quantize them too
#:   (as the community's GGUF files do) and save ~3 GB (q8_0) to ~4.6 GB (q4_0) more.
#: Norms have no Linear and stay as they are.
KEEP_EMBEDDERS: tuple[str, ...] = ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*")
KEEP_FLOAT: tuple[str, ...] = KEEP_EMBEDDERS + ("*.img_mod.lin", "*.txt_mod.lin", "*.modulation.lin")


def canonical_qtype(name: str) -> str:
    """User spelling ("q8_0", "q4", "fp8", "int8", "Q6_K") -> the storage name QuantLinear uses."""
    key = str(name).strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    if key.upper() in ggml.TYPES and key.upper() not in ggml.FLOAT_TYPES:
        return key.upper()
    if key.upper() in FP8:
        return key.upper()
    known = sorted(set(ALIASES) | {t.lower() for t in ggml.TYPES if t not in ggml.FLOAT_TYPES})
    raise ValueError(f"unknown quantization type {name!r}; known: {', '.join(known)}")


def writable_qtype(name: str) -> str:
    """A type fluxion can quantize to (not only read)."""
    qtype = canonical_qtype(name)
    if qtype in ggml.TYPES and qtype not in ggml.ENCODERS:
        raise ValueError(f"{qtype} is read-only in fluxion (K-quants load from GGUF files but are not written); "
                         f"quantize to one of: int8, w8a8, fp8, {', '.join(q.lower() for q in ggml.ENCODERS)}")
    return qtype


def is_kept(module_name: str, keep=KEEP_FLOAT) -> bool:
    return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in keep)


def fits(qtype: str, in_features: int) -> bool:
    """GGML rows hold whole blocks; other storages take any width."""
    return qtype not in ggml.TYPES or in_features % ggml.block_size(qtype) == 0


# ---------------------------------------------------------------- quantizers


CHUNK_ROWS = 256  # rows quantized per step: float32 temporaries of a few MB, whatever the layer's size


def _by_rows(w: Tensor, out_dtype: torch.dtype, fn) -> Tensor:
    out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    for i in range(0, w.shape[0], CHUNK_ROWS):
        out[i : i + CHUNK_ROWS] = fn(w[i : i + CHUNK_ROWS].detach().float(), i)
    return out


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-row int8: (int8 [out, in], float32 scale [out])."""
    scale = torch.cat([rows.abs().amax(dim=1) for rows in w.detach().split(CHUNK_ROWS)]).float() / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = _by_rows(w, torch.int8, lambda rows, i: torch.round(rows / scale[i : i + len(rows), None]).clamp_(-127, 127))
    return q, scale


def quantize_fp8(w: Tensor, fp8: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """float8 with one scale per tensor (amax maps to the format's largest finite value): (bytes, scale [])."""
    top = torch.finfo(fp8).max
    amax = torch.stack([rows.abs().amax() for rows in w.detach().split(CHUNK_ROWS)]).amax().float()
    scale = amax / top if amax > 0 else torch.ones((), dtype=torch.float32)
    # clamp: out-of-range float8 conversions give NaN, not the max
    q = _by_rows(w, fp8, lambda rows, i: (rows / scale).clamp_(-top, top))
    return q.view(torch.uint8), scale.reshape(())


# ---------------------------------------------------------------- the layer


class QuantizedWeight:
    """`QuantLinear.weight`: describes the weight like a tensor would (shape, dtype, device), dequantizes on request."""

    def __init__(self, layer: "QuantLinear"):
        self._layer = layer

    shape = property(lambda self: torch.Size((self._layer.out_features, self._layer.in_features)))
    dtype = property(lambda self: self._layer.dtype)
    device = property(lambda self: self._layer.qdata.device)
    qtype = property(lambda self: self._layer.qtype)
    ndim = 2
    requires_grad = False

    def dim(self) -> int:
        return 2

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self._layer.dequantized_weight(dtype)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.qtype}, shape={list(self.shape)}, dtype={self.dtype})"


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, qtype: str, qdata: Tensor, scale: Tensor | None = None,
                 bias: Tensor | None = None, dtype: torch.dtype = torch.bfloat16, bias_requires_grad: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.qtype = int(in_features), int(out_features), qtype
        expected = self._storage_shape()
        if tuple(qdata.shape) != expected:
            raise ValueError(f"{qtype} weight storage for a {in_features}->{out_features} Linear must have shape "
                             f"{list(expected)}, got {list(qdata.shape)}")
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", None if scale is None else scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=bias_requires_grad)
        # the compute dtype, as a buffer so that module.to(dtype) / .to(device) move it like a float weight
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=qdata.device), persistent=False)

    def _storage_shape(self) -> tuple[int, int]:
        if self.qtype in ggml.TYPES:
            return (self.out_features, ggml.row_bytes(self.qtype, self.in_features))
        return (self.out_features, self.in_features)

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, qtype: str,
                 bias_requires_grad: bool = False) -> "QuantLinear":
        """Quantize a float weight [out, in]; the layer computes in the weight's dtype."""
        qtype = writable_qtype(qtype)
        out_f, in_f = weight.shape
        scale = None
        if qtype in ("int8", "w8a8"):
            qdata, scale = quantize_int8(weight)
        elif qtype in FP8:
            qdata, scale = quantize_fp8(weight, FP8[qtype])
        else:
            qdata = ggml.quantize(weight, qtype)
        return cls(in_f, out_f, qtype, qdata, scale, None if bias is None else bias.detach(), weight.dtype,
                   bias_requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str) -> "QuantLinear":
        bias = linear.bias
        return cls.quantize(linear.weight, bias, qtype, bias_requires_grad=bias is not None and bias.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return kernels.dequantize_rows(self.qdata, self.qtype, self.scale, self.in_features, dtype or self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if (self.qtype == "w8a8" and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
                and compute.cpu_info().exact_int8_matmul):  # without VNNI torch._int_mm saturates: weight-only instead
            return _w8a8(x, self.qdata, self.scale, bias)
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            return kernels.chunked_linear(x, self.qdata, self.qtype, self.scale, self.out_features, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}, dtype={str(self.dtype).replace('torch.', '')}")


def _w8a8(x: Tensor, wq: Tensor, wscale: Tensor, bias: Tensor | None) -> Tensor:
    """Per-token symmetric int8 input x per-row int8 weight, int32 accumulation (torch._int_mm)."""
    rows = x.reshape(-1, x.shape[-1])
    xscale = (rows.abs().amax(-1, keepdim=True) / 127).clamp_(min=torch.finfo(x.dtype).tiny)
    xq = (rows / xscale).round_().clamp_(-127, 127).to(torch.int8)  # in x's dtype: 9x faster than in float32
    # scales applied in place, in float32: 4x faster than an out-of-place product at 1024 x 12288 outputs
    y = torch._int_mm(xq, wq.t()).float().mul_(xscale.float()).mul_(wscale.float()).to(x.dtype)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], wq.shape[0])


# ---------------------------------------------------------------- whole models


def quantize_model(model: nn.Module, qtype: str, keep=KEEP_FLOAT) -> nn.Module:
    """Replace the model's nn.Linear layers by QuantLinear, one at a time (in place; returns the model).

    Layers matching `keep` (default KEEP_FLOAT) and layers a GGML type cannot split into whole blocks stay float.
    Quantize before loading LoRA adapters (a layer carrying adapter hooks is refused).
    """
    qtype = writable_qtype(qtype)
    # names only: holding the modules would keep every float weight alive until the end
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n and not is_kept(n, keep)]
    for name in names:
        layer = model.get_submodule(name)
        if layer._forward_hooks or layer._forward_pre_hooks:
            raise ValueError(f"{name} has forward hooks (LoRA adapters?): quantize the model before loading adapters")
        if not fits(qtype, layer.in_features):
            log.info("%s stays float: %d inputs are not whole %s blocks", name, layer.in_features, qtype)
            continue
        model.set_submodule(name, QuantLinear.from_linear(layer, qtype))
        del layer
    return model


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """{module name: qtype} of the model's QuantLinear layers."""
    return {n: m.qtype for n, m in model.named_modules() if isinstance(m, QuantLinear)}
