"""The FLUX.1 transformer: double-stream blocks, then single-stream blocks, over packed latents."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..compute import compute_dtype_of
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, position_table, timestep_embedding
from .step_cache import StepCache


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
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, but the head dim is "
                f"{self.hidden_size // self.num_heads}: the RoPE axes must cover each head exactly"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


PRESETS: dict[str, FluxConfig] = {
    "flux1-dev": FluxConfig(guidance_embed=True),
    "flux1-schnell": FluxConfig(guidance_embed=False),
}


def preset(name: str) -> FluxConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX preset {name!r}; known presets: {sorted(PRESETS)}")
    return FluxConfig(**PRESETS[name].to_dict())


class FluxTransformer(nn.Module):
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
        dtype = self.compute_dtype
        vec = self.time_in(timestep_embedding(timesteps.float(), 256).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedder (dev-style): pass `guidance` [B]")
            vec = vec + self.guidance_in(timestep_embedding(guidance.float(), 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def compile_repeated_blocks(self, **compile_kwargs) -> None:
        """torch.compile each block (all blocks of a kind share one graph).

        Regional compilation, as diffusers' method of the same name: compile time grows with the number of
        block kinds (two), not with depth. The first forward afterwards pays the compile time.
        """
        for block in (*self.double_blocks, *self.single_blocks):
            block.compile(**{"dynamic": False, **compile_kwargs})

    def modulations(self, vec: Tensor) -> list:
        """Every block's shift/scale/gate sets for `vec`, in call order (double blocks, single blocks, final)."""
        out = [(b.img_mod(vec), b.txt_mod(vec)) for b in self.double_blocks]
        return out + [b.modulation(vec) for b in self.single_blocks] + [self.final_layer.modulation(vec)]

    def step_conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, cache: StepCache | None):
        """(vec, modulations or None) for this call.

        When the cache knows every step's timestep ahead, the conditioning of all steps is computed in one
        batched pass on the first call and looked up after that: at batch 1 the modulation weights (a quarter
        of FLUX.1's parameters) are then read once per image instead of once per step.
        """
        if cache is None or not cache.timesteps or bool((timesteps != timesteps[0]).any()):
            return self.conditioning(timesteps, y, guidance), None

        def all_steps():
            ts = torch.as_tensor(cache.timesteps, dtype=timesteps.dtype, device=timesteps.device)  # as the sampler rounds
            s = len(ts)
            g = None if guidance is None else guidance.repeat(s)
            vec = self.conditioning(ts.repeat_interleave(y.shape[0]), y.repeat(s, 1), g)
            return ts, vec, self.modulations(vec)

        found = cache.conditioning(timesteps, y, guidance, all_steps)
        return found if found is not None else (self.conditioning(timesteps, y, guidance), None)

    @staticmethod
    def _checkpointed(block, *args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        cache: StepCache | None = None,
    ) -> Tensor:
        """Velocity for packed latents `img` [B, N, in_channels]; `cache` carries reuse across sampling steps."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, N, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        batch = img.shape[0]
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        if guidance is not None:
            guidance = guidance.reshape(-1).expand(batch) if guidance.numel() == 1 else guidance
        vec, mods = self.step_conditioning(timesteps, y, guidance, cache)
        mods = mods or [None] * (len(self.double_blocks) + len(self.single_blocks) + 1)
        img = self.img_in(img.to(self.compute_dtype))

        def text_and_positions():
            pe = position_table(join_ids(txt_ids, img_ids, batch), self.config.axes_dim, self.config.theta)
            return self.txt_in(txt.to(self.compute_dtype)), pe

        txt, pe = cache.text_and_positions(txt, txt_ids, img_ids, text_and_positions) if cache else text_and_positions()

        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _call
        depth = len(self.double_blocks)
        img_before, first_residual = img, None
        img, txt = run(self.double_blocks[0], img, txt, vec, pe, mods[0])
        if cache is not None:
            first_residual = img - img_before if cache.first_block_caching else None  # caching off: skip it
            cached_rest = cache.reusable_rest(first_residual)
            if cached_rest is not None:
                return self.final_layer(img + cached_rest, vec, mods[-1])
            img_before = img
        for block, mod in zip(self.double_blocks[1:], mods[1:depth]):
            img, txt = run(block, img, txt, vec, pe, mod)
        x = torch.cat([txt, img], dim=1)
        for block, mod in zip(self.single_blocks, mods[depth:-1]):
            x = run(block, x, vec, pe, mod)
        img = x[:, txt.shape[1] :]
        if first_residual is not None:
            cache.store(first_residual, img - img_before)
        return self.final_layer(img, vec, mods[-1])


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
