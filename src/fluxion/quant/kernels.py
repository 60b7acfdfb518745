"""Quantized matmuls without a whole dequantized weight: `chunked_linear` dequantizes a few hundred output rows
at a time into a float tile and multiplies it straight away, so memory never holds the whole float weight (a
12288x3072 layer is 151 MB in float32). Why this and not torch's packed int4/int8 kernels: `fluxion.quant.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ggml

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fp8 storages (raw bytes) and their dtypes
# Output rows dequantized per tile: bench/quant_matmul.py --chunk N measured 128/256/512/1024 rows at 3072->12288
# and 12288->3072; 512 was as fast as the best everywhere (narrow tiles make small, slower matmuls), and bounds
# the float temporary at 512 x in_features (25 MB at 12288 float32 inputs, against 151 MB for the whole weight).
CHUNK_ROWS = 512


def dequantize_rows(qdata: Tensor, qtype: str, scale: Tensor | None, in_features: int, dtype: torch.dtype) -> Tensor:
    """Rows of a QuantLinear's storage (`qdata[i:j]`, `scale[i:j]`) -> float [j - i, in_features] in `dtype`."""
    if qtype in ("int8", "w8a8"):
        return qdata * scale.to(dtype)[:, None]
    if qtype in FP8:
        return qdata.view(FP8[qtype]).to(dtype).mul_(scale.to(dtype))
    return ggml.dequantize(qdata, qtype, (qdata.shape[0], in_features), dtype)


def chunked_linear(x: Tensor, qdata: Tensor, qtype: str, scale: Tensor | None, out_features: int,
                   bias: Tensor | None, rows: int | None = None) -> Tensor:
    """F.linear(x, dequantize(weight), bias), dequantizing `rows` output rows at a time."""
    in_features = x.shape[-1]
    flat = x.reshape(-1, in_features)
    step = int(rows or CHUNK_ROWS)
    if step >= out_features:
        return F.linear(x, dequantize_rows(qdata, qtype, scale, in_features, x.dtype), bias)
    out = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
    for i in range(0, out_features, step):
        j = min(i + step, out_features)
        row_scale = scale[i:j] if scale is not None and scale.ndim else scale  # int8: per row; fp8: one
        w = dequantize_rows(qdata[i:j], qtype, row_scale, in_features, x.dtype)
        out[:, i:j] = flat @ w.t()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], out_features)
