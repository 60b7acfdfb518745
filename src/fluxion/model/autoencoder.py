"""The FLUX autoencoder (16 latent channels, 8x down-sampling), original key layout.

`encode` returns the scaled latent `scale * (z - shift)` the transformer works in; `decode` takes it back.

Tiling (`enable_tiling`, as diffusers' AutoencoderKL): an input larger than one tile is cut into overlapping
tiles that go through the encoder/decoder one at a time and are blended linearly where they overlap, so peak
memory follows the tile size, not the image size. The tile geometry and the blend are diffusers' (tile side
`tile_sample_min_size` = the config's sample size, `tile_latent_min_size` = that / 8, overlap factor 0.25 --
1024 px / 128 latent tiles for FLUX.1's vae/config.json; each tile's top and left overlap fade in linearly from
the already blended tile above and to the left, in raster order), so for the same weights the tiled outputs
match diffusers' `tiled_decode` / `_tiled_encode`. Each tile is processed on its own: the group norms and the
mid-block attention see only that tile's statistics, so a tiled result differs slightly from the untiled one
(as in diffusers); an input that fits in one tile takes the untiled path and is unchanged. `enable_slicing`
runs a batch one image at a time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compute import compute_dtype_of


@dataclass
class AutoEncoderConfig:
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = field(default=(1, 2, 4, 4))
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"channel count {self.ch * m} is not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (proj(hn).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(attn)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def in_layout(channels_last: bool | None, x: Tensor, forward) -> Tensor:
    """`forward(x)` with activations channels-last when asked, or when None on a CPU; the result channels-first.

    oneDNN's CPU convolutions work channels-last, so a channels-first input is reordered around every one of them;
    for a small autoencoder's few-channel convolutions that costs as much as the arithmetic (bench/decoder_layout.py,
    both CPU kinds). Weights keep their layout: the state dict is unchanged."""
    last = channels_last if channels_last is not None else x.device.type == "cpu"
    if last:
        return forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
    return forward(x)


class Encoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_mult = (1,) + c.ch_mult
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            level = nn.Module()
            block_in, block_out = c.ch * in_mult[i], c.ch * mult
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(c.num_res_blocks)
            )
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
        top = c.ch * c.ch_mult[-1]
        self.mid = MidBlock(top, g)
        self.norm_out = group_norm(top, g)
        self.conv_out = nn.Conv2d(top, 2 * c.z_channels, 3, padding=1)
        # Activation layout (`in_layout`): channels-first unless set. Channels-last is 1.1-1.7x faster here too
        # (bench/decoder_layout.py), but the encoder's rounding differences (~2e-5) are carried through every
        # sampling step after it: with the trained mini ControlNet the image moved 3e-4 from diffusers' (the parity
        # tests hold 1e-4), while the decoder's stay in the last step.
        self.channels_last: bool | None = False

    def forward(self, x: Tensor) -> Tensor:
        return in_layout(self.channels_last, x, self._forward)

    def _forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        g = c.norm_groups
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        up = []
        for i in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            block_out = c.ch * c.ch_mult[i]
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(c.num_res_blocks + 1)
            )
            block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_out)
            up.insert(0, level)  # stored by level index, as the reference (up.0 is the last applied)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)
        self.channels_last: bool | None = None  # activation layout; None: channels-last on a CPU (`in_layout`)

    def forward(self, z: Tensor) -> Tensor:
        return in_layout(self.channels_last, z, self._forward)

    def _forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # tiling / slicing state, with diffusers' AutoencoderKL attribute names and defaults
        self.use_tiling = False
        self.use_slicing = False
        self.tile_sample_min_size = config.resolution
        self.tile_latent_min_size = int(config.resolution / config.downsample_factor)
        self.tile_overlap_factor = 0.25

    # ------------------------------------------------------------ tiling / slicing switches

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None):
        """Encode/decode inputs larger than one tile tile by tile (see the module docstring).

        With no arguments the tiles are diffusers' for this config: `config.resolution` (diffusers' sample_size:
        1024 for FLUX.1's vae/config.json) pixels, i.e. that / 8 latent pixels, overlapping by 25%.
        `tile_sample_min_size` sets the tile side in pixels (the latent side follows); `tile_overlap_factor`
        the overlap. The attributes can also be set directly, as with diffusers. A VAE loaded from an original
        ae.safetensors has resolution 256 (BFL's ae_params) unless the file says otherwise: pass
        tile_sample_min_size=1024 to tile as diffusers' FLUX pipelines do.
        """
        if tile_sample_min_size is not None:
            self.tile_sample_min_size = int(tile_sample_min_size)
            self.tile_latent_min_size = int(self.tile_sample_min_size / self.downsample_factor)
        if tile_overlap_factor is not None:
            self.tile_overlap_factor = float(tile_overlap_factor)
        self._tile_geometry()  # fail now, not at the first large image
        self.use_tiling = True
        return self

    def disable_tiling(self):
        self.use_tiling = False
        return self

    def enable_slicing(self):
        """Encode/decode a batch one image at a time (less memory, same result)."""
        self.use_slicing = True
        return self

    def disable_slicing(self):
        self.use_slicing = False
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in (see `FluxTransformer.compute_dtype`)."""
        return compute_dtype_of(self, self.dtype)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled posterior mean and log-variance (clamped as the reference does)."""
        x = x.to(self.compute_dtype)
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode(xs) for xs in x.split(1)])
        else:
            h = self._encode(x)
        mean, logvar = h.chunk(2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               noise: Tensor | None = None) -> Tensor:
        """Image in [-1, 1] [B, 3, H, W] -> scaled latent [B, z, H/f, W/f]; `sample` draws from the posterior (with
        `noise` when given: a trainer draws it ahead, for the whole batch)."""
        mean, logvar = self.encode_moments(x)
        z = mean
        if noise is not None:
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        elif sample:
            # drawn where the generator lives, then moved (as diffusers' randn_tensor): a CPU generator with the
            # model on an accelerator gives the same sample as on the CPU
            where = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image (nominally in [-1, 1]; not clamped, so the caller chooses)."""
        z = z.to(self.compute_dtype) / self.config.scale_factor + self.config.shift_factor
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(zs) for zs in z.split(1)])
        return self._decode(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------ tiled encode / decode

    def _encode(self, x: Tensor) -> Tensor:
        """Image -> encoder output (mean and log-variance stacked), tiled when enabled and x exceeds one tile."""
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self.tiled_encode(x)
        return self.encoder(x)

    def _decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image, tiled when enabled and z exceeds one tile."""
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return self.tiled_decode(z)
        return self.decoder(z)

    def _tile_geometry(self) -> tuple[int, int, int, int]:
        """(latent tile stride, pixel tile stride, latent blend width, pixel blend width), as diffusers computes them.

        The tiles of one side must line up with the other's: the pixel stride is f x the latent stride, and the
        kept part of a tile (its side minus the blend) is one stride, or the pieces would not tile the output.
        """
        f, s, lat = self.downsample_factor, self.tile_sample_min_size, self.tile_latent_min_size
        o = self.tile_overlap_factor
        if not 0 <= o < 1:
            raise ValueError(f"tile_overlap_factor must be in [0, 1), got {o}")
        lat_stride, px_stride = int(lat * (1 - o)), int(s * (1 - o))
        lat_blend, px_blend = int(lat * o), int(s * o)
        if lat < 1 or lat_stride < 1 or s != lat * f or px_stride != lat_stride * f \
                or lat - lat_blend != lat_stride or s - px_blend != px_stride:
            raise ValueError(
                f"VAE tiles do not line up: tile_sample_min_size={s}, tile_latent_min_size={lat} (must be "
                f"{s}/{f}), tile_overlap_factor={o}; choose a tile side whose overlap is a whole number of latent "
                f"pixels, e.g. a multiple of {f * 4} with overlap 0.25"
            )
        return lat_stride, px_stride, lat_blend, px_blend

    def tiled_encode(self, x: Tensor) -> Tensor:
        """Encoder output of an image, computed over tile_sample_min_size tiles (see the module docstring)."""
        _, px_stride, lat_blend, _ = self._tile_geometry()
        keep = self.tile_latent_min_size - lat_blend
        return _tiled(self.encoder, x, self.tile_sample_min_size, px_stride, lat_blend, keep)

    def tiled_decode(self, z: Tensor) -> Tensor:
        """Image from an unscaled latent, decoded over tile_latent_min_size tiles (see the module docstring)."""
        lat_stride, _, _, px_blend = self._tile_geometry()
        keep = self.tile_sample_min_size - px_blend
        return _tiled(self.decoder, z, self.tile_latent_min_size, lat_stride, px_blend, keep)


def _tiled(fn, x: Tensor, tile: int, stride: int, blend: int, keep: int) -> Tensor:
    """fn over tile x tile windows of x taken every `stride`; outputs blended over `blend` and cropped to `keep`.

    diffusers' scheme, one row of tiles held at a time: each output tile's top edge is blended with the bottom
    edge of the (already blended) tile above it, then its left edge with the right edge of the (already blended)
    tile to its left; its top-left keep x keep part goes into the result.
    """
    above: list[Tensor] = []
    rows = []
    for i in range(0, x.shape[2], stride):
        row: list[Tensor] = []
        for j in range(0, x.shape[3], stride):
            t = fn(x[:, :, i : i + tile, j : j + tile])
            if above:
                t = _blend(above[len(row)], t, blend, dim=2)
            if row:
                t = _blend(row[-1], t, blend, dim=3)
            row.append(t)
        rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """b with its first `extent` lines along dim faded in from a's last ones: a*(1 - k/extent) + b*(k/extent).

    The same float operations as diffusers' per-line blend_v/blend_h (weights rounded to float32, each product
    rounded to the tensor dtype, then added), so the result is bit-identical to theirs.
    """
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    r = [k / extent for k in range(extent)]
    wdtype = torch.float64 if b.dtype == torch.float64 else torch.float32  # the float a Python scalar becomes
    w_a = torch.tensor([1 - v for v in r], dtype=wdtype, device=b.device).reshape(shape)
    w_b = torch.tensor(r, dtype=wdtype, device=b.device).reshape(shape)
    a_tail, b_head = a.narrow(dim, a.shape[dim] - extent, extent), b.narrow(dim, 0, extent)
    head = (a_tail * w_a).to(b.dtype) + (b_head * w_b).to(b.dtype)
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)
