"""QuantEmbedding: a token-embedding table kept quantized; only the looked-up rows are dequantized.

Community T5 files store the 32128 x 4096 embedding as GGML blocks (GGUF) or float8 (fp8 .safetensors); a
bf16 copy would cost 263 MB of resident memory for the few hundred rows a prompt uses.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ggml
from .linear import FP8


class QuantEmbedding(nn.Module):
    """nn.Embedding's forward over stored rows: GGML blocks [num, row_bytes] or float8 bytes [num, dim] (+ scale)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, qdata: Tensor,
                 scale: Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if qtype not in FP8 and (qtype not in ggml.TYPES or qtype in ggml.FLOAT_TYPES):
            raise ValueError(f"QuantEmbedding stores GGML blocks or float8, not {qtype!r}")
        self.num_embeddings, self.embedding_dim, self.qtype = int(num_embeddings), int(embedding_dim), qtype
        row = ggml.row_bytes(qtype, self.embedding_dim) if qtype in ggml.TYPES else self.embedding_dim
        if tuple(qdata.shape) != (self.num_embeddings, row):
            raise ValueError(f"{qtype} storage for a {num_embeddings} x {embedding_dim} embedding must have shape "
                             f"{[self.num_embeddings, row]}, got {list(qdata.shape)}")
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", None if scale is None else scale.float().reshape(()))
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=qdata.device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    def rows(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized rows `ids` (any shape of indices) -> [*ids.shape, dim]."""
        dtype = dtype or self.dtype
        flat = ids.reshape(-1)
        raw = self.qdata.index_select(0, flat)
        if self.qtype in FP8:
            out = raw.view(FP8[self.qtype]).to(dtype)
            if self.scale is not None:
                out = out.mul_(self.scale.to(dtype))
        else:
            out = ggml.dequantize(raw, self.qtype, (flat.numel(), self.embedding_dim), dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(ids)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}, "
                f"dtype={str(self.dtype).replace('torch.', '')}")
