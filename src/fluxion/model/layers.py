"""Building blocks of the FLUX.1 transformer: embedders, RoPE, modulation, the two block kinds.

Parameter names follow the original Black Forest Labs layout, so original single-file checkpoints
load without renaming (diffusers folders are renamed in `fluxion.checkpoints.diffusers`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------- pure math


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of `t * time_factor`, cosines first (the reference's order)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices [..., N, dim/2, 2, 2] for positions `pos` [..., N] along one axis (float32)."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta**scale
    angle = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).float()


def position_table(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """RoPE table for 3-axis ids [B, N, 3] (or [N, 3]) -> complex [B, 1, N, head_dim/2]: cos + i*sin per pair.

    Rotating the pair (a, b) = (x[2j], x[2j+1]) by the reference's 2x2 matrix [[cos, -sin], [sin, cos]] is
    the complex product (a + ib)(cos + i sin); as one complex multiply it runs 5-8x faster on CPU than the
    same arithmetic spelled with strided real tensors.
    """
    if ids.ndim == 2:
        ids = ids[None]
    m = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)  # [B, N, D/2, 2, 2]
    return torch.complex(m[..., 0, 0], m[..., 1, 0])[:, None]


def apply_rope(x: Tensor, table: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of each head (see position_table), in float32; out in `dtype`."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * table).flatten(-2).to(dtype or x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, mask: Tensor | None = None) -> Tensor:
    """Joint attention with RoPE: q, k (any float dtype), v [B, H, L, D] -> [B, L, H*D] in v's dtype.

    `mask` (bool [L, L] or broadcastable to [B, H, L, L], True = may attend) restricts who sees whom
    (regional prompts).

    This is the blocks' default `attention_fn` (an extension point: a block calls `self.attention_fn(q, k, v,
    table, mask)` and passes `mask` through untouched; `fluxion.distributed` swaps in a sequence-parallel
    function on a transformer's own blocks, whose `mask` is then its shard layout)."""
    q, k = apply_rope(q, table, v.dtype), apply_rope(k, table, v.dtype)
    return core_attention(q, k, v, mask).transpose(1, 2).flatten(2)


def core_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, H, L, D] (RoPE already applied) -> [B, H, L, D]; bf16 on CPU runs
    `bf16_cpu_attention`, everything else torch's SDPA."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return bf16_cpu_attention(q, k, v, mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bf16_cpu_attention(q: Tensor, k: Tensor, v: Tensor, max_scores: int = 2**22, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v as bf16 matmuls over blocks of heads and queries.

    On CPUs with bf16 units this is ~3x faster than torch's flash-attention kernel at FLUX sizes (1536
    tokens, 24 heads: 0.048 s vs 0.142 s on 2 cores; bench/speed.py shows the whole step). Blocks of at
    most `max_scores` scores (8 MiB) stay in cache, which is what makes it fast; torch accumulates the
    softmax in float32 either way, and the probabilities are rounded to bf16 before `@ v` (as torch's math
    attention does in bf16): outputs stay within a few bf16 ulps of the flash kernel's.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    heads = max(1, min(h, max_scores // (b * lq * lk)))
    rows = lq if heads > 1 else max(1, min(lq, max_scores // (b * lk)))
    q = q * d**-0.5
    if mask is not None:  # masked (regional) attention is rare: one block, no tiling
        return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")), dim=-1) @ v
    if heads >= h and rows >= lq:  # small inputs: one block
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    out = torch.empty_like(q)
    for i in range(0, h, heads):
        kt, vi = k[:, i : i + heads].transpose(-1, -2), v[:, i : i + heads]
        for j in range(0, lq, rows):
            scores = q[:, i : i + heads, j : j + rows] @ kt
            out[:, i : i + heads, j : j + rows] = torch.softmax(scores, dim=-1) @ vi
    return out


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] laid out (K, H, D) -> three [B, H, L, D] tensors."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


# ---------------------------------------------------------------- modules


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (the reference does so for stability)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.float_output(x).to(x.dtype)

    def float_output(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale.float()


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized q and k in float32: RoPE, next, works in float32 and rounds once (to v's dtype)."""
        return self.query_norm.float_output(q), self.key_norm.float_output(k)


class SelfAttention(nn.Module):
    """Holds one stream's qkv projection, QK norm and output projection (attention runs jointly)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """Linear(silu(vec)) split into (shift, scale, gate) sets: two sets for double blocks, one for single."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


_GELU_K = 2 * math.sqrt(2 / math.pi)
_GELU_CHAIN_MAX = 1 << 20  # elements; see tanh_gelu


def tanh_gelu(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (what FLUX's MLPs were trained with), as x·sigmoid(2c(x + 0.044715x³)),
    c = sqrt(2/pi), since 0.5(1 + tanh(z)) = sigmoid(2z).

    Decision: for activations up to a million elements without autograd, one new tensor and five in-place
    elementwise ops. torch 2.13's CPU kernel for `F.gelu(approximate="tanh")` takes 1.4-2.3x as long at
    fluxion-mini's shapes, most on AVX2; at full FLUX size the tensor leaves the cache and six passes over
    memory lose to torch's one. End to end it pays where torch runs at AVX2 capability (a few percent of a
    fluxion-mini image, where its 0.5 s target has least room) and is level on AVX-512. `bench/gelu_speed.py
    [--end-to-end]` times both on the machine at hand; they agree to float32 rounding. Rejected: the erf GELU,
    faster still but another function than the checkpoints learned. Under autograd the chain would overwrite
    what sigmoid's backward needs.
    """
    if x.numel() > _GELU_CHAIN_MAX or (torch.is_grad_enabled() and x.requires_grad):
        return F.gelu(x, approximate="tanh")
    return tanh_gelu_chain(x)


def tanh_gelu_chain(x: Tensor) -> Tensor:
    """`tanh_gelu`'s path for small tensors without autograd, at any size (the bench times it directly)."""
    u = x * x
    return u.mul_(0.044715 * _GELU_K).add_(_GELU_K).mul_(x).sigmoid_().mul_(x)


class TanhGELU(nn.Module):
    """`tanh_gelu` as a module: a drop-in for nn.GELU(approximate="tanh"), no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return tanh_gelu(x)


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), TanhGELU(), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: separate weights per stream, one joint attention over [txt, img]."""

    attention_fn = staticmethod(attention)  # extension point (see `attention`): replaced per instance

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_mlp = feed_forward(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = feed_forward(dim, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mod=None, mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """`mod`: (img_mod(vec), txt_mod(vec)) when computed ahead (for every step at once); `mask`: attention
        mask over the joint [txt, img] sequence."""
        img_mod, txt_mod = mod if mod is not None else (self.img_mod(vec), self.txt_mod(vec))
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), i_shift1, i_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
        attn = self.attention_fn(
            torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2), torch.cat([txt_v, img_v], dim=2), pe, mask
        )
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """DiT block with parallel attention and MLP over the joint sequence (one fused input projection)."""

    attention_fn = staticmethod(attention)  # extension point (see `attention`): replaced per instance

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = TanhGELU()
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mod=None, mask: Tensor | None = None) -> Tensor:
        shift, scale, gate = mod if mod is not None else self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.dim, self.mlp_hidden], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([self.attention_fn(q, k, v, pe, mask), self.mlp_act(mlp)], dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, vec: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # shift first, as the original stores it
        return shift, scale

    def forward(self, x: Tensor, vec: Tensor, mod=None) -> Tensor:
        shift, scale = mod if mod is not None else self.modulation(vec)
        return self.linear(modulate(self.norm_final(x), shift, scale))
