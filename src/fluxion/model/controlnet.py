"""FLUX ControlNets (XLabs, InstantX, Union), as diffusers' `FluxControlNetModel` / `FluxMultiControlNetModel`.

A ControlNet is a truncated copy of the transformer (its own embedders, N double and M single blocks, built from
the transformer's own block classes) whose image stream after each block goes through a zero-initialised Linear;
the outputs, times `scale`, are the per-block residuals the transformer adds (`BlockResiduals`).

- InstantX-style: the control image is VAE-encoded and packed like the latents; `controlnet_x_embedder(cond)` is
  added to `img_in(latents)`. Residuals use the interval rule (block i gets `samples[i // ceil(depth / n)]`).
- XLabs-style (`conditioning_embedding_channels` set): the raw control image in [-1, 1] goes through a conv hint
  block (÷8), is packed `patch_size` x `patch_size` and then through `controlnet_x_embedder` (XLabs' name:
  `pos_embed_input`). Double-block residuals repeat (block i gets `samples[i % n]`).
- Union (`num_mode` set): `controlnet_mode_embedder(mode)` is one token prepended to the projected text inside the
  ControlNet (its text ids gain a zero row); it never reaches the transformer.

Parameter names follow the original layout of the blocks (`img_in`, `double_blocks.i.img_attn.qkv`, ...), as the
transformer's, plus diffusers' names for the ControlNet parts (`controlnet_blocks.i`, `controlnet_x_embedder`,
`controlnet_mode_embedder`); the hint block is an `nn.Sequential` whose convs sit at XLabs' indices 0, 2, ..., 14.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..compute import compute_dtype_of
from .layers import DoubleStreamBlock, MLPEmbedder, SingleStreamBlock, position_table
from .transformer import BlockResiduals, check_heads, join_ids, modulation_vector, per_item


@dataclass
class FluxControlNetConfig:
    in_channels: int = 64
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
    guidance_embed: bool = False
    num_mode: int | None = None  # Union: number of control modes
    conditioning_embedding_channels: int | None = None  # XLabs: the hint block's output channels
    patch_size: int = 1  # XLabs: the hint block's output is packed patch_size x patch_size into one token

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        check_heads(self.hidden_size, self.num_heads, self.axes_dim)
        c = self.conditioning_embedding_channels
        if c is not None and c * self.patch_size**2 != self.in_channels:
            raise ValueError(f"the hint block gives {c} channels x patch {self.patch_size}^2 = "
                             f"{c * self.patch_size ** 2} features per token, but in_channels is {self.in_channels}")

    @property
    def has_hint_block(self) -> bool:
        return self.conditioning_embedding_channels is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


def hint_block(out_channels: int, channels: int = 16, in_channels: int = 3) -> nn.Sequential:
    """XLabs' conv stack (diffusers' ControlNetConditioningEmbedding, block_out_channels (16, 16, 16, 16)):
    conv_in, SiLU, 3 x [conv, SiLU, stride-2 conv, SiLU], conv_out (no SiLU after it); convs at 0, 2, ..., 14."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.SiLU()]
    for _ in range(3):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class FluxControlNetModel(nn.Module):
    def __init__(self, config: FluxControlNetConfig):
        super().__init__()
        self.config = c = config
        h = c.hidden_size
        self.img_in = nn.Linear(c.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(c.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(h, h) for _ in range(c.depth))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(h, h) for _ in range(c.depth_single_blocks))
        self.controlnet_x_embedder = nn.Linear(c.in_channels, h)
        if c.num_mode is not None:
            self.controlnet_mode_embedder = nn.Embedding(c.num_mode, h)
        if c.has_hint_block:
            self.input_hint_block = hint_block(c.conditioning_embedding_channels)
        self.zero_init_()

    @classmethod
    def from_pretrained(cls, path, torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                        **_) -> "FluxControlNetModel":
        """A diffusers ControlNet folder (config.json + .safetensors), as diffusers' `from_pretrained` (local only);
        float32 unless a dtype is given."""
        from ..checkpoints.controlnet import load_controlnet

        return load_controlnet(path, dtype or torch_dtype or torch.float32)

    @classmethod
    def from_single_file(cls, path, torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                         **_) -> "FluxControlNetModel":
        """One .safetensors file: XLabs' original layout or a diffusers-layout file (InstantX), config inferred
        from the tensors."""
        from ..checkpoints.controlnet import load_controlnet

        return load_controlnet(path, dtype or torch_dtype or torch.float32)

    @torch.no_grad()
    def zero_init_(self) -> "FluxControlNetModel":
        """Zero the output projections (and `controlnet_x_embedder` without a hint block; the hint block's last
        conv with one), as a fresh ControlNet starts: it then adds nothing to the transformer."""
        if self.img_in.weight.is_meta:
            return self
        zero = [*self.controlnet_blocks, *self.controlnet_single_blocks]
        zero.append(self.input_hint_block[-1] if self.config.has_hint_block else self.controlnet_x_embedder)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_of(self, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    @property
    def union(self) -> bool:
        return self.config.num_mode is not None

    def embed_control(self, cond: Tensor) -> Tensor:
        """The control input as tokens [B, N, in_channels]: packed VAE latents as given (InstantX), or raw pixels
        [B, 3, H, W] in [-1, 1] through the hint block, packed patch x patch in (c, ph, pw) order (XLabs)."""
        if not self.config.has_hint_block:
            return cond
        x = self.input_hint_block(cond.to(self.compute_dtype))
        b, ch, hp, wp = x.shape
        p = self.config.patch_size
        x = x.reshape(b, ch, hp // p, p, wp // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hp // p) * (wp // p), ch * p * p)

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
        cond: Tensor,
        mode: Tensor | int | None = None,
        scale: float = 1.0,
    ) -> BlockResiduals:
        """The scaled residuals for the transformer: `img` packed latents [B, N, in_channels], `cond` the control
        input (see `embed_control`), `mode` the Union mode (an int or one per item), the rest as the transformer's
        forward (`guidance` only for a net with a guidance embedder)."""
        c, dtype = self.config, self.compute_dtype
        batch = img.shape[0]
        tokens = self.embed_control(cond.to(self.device))
        if tokens.shape[:2] != img.shape[:2]:
            raise ValueError(f"the control input gives {tokens.shape[1]} tokens for {img.shape[1]} latent tokens")
        x = self.img_in(img.to(dtype)) + self.controlnet_x_embedder(tokens.to(dtype))
        vec = modulation_vector(self, per_item(timesteps, batch), y, per_item(guidance, batch))
        txt = self.txt_in(txt.to(dtype))
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if self.union:
            if mode is None:
                raise ValueError("a Union ControlNet needs control_mode")
            modes = torch.as_tensor(mode, dtype=torch.long, device=self.device).reshape(-1).expand(batch)
            if bool(((modes < 0) | (modes >= c.num_mode)).any()):
                raise ValueError(f"control_mode {modes.tolist()} is out of range for a Union ControlNet with "
                                 f"{c.num_mode} modes (0..{c.num_mode - 1})")
            txt = torch.cat([self.controlnet_mode_embedder(modes)[:, None].to(dtype), txt], dim=1)
            txt_ids = torch.cat([txt_ids[:1], txt_ids], dim=0)
        pe = position_table(join_ids(txt_ids, img_ids, batch), c.axes_dim, c.theta)
        double = []
        for block, proj in zip(self.double_blocks, self.controlnet_blocks):
            x, txt = block(x, txt, vec, pe)
            double.append(proj(x) * scale)
        single = []
        n_txt = txt.shape[1]
        joint = torch.cat([txt, x], dim=1)
        for block, proj in zip(self.single_blocks, self.controlnet_single_blocks):
            joint = block(joint, vec, pe)
            single.append(proj(joint[:, n_txt:]) * scale)
        return BlockResiduals(double, single, repeat=c.has_hint_block)


def per_block(r: BlockResiduals, depth: int, depth_single: int) -> BlockResiduals:
    """The same residuals as one tensor per transformer block (so nets of different kinds can be summed)."""
    double = [r.sample(r.double, i, depth, r.repeat) for i in range(depth)] if r.double else []
    single = [r.sample(r.single, i, depth_single, False) for i in range(depth_single)] if r.single else []
    return BlockResiduals(double, single, repeat=False)


def combine(parts: list[BlockResiduals], depth: int, depth_single: int) -> BlockResiduals:
    """Sum several nets' residuals. Nets of one kind and size sum sample by sample (as diffusers does); otherwise
    each is first spread to one tensor per block, so an InstantX net and an XLabs net (or nets of different
    depths) combine exactly instead of truncating to the shortest list."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if all(p.repeat == first.repeat and len(p.double) == len(first.double) and len(p.single) == len(first.single)
           for p in parts):
        spread = parts
    else:
        spread = [per_block(p, depth, depth_single) for p in parts]
    out = spread[0]
    for p in spread[1:]:
        out = BlockResiduals(_sum(out.double, p.double), _sum(out.single, p.single), out.repeat)
    return out


def _sum(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    if not a or not b:
        return a or b
    return [x + y for x, y in zip(a, b, strict=True)]


class FluxMultiControlNetModel(nn.Module):
    """Several ControlNets whose residuals are summed; one net given several control images (a Union net with
    several modes) runs once per image."""

    def __init__(self, controlnets: list[FluxControlNetModel]):
        super().__init__()
        if not controlnets:
            raise ValueError("FluxMultiControlNetModel needs at least one ControlNet")
        self.nets = nn.ModuleList(controlnets)

    @property
    def config(self):
        return self.nets[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.nets[0].device

    def net_for(self, i: int) -> FluxControlNetModel:
        return self.nets[0] if len(self.nets) == 1 else self.nets[i]

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, *, conds: list[Tensor],
                modes: list, scales: list[float], depth: int, depth_single: int) -> BlockResiduals:
        """Each net (or the one net, per control input) with its input, mode and scale; the residuals summed
        (`combine`) for a transformer of `depth` double and `depth_single` single blocks. Each net gets
        `guidance` only if it has a guidance embedder."""
        parts = []
        for i, (cond, mode, scale) in enumerate(zip(conds, modes, scales, strict=True)):
            net = self.net_for(i)
            g = guidance if net.config.guidance_embed else None
            parts.append(net(img, img_ids, txt, txt_ids, timesteps, y, g, cond=cond, mode=mode, scale=scale))
        return combine(parts, depth, depth_single)

