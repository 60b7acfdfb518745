"""Quantized weights for the FLUX transformer: GGML block types, fp8 and int8 Linear layers.

* `ggml`: GGML block types (Q8_0 ... Q6_K) <-> float tensors, in torch;
* `linear`: `QuantLinear` (dequantizes its weight on the fly) and `quantize_model`;
* `embedding`: `QuantEmbedding` (a quantized token table; only looked-up rows are dequantized);
* `measure`: error and speed of one quantized layer at real widths.

Files: `fluxion.checkpoints.gguf` reads and writes GGUF; `load_transformer(..., quantize=...)` quantizes while loading.
"""
from .embedding import QuantEmbedding
from .linear import (
    KEEP_EMBEDDERS,
    KEEP_FLOAT,
    QuantizedWeight,
    QuantLinear,
    canonical_qtype,
    quantize_model,
    quantized_layers,
)
from .measure import relative_error_vs_bf16, seconds_per_call

__all__ = [
    "KEEP_EMBEDDERS",
    "KEEP_FLOAT",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedWeight",
    "canonical_qtype",
    "quantize_model",
    "quantized_layers",
    "relative_error_vs_bf16",
    "seconds_per_call",
]
