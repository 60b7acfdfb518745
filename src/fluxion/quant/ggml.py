"""GGML block types in pure torch: raw block bytes <-> float tensors.

A GGML-quantized row of `n` values is `n / block_size` blocks of `type_size` bytes; a tensor is its rows
back to back (raw uint8 `[*shape[:-1], row_bytes]`). Layouts follow ggml-common.h / the `gguf` package:

* Q8_0  (32 values, 34 B): f16 d, 32 x int8 q;                        x = d*q
* Q4_0  (32, 18 B): f16 d, 16 B of nibbles (low nibbles = values 0..15, high = 16..31);  x = d*(q-8)
* Q4_1  (32, 20 B): f16 d, f16 m, nibbles;                             x = d*q + m
* Q5_0  (32, 22 B): f16 d, u32 qh (bit i = 5th bit of value i), nibbles;  x = d*(q-16)
* Q5_1  (32, 24 B): f16 d, f16 m, qh, nibbles;                         x = d*q + m
* Q4_K  (256, 144 B): f16 d, f16 dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32, 128 B nibbles
* Q5_K  (256, 176 B): as Q4_K plus 32 B of 5th bits;                   x = d*sc*q - dmin*m
* Q6_K  (256, 210 B): 128 B low 4 bits, 64 B high 2 bits, 16 int8 scales (sub-blocks of 16), f16 d;  x = d*sc*(q-32)

Dequantizing to float32 is bit-exact with `gguf.quants.dequantize` (same operations in the same order);
to bf16/f16 the per-block scales are rounded to that dtype first and the products are computed in it (about
twice as fast at real widths, values within ~2 roundings of the float32 result). Quantizers exist for the
32-blocks (bit-exact with `gguf.quants.quantize`); the K-quants are read-only: neither we nor the `gguf`
package (0.19) implement their (search-based) quantizers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

QK_K = 256

#: name -> (values per block, bytes per block, GGML type id)
TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (1, 4, 0),
    "F16": (1, 2, 1),
    "Q4_0": (32, 18, 2),
    "Q4_1": (32, 20, 3),
    "Q5_0": (32, 22, 6),
    "Q5_1": (32, 24, 7),
    "Q8_0": (32, 34, 8),
    "Q4_K": (QK_K, 144, 12),
    "Q5_K": (QK_K, 176, 13),
    "Q6_K": (QK_K, 210, 14),
    "BF16": (1, 2, 30),
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", *FLOAT_TYPES)
BY_ID = {tid: name for name, (_, _, tid) in TYPES.items()}


def check_type(qtype: str) -> str:
    if qtype not in TYPES:
        raise ValueError(f"unsupported GGML type {qtype!r}; supported: {', '.join(TYPES)}")
    return qtype


def block_size(qtype: str) -> int:
    return TYPES[check_type(qtype)][0]


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of `n` values (`n` a multiple of the block size)."""
    bs, ts, _ = TYPES[check_type(qtype)]
    if n % bs:
        raise ValueError(f"a {qtype} row holds whole blocks of {bs} values; {n} is not a multiple of {bs}")
    return n // bs * ts


def nbytes(qtype: str, shape) -> int:
    return math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])


# ---------------------------------------------------------------- unpacking helpers


def _f16(b: Tensor) -> Tensor:
    """[..., 2k] uint8 -> [..., k] float32 (little-endian f16 fields)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    n = qs.shape[-1]
    out = torch.empty(*qs.shape[:-1], 2 * n, dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[..., :n])
    torch.bitwise_right_shift(qs, 4, out=out[..., n:])
    return out


def _bits(qh: Tensor) -> Tensor:
    """[..., k] bytes -> [..., 8k] bits; value 8j+i is bit i of byte j (a little-endian bit field)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (as float32)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


# ---------------------------------------------------------------- per-type decoders: (q, scale, offset)
# x = q * scale (+ offset), with q [nb, groups, n] small integers, scale/offset [nb, groups, 1] float32.


def _q8_0(b):
    return b[:, 2:].view(torch.int8)[:, None], _f16(b[:, :2])[:, None], None


def _q4_0(b):
    return _nibbles(b[:, 2:]).view(torch.int8).sub_(8)[:, None], _f16(b[:, :2])[:, None], None


def _q4_1(b):
    return _nibbles(b[:, 4:])[:, None], _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5(b, off: int):
    return _nibbles(b[:, off + 4 :]) | (_bits(b[:, off : off + 4]) << 4)


def _q5_0(b):
    return (_q5(b, 2).to(torch.int8) - 16)[:, None], _f16(b[:, :2])[:, None], None


def _q5_1(b):
    return _q5(b, 4)[:, None], _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]


def _k_scale_offset(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    return (d * sc)[..., None], -(dmin * mn)[..., None]


def _k_low(qs: Tensor) -> Tensor:
    """128 bytes -> [nb, 8, 32]: sub-block 2j = low nibbles of bytes 32j..32j+31, 2j+1 = their high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (qs & 0x0F).reshape(-1, 8, 32)


def _q4_k(b):
    scale, offset = _k_scale_offset(b)
    return _k_low(b[:, 16:]), scale, offset


def _q5_k(b):
    scale, offset = _k_scale_offset(b)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
    return _k_low(b[:, 48:]) | (high << 4), scale, offset


def _q6_k(b):
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> shifts[[0, 2]].view(1, 1, 2, 1)  # 4 low bits: nibbles
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts.view(1, 1, 4, 1)  # 2 high bits: crumbs
    q = ((ql & 0x0F).reshape(-1, 8, 32) | ((qh & 0x03).reshape(-1, 8, 32) << 4)).to(torch.int8) - 32
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()
    return q.reshape(-1, 16, 16), scale[..., None], None


DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: Tensor, qtype: str, shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw GGML bytes (any shape, `nbytes(qtype, shape)` of them) -> a `dtype` tensor of `shape`."""
    shape = tuple(int(s) for s in shape)
    raw = raw.reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    if raw.numel() != nbytes(qtype, shape):
        raise ValueError(f"{qtype} tensor of shape {list(shape)} needs {nbytes(qtype, shape)} bytes, got {raw.numel()}")
    if qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    q, scale, offset = DECODERS[qtype](raw.view(-1, TYPES[qtype][1]))
    # small integers convert exactly; converting first and scaling in place is twice as fast as the mixed-dtype
    # product `q * scale` (which casts element by element), with the same values (bench/quant_matmul.py)
    out = q.to(dtype).mul_(scale.to(dtype))
    if offset is not None:
        out += offset.to(dtype)
    return out.reshape(shape)


# ---------------------------------------------------------------- quantizers (32-value blocks)


def _roundf(x: Tensor) -> Tensor:
    """Round half away from zero, with ggml's formula (exact where x + 0.5 would round up)."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _h(x: Tensor) -> Tensor:
    """float32 [nb, 1] -> its f16 bytes [nb, 2]."""
    return x.to(torch.float16).view(torch.uint8)


def _absmax_signed(blocks: Tensor) -> Tensor:
    """Each block's value of largest magnitude, with its sign (the first one on ties, as numpy's argmax)."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def _pack_nibbles(q: Tensor) -> Tensor:
    half = q.shape[-1] // 2
    return (q[:, :half] & 0x0F) | (q[:, half:] << 4)


def _pack_bit4(q: Tensor) -> Tensor:
    """The 5th bit of 32 values -> 4 bytes, value 8j+i at bit i of byte j."""
    bits = ((q >> 4) & 1).view(-1, 4, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=q.device)
    return bits.sum(-1).to(torch.uint8)


def _enc_q8_0(b):
    d = b.abs().amax(-1, keepdim=True) / 127
    q = _roundf(b * _inverse(d)).to(torch.int8).view(torch.uint8)
    return [_h(d), q]


def _enc_q4_0(b):
    d = _absmax_signed(b) / -8
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return [_h(d), _pack_nibbles(q)]


def _enc_q4_1(b):
    hi, lo = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((b - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return [_h(d), _h(lo), _pack_nibbles(q)]


def _enc_q5_0(b):
    d = _absmax_signed(b) / -16
    q = torch.trunc(b * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return [_h(d), _pack_bit4(q), _pack_nibbles(q)]


def _enc_q5_1(b):
    hi, lo = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((b - lo) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return [_h(d), _h(lo), _pack_bit4(q), _pack_nibbles(q)]


CHUNK_BLOCKS = 1 << 15  # 1 Mi values per step
ENCODERS = {"Q8_0": _enc_q8_0, "Q4_0": _enc_q4_0, "Q4_1": _enc_q4_1, "Q5_0": _enc_q5_0, "Q5_1": _enc_q5_1}


def quantize(x: Tensor, qtype: str) -> Tensor:
    """A float tensor -> raw GGML bytes `[*shape[:-1], row_bytes]` (computed in float32, as ggml does)."""
    if qtype in FLOAT_TYPES:
        return x.detach().to(FLOAT_TYPES[qtype]).contiguous().view(torch.uint8)
    if qtype not in ENCODERS:
        raise ValueError(
            f"cannot quantize to {qtype!r}: fluxion writes {', '.join(QUANTIZABLE)} (K-quants are read-only)"
        )
    shape = tuple(x.shape)
    rb = row_bytes(qtype, shape[-1])
    blocks = x.detach().reshape(-1, 32)
    out = torch.empty(blocks.shape[0], TYPES[qtype][1], dtype=torch.uint8, device=x.device)
    # a chunk at a time: the float32 temporaries stay a few MB, whatever the layer's size
    for i in range(0, blocks.shape[0], CHUNK_BLOCKS):
        torch.cat(ENCODERS[qtype](blocks[i : i + CHUNK_BLOCKS].to(torch.float32)), dim=-1, out=out[i : i + CHUNK_BLOCKS])
    return out.reshape(*shape[:-1], rb)
