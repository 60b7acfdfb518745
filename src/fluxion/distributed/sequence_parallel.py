"""Sequence-parallel (context-parallel) inference of the FLUX transformer over `torch.distributed`.

Usage, with diffusers' names; the caller initialises the process group (as with diffusers) and every rank
runs the same pipeline call with the same seed:

    torch.distributed.init_process_group("gloo")        # or "nccl"; torchrun sets the environment
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))

How it works. Every per-token op (modulation, norms, MLPs, projections) runs on a rank's own shard, so only
attention talks. On entry to the blocks (`FluxTransformer.shard_blocks`) each rank keeps ceil(N/P) of the
text tokens and ceil(N/P) of the image tokens (zero-padded at the end when P does not divide a count), its
slices of the RoPE table, and the same slices of ControlNet residual samples; its local joint sequence is
[its text, its image]. Attention is order-free over keys, so the global sequence the ranks see is
[txt_0, img_0, txt_1, img_1, ...] with padded keys masked out; padded query rows compute harmlessly and are
dropped. The final layer's output is all-gathered to [B, N, C] on every rank (diffusers gathers at
proj_out), so the sampler, the VAE and everything after run unchanged and identically on every rank.

- Ulysses (degree u): RoPE on the local q, k, v [B, H, L, D]; one all-to-all (q, k, v stacked) gives each
  rank H/u heads over the u shards' tokens; attention (with the key-padding mask); one all-to-all back.
  Head counts that u does not divide are padded with zero heads, dropped afterwards.
- Ring (degree r): each rank keeps its queries and all-gathers K and V of the ring (diffusers'
  rotate_method="allgather"), then merges per-shard partial attentions with an online softmax (running max,
  running sum): exact in float32, and no more than one shard's scores are held at a time.
- Unified (both > 1): a 2D mesh, global rank = ring_index * u + ulysses_index (diffusers' order); Ulysses
  inside each row of u ranks, then Ring across the r rows.

Decisions. The blocks are not rewritten: each block calls `self.attention_fn` (default `layers.attention`),
and `enable_parallelism` sets it on the transformer's own blocks only (a ControlNet's blocks keep the
single-process attention and compute full-sequence residuals on every rank, which are then sliced). The
shard layout travels in the blocks' `mask` argument, so one transformer carries no per-call state and the
single-process path is unchanged (one `is None` test per step, no copies). Rejected: sharding inside every
block (a gather per block), a global monkeypatch of `layers.attention` (would hit ControlNets and other
models in the process), send/recv ring rotation (gloo's p2p is slow and all-gather is what diffusers
defaults to), and regional `attn_mask` under parallelism (refused: it is a dense [L, L] mask that would have
to be permuted into the shard order; rare enough not to be worth it now). `all_to_all_single` is probed once
(`collectives.Collectives`); where the backend lacks it, all_gather + local selection replaces it.

Communication per step, per rank (`communication_bytes`, which `Collectives`' counters match exactly): each
attention moves, with Ulysses, 4 all-to-alls of (u-1)/u of the local q / k / v / output bytes (q, k, v go
as one stacked call); with Ring, an all-gather of K and V ((r-1) shards each); plus one all-gather of the
output tokens at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..model.layers import apply_rope, core_attention
from ..model.transformer import BlockResiduals, Prepared
from .collectives import Collectives


@dataclass
class ContextParallelConfig:
    """diffusers' `ContextParallelConfig`: `ring_degree` x `ulysses_degree` ranks (None means 1) must equal
    the process group's world size.

    `rotate_method`: "allgather" (the only one implemented; diffusers' default). `mesh`: not supported (the
    default group is used; pass `group=` to `enable_parallelism` for another). `ulysses_anything` /
    `ring_anything` are accepted and have no effect: any token and head count already works (padding)."""

    ring_degree: int | None = None
    ulysses_degree: int | None = None
    rotate_method: str = "allgather"
    mesh: object | None = None
    ulysses_anything: bool = False
    ring_anything: bool = False

    def __post_init__(self):
        for name in ("ring_degree", "ulysses_degree"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ContextParallelConfig.{name} must be a positive int or None, got {value!r}")
        if self.rotate_method != "allgather":
            raise ValueError(f"ContextParallelConfig.rotate_method={self.rotate_method!r} is not implemented in "
                             "fluxion; use 'allgather'")
        if self.mesh is not None:
            raise ValueError("ContextParallelConfig.mesh is not supported by fluxion: the default process group "
                             "is used (or enable_parallelism(group=...))")

    @property
    def ring(self) -> int:
        return self.ring_degree or 1

    @property
    def ulysses(self) -> int:
        return self.ulysses_degree or 1

    def check(self, world_size: int) -> None:
        if self.ring * self.ulysses != world_size:
            raise ValueError(f"ContextParallelConfig: ring_degree ({self.ring}) x ulysses_degree ({self.ulysses}) "
                             f"= {self.ring * self.ulysses} must equal the process group's world size ({world_size})")


@dataclass
class ShardLayout:
    """Which tokens this rank holds in one forward: passed to the blocks as their `mask` argument."""

    n_txt: int
    n_img: int
    lt: int  # local text tokens (padded)
    li: int  # local image tokens (padded)
    img_valid: Tensor  # bool [li]: this rank's image rows that are real tokens
    ring_masks: tuple  # per ring shard: bool [u * (lt + li)] key mask, or None when every key is real
    ring_live: tuple  # per ring shard: whether it holds any real key


class _Solo:
    """A degree-1 dimension: no communication."""

    size, rank, all_to_all_works, bytes_received = 1, 0, True, 0

    def all_to_all(self, x: Tensor) -> Tensor:
        return x

    def all_gather(self, x: Tensor) -> list[Tensor]:
        return [x]


class SequenceParallel:
    """The state `FluxTransformer.enable_parallelism` installs: process groups, shard and gather, attention."""

    def __init__(self, config: ContextParallelConfig, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("enable_parallelism needs an initialised torch.distributed process group "
                             "(torch.distributed.init_process_group, e.g. under torchrun)")
        self.config = config
        size = dist.get_world_size(group)
        config.check(size)
        self.size, self.rank = size, dist.get_rank(group)
        self.world = Collectives(group)
        u, r = config.ulysses, config.ring
        if u == size:
            self.ulysses, self.ring = self.world, _Solo()
        elif r == size:
            self.ulysses, self.ring = _Solo(), self.world
        else:  # 2D mesh: every rank creates every subgroup, in the same order
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
            row, col = divmod(self.rank, u)
            self.ulysses = self.ring = None
            for i in range(r):
                g = dist.new_group([ranks[i * u + j] for j in range(u)])
                if i == row:
                    self.ulysses = Collectives(g)
            for j in range(u):
                g = dist.new_group([ranks[i * u + j] for i in range(r)])
                if j == col:
                    self.ring = Collectives(g)
        self._cache: tuple = ((), None)

    @property
    def comms(self) -> tuple:
        return tuple({id(c): c for c in (self.world, self.ulysses, self.ring)}.values())

    # ------------------------------------------------------------ shard / gather

    def shard(self, img: Tensor, p: Prepared, residuals: BlockResiduals | None):
        """(img, prepared, layout, residuals) sliced to this rank's tokens; img is the embedded [B, N, C]."""
        key = (p.txt, p.pe, img.shape[1])
        if len(self._cache[0]) == 3 and all(a is b for a, b in zip(key[:2], self._cache[0][:2])) \
                and key[2] == self._cache[0][2]:
            txt, pe, layout = self._cache[1]
        else:
            txt, pe, layout = self._shard_text(p.txt, p.pe, img.shape[1], img.device)
            self._cache = (key, (txt, pe, layout))
        img = _take(img, 1, self.rank, layout.li)
        if residuals is not None:
            residuals = BlockResiduals([_take(s, 1, self.rank, layout.li) for s in residuals.double],
                                       [_take(s, 1, self.rank, layout.li) for s in residuals.single], residuals.repeat)
        return img, Prepared(p.vec, p.mods, txt, pe), layout, residuals

    def _shard_text(self, txt: Tensor, pe: Tensor, n_img: int, device):
        n_txt, size, g = txt.shape[1], self.size, self.rank
        lt, li = math.ceil(n_txt / size), math.ceil(n_img / size)
        pe = torch.cat([_take(pe[:, :, :n_txt], 2, g, lt), _take(pe[:, :, n_txt:], 2, g, li)], dim=2)
        valid = torch.cat([torch.arange(size * lt, device=device).view(size, lt) < n_txt,
                           torch.arange(size * li, device=device).view(size, li) < n_img], dim=1)  # [P, lt + li]
        u, r = self.ulysses.size, self.ring.size
        chunks = valid.reshape(r, u * (lt + li))
        masks = tuple(None if bool(m.all()) else m for m in chunks)
        layout = ShardLayout(n_txt, n_img, lt, li, valid[g, lt:].clone(), masks, tuple(bool(m.any()) for m in chunks))
        return _take(txt, 1, g, lt), pe, layout

    def gather(self, out: Tensor, layout: ShardLayout) -> Tensor:
        """The final layer's local [B, li, C] -> [B, N, C] on every rank."""
        return torch.cat(self.world.all_gather(out), dim=1)[:, : layout.n_img]

    def relative_change(self, first: Tensor, prev: Tensor, layout: ShardLayout) -> Tensor:
        """First-block-cache statistic over the whole sequence: per image sum|first - prev| / sum|prev| over
        the real image tokens of every rank ([B], the same on every rank)."""
        w = layout.img_valid.to(first.dtype)[None, :, None]
        sums = torch.stack([((first - prev).abs() * w).flatten(1).sum(1), (prev.abs() * w).flatten(1).sum(1)])
        sums = self.world.all_reduce_sum(sums.float())
        count = layout.n_img * first.shape[-1]
        return (sums[0] / count) / (sums[1] / count).clamp_min(1e-12)

    # ------------------------------------------------------------ attention

    def attention(self, q: Tensor, k: Tensor, v: Tensor, table: Tensor, layout) -> Tensor:
        """The blocks' `attention_fn` under parallelism: local q, k, v [B, H, L, D] -> [B, L, H*D]."""
        if not isinstance(layout, ShardLayout):
            raise ValueError("sequence-parallel attention got a mask instead of a shard layout: attn_mask "
                             "(regional prompts) is not supported with enable_parallelism")
        q, k = apply_rope(q, table, v.dtype), apply_rope(k, table, v.dtype)
        b, h, n, d = q.shape
        u = self.ulysses.size
        if u > 1:
            hp = -(-h // u) * u
            x = torch.stack([q, k, v])  # [3, B, H, L, D]
            if hp != h:
                x = torch.cat([x, x.new_zeros(3, b, hp - h, n, d)], dim=2)
            x = self.ulysses.all_to_all(x.view(3, b, u, hp // u, n, d).permute(2, 0, 1, 3, 4, 5))
            q, k, v = x.permute(1, 2, 3, 0, 4, 5).reshape(3, b, hp // u, u * n, d)
        out = self._ring(q, k, v, layout)  # [B, H/u, u * L, D]
        if u > 1:
            out = self.ulysses.all_to_all(out.view(b, hp // u, u, n, d).permute(2, 0, 1, 3, 4))
            out = out.permute(1, 0, 2, 3, 4).reshape(b, hp, n, d)[:, :h]
        return out.transpose(1, 2).flatten(2)

    def _ring(self, q: Tensor, k: Tensor, v: Tensor, layout: ShardLayout) -> Tensor:
        if self.ring.size == 1:
            m = layout.ring_masks[0]
            return core_attention(q, k, v, None if m is None else m.view(1, 1, 1, -1))
        shards = self.ring.all_gather(torch.stack([k, v]))
        q32 = q.float() * q.shape[-1] ** -0.5
        top = total = acc = None
        for kv, mask, live in zip(shards, layout.ring_masks, layout.ring_live):
            if not live:
                continue
            s = q32 @ kv[0].float().transpose(-1, -2)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            m = s.amax(-1, keepdim=True)
            if top is None:
                top = m
                e = torch.exp(s - top)
                total, acc = e.sum(-1, keepdim=True), e @ kv[1].float()
            else:
                new = torch.maximum(top, m)
                old, e = torch.exp(top - new), torch.exp(s - new)
                total = total * old + e.sum(-1, keepdim=True)
                acc = acc * old + e @ kv[1].float()
                top = new
        return (acc / total).to(v.dtype)


def _take(x: Tensor, dim: int, rank: int, n: int) -> Tensor:
    """Rank `rank`'s n entries of `x` along `dim`, zero-padded at the end past x's size."""
    start, size = rank * n, x.shape[dim]
    part = x.narrow(dim, min(start, size), max(0, min(n, size - start)))
    if part.shape[dim] == n:
        return part
    pad = list(x.shape)
    pad[dim] = n - part.shape[dim]
    return torch.cat([part, x.new_zeros(pad)], dim=dim)


def communication_bytes(config: ContextParallelConfig, batch: int, tokens, hidden: int, heads: int, depth: int,
                        dtype: torch.dtype = torch.bfloat16, out_channels: int = 64) -> int:
    """Bytes each rank receives per transformer step.

    `tokens`: (text, image) token counts (exact, with the padding) or the joint count N (taken as image
    tokens, no text); `depth`: attention layers (double + single blocks). Each attention: Ulysses u moves 4
    all-to-alls of (u-1)/u of the local q, k, v, output bytes; Ring r all-gathers K and V ((r-1) shards of
    the post-Ulysses size). The final all-gather of the output adds (P-1) x local image tokens x out_channels.
    """
    u, r = config.ulysses, config.ring
    size = u * r
    n_txt, n_img = tokens if isinstance(tokens, tuple) else (0, tokens)
    lt, li = math.ceil(n_txt / size), math.ceil(n_img / size)
    n, item, d = lt + li, torch.empty((), dtype=dtype).element_size(), hidden // heads
    hp = -(-heads // u) * u
    local = batch * hp * n * d * item  # one of q, k, v, out on a rank (heads padded to the degree)
    per_attention = 4 * local * (u - 1) // u + 2 * (r - 1) * local  # after Ulysses: H/u heads x u*L tokens
    return depth * per_attention + (size - 1) * batch * li * out_channels * item
