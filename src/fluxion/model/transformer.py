"""The FLUX.1 transformer: double-stream blocks, then single-stream blocks, over packed latents."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import math

import torch
from torch import Tensor, nn

from ..compute import compute_dtype_of
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, position_table, timestep_embedding


@dataclass
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None  # None: same as in_channels
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        check_heads(self.hidden_size, self.num_heads, self.axes_dim)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


def check_heads(hidden_size: int, num_heads: int, axes_dim: tuple[int, ...]) -> None:
    """The width splits into whole heads, and the RoPE axes cover each head exactly."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if sum(axes_dim) != hidden_size // num_heads:
        raise ValueError(f"axes_dim {axes_dim} sums to {sum(axes_dim)}, but the head dim is "
                         f"{hidden_size // num_heads}: the RoPE axes must cover each head exactly")


def modulation_vector(model: nn.Module, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
    """time (+ guidance) + pooled text through `model`'s `time_in`, `guidance_in`, `vector_in` embedders (the
    transformer's, or a ControlNet's own)."""
    dtype = model.compute_dtype
    vec = model.time_in(timestep_embedding(timesteps.float(), 256).to(dtype))
    if model.config.guidance_embed:
        if guidance is None:
            raise ValueError(f"this {type(model).__name__} has a guidance embedder (dev-style): pass `guidance` [B]")
        vec = vec + model.guidance_in(timestep_embedding(guidance.float(), 256).to(dtype))
    return vec + model.vector_in(y.to(dtype))


PRESETS: dict[str, FluxConfig] = {
    "flux1-dev": FluxConfig(guidance_embed=True),
    "flux1-schnell": FluxConfig(guidance_embed=False),
}


def preset(name: str) -> FluxConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX preset {name!r}; known presets: {sorted(PRESETS)}")
    return FluxConfig(**PRESETS[name].to_dict())


class FluxTransformer(nn.Module):
    _parallel = None  # fluxion.distributed.SequenceParallel once enable_parallelism ran

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks)
        )
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)
        self.gradient_checkpointing = False  # recompute block activations in backward (less memory)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the weights' own, or float32 over bf16 weights on a CPU without bf16
        units (`fluxion.compute.use_compute_dtype`)."""
        return compute_dtype_of(self, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """The vector that modulates every block: time (+ guidance) + pooled text."""
        return modulation_vector(self, timesteps, y, guidance)

    def compile_repeated_blocks(self, **compile_kwargs) -> None:
        """torch.compile each block (all blocks of a kind share one graph).

        Regional compilation, as diffusers' method of the same name: compile time grows with the number of
        block kinds (two), not with depth. The first forward afterwards pays the compile time.
        """
        for block in (*self.double_blocks, *self.single_blocks):
            block.compile(**{"dynamic": False, **compile_kwargs})

    def enable_parallelism(self, config=None, *, group=None) -> None:
        """Shard the token sequence over the ranks of a torch.distributed process group (diffusers' method).

        `config`: `fluxion.ContextParallelConfig(ulysses_degree=..., ring_degree=...)` (default: Ulysses over the
        whole group); the caller initialises the process group, and every rank runs the same call with the same
        seed. Forward then returns the full [B, N, C] output on every rank. See
        `fluxion.distributed.sequence_parallel`."""
        from ..distributed.sequence_parallel import ContextParallelConfig, SequenceParallel

        if config is None:
            import torch.distributed as dist

            config = ContextParallelConfig(ulysses_degree=dist.get_world_size(group) if dist.is_initialized() else 1)
        sp = SequenceParallel(config, group)
        for block in (*self.double_blocks, *self.single_blocks):
            block.attention_fn = sp.attention
        self._parallel = sp

    @property
    def parallel(self):
        """The installed `SequenceParallel` (None: single process)."""
        return self._parallel

    def shard_blocks(self, img: Tensor, p: Prepared, attn_mask=None, residuals=None):
        """(img, p, attn_mask, residuals) as the blocks take them: unchanged in a single process; under
        `enable_parallelism` this rank's slice of the tokens, RoPE table and residuals, with the shard layout in
        place of `attn_mask` (which is refused). Undo with `gather_tokens` after the final layer."""
        if self._parallel is None:
            return img, p, attn_mask, residuals
        if attn_mask is not None:
            raise ValueError("attn_mask (regional prompts) is not supported with enable_parallelism: run regional "
                             "prompts in a single process")
        img, p, layout, residuals = self._parallel.shard(img, p, residuals)
        return img, p, layout, residuals

    def gather_tokens(self, out: Tensor, attn_mask=None) -> Tensor:
        """The final layer's output over every token ([B, N, C] on every rank); `attn_mask` as `shard_blocks`
        returned it."""
        return out if self._parallel is None else self._parallel.gather(out, attn_mask)

    def modulations(self, vec: Tensor) -> list:
        """Every block's shift/scale/gate sets for `vec`, in call order (double blocks, single blocks, final)."""
        out = [(b.img_mod(vec), b.txt_mod(vec)) for b in self.double_blocks]
        return out + [b.modulation(vec) for b in self.single_blocks] + [self.final_layer.modulation(vec)]

    @staticmethod
    def _checkpointed(block, *args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)

    def text_and_positions(self, txt: Tensor, txt_ids: Tensor, img_ids: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """(txt_in(txt), RoPE table of the joint [txt, img] sequence): the parts of a step that depend only on
        the prompt and the token layout (a sampler may compute them once per image)."""
        pe = position_table(join_ids(txt_ids, img_ids, batch), self.config.axes_dim, self.config.theta)
        return self.txt_in(txt.to(self.compute_dtype)), pe

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        residuals: BlockResiduals | None = None,
        prepared: Prepared | None = None,
    ) -> Tensor:
        """Velocity for packed latents `img` [B, N, in_channels] (the noisy tokens, with any conditioning
        channels already concatenated: Fill, Control); output [B, N, out_channels].

        Extension points: `attn_mask` (bool over the joint [txt, img] sequence, True = may attend: regional
        prompts), `residuals` (added to the image stream after blocks: ControlNets), `prepared` (conditioning,
        text projection and RoPE table computed ahead by a sampler: `fluxion.model.step_runner`). Under
        `enable_parallelism` the blocks run on this rank's tokens and the output is gathered back to [B, N, C].
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, N, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        batch = img.shape[0]
        if prepared is None:
            vec = self.conditioning(per_item(timesteps, batch), y, per_item(guidance, batch))
            prepared = Prepared(vec, None, *self.text_and_positions(txt, txt_ids, img_ids, batch))
        img = self.img_in(img.to(self.compute_dtype))
        img, prepared, attn_mask, residuals = self.shard_blocks(img, prepared, attn_mask, residuals)
        img, txt = self.double_stream(img, prepared, attn_mask, residuals)
        img = self.single_stream(img, txt, prepared, attn_mask, residuals)
        return self.gather_tokens(self.final_layer(img, prepared.vec, prepared.mod(-1)), attn_mask)

    def double_stream(self, img: Tensor, p: Prepared, attn_mask=None, residuals=None, start: int = 0,
                      stop: int | None = None, txt: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Double blocks start..stop on (img, txt); txt defaults to the projected prompt in `p`."""
        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _call
        txt = p.txt if txt is None else txt
        for i in range(start, len(self.double_blocks) if stop is None else stop):
            img, txt = run(self.double_blocks[i], img, txt, p.vec, p.pe, p.mod(i), attn_mask)
            if residuals is not None:
                img = residuals.after_double(i, len(self.double_blocks), img)
        return img, txt

    def single_stream(self, img: Tensor, txt: Tensor, p: Prepared, attn_mask=None, residuals=None) -> Tensor:
        """Single blocks over the joint [txt, img] sequence; returns the image tokens."""
        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _call
        n_txt, depth = txt.shape[1], len(self.double_blocks)
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            x = run(block, x, p.vec, p.pe, p.mod(depth + i), attn_mask)
            if residuals is not None:
                x = torch.cat([x[:, :n_txt], residuals.after_single(i, len(self.single_blocks), x[:, n_txt:])], 1)
        return x[:, n_txt:]


@dataclass
class Prepared:
    """What a step computes before the blocks: the modulation vector `vec`, optionally every block's
    modulations `mods` (in call order, see `FluxTransformer.modulations`), the projected text and RoPE table."""

    vec: Tensor
    mods: list | None
    txt: Tensor
    pe: Tensor

    def mod(self, i: int):
        return None if self.mods is None else self.mods[i]


@dataclass
class BlockResiduals:
    """Additions to the image stream after blocks (ControlNet outputs, already scaled).

    Double block i gets `double[i % n]` when `repeat` (XLabs) else `double[i // ceil(depth / n)]` (InstantX,
    Union); single block i gets `single[i // ceil(depth / n)]` on its image tokens only."""

    double: list[Tensor] = field(default_factory=list)
    single: list[Tensor] = field(default_factory=list)
    repeat: bool = False

    def after_double(self, i: int, depth: int, img: Tensor) -> Tensor:
        return img if not self.double else img + _tiled(self.sample(self.double, i, depth, self.repeat), img)

    def after_single(self, i: int, depth: int, img: Tensor) -> Tensor:
        return img if not self.single else img + _tiled(self.sample(self.single, i, depth, False), img)

    @staticmethod
    def sample(samples: list[Tensor], i: int, depth: int, repeat: bool) -> Tensor:
        """The sample block i of `depth` gets: samples[i % n] (repeat) or samples[i // ceil(depth / n)]."""
        n = len(samples)
        return samples[i % n if repeat else i // math.ceil(depth / n)]


def _tiled(sample: Tensor, img: Tensor) -> Tensor:
    """A sample computed for one pass, over a batch that stacks several ([cond; uncond] of batched true CFG): every
    pass gets the same residual (as diffusers gives both CFG passes the same ControlNet outputs)."""
    if sample.shape[0] != img.shape[0]:
        sample = sample.repeat(img.shape[0] // sample.shape[0], *([1] * (sample.ndim - 1)))
    return sample.to(img.dtype)


def per_item(values: Tensor | None, batch: int) -> Tensor | None:
    """One value per batch item: a single value is expanded to the batch (None stays None)."""
    if values is None:
        return None
    return values.reshape(-1).expand(batch) if values.numel() == 1 else values


def _call(block, *args):
    return block(*args)


def join_ids(txt_ids: Tensor, img_ids: Tensor, batch: int) -> Tensor:
    """cat(txt_ids, img_ids) over the sequence, broadcasting [N, 3] ids over the batch."""
    if txt_ids.ndim == 2:
        txt_ids = txt_ids[None]
    if img_ids.ndim == 2:
        img_ids = img_ids[None]
    if txt_ids.shape[0] != img_ids.shape[0]:  # keep a shared batch of 1: the RoPE table is then built once
        txt_ids, img_ids = txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)
    return torch.cat([txt_ids, img_ids], dim=1).float()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
