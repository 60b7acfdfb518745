"""Tiled / sliced VAE encode and decode: diffusers' AutoencoderKL tiling is the oracle (float32).

Measured on this machine (CPU, float32): tiled decode vs diffusers' tiled_decode on the same weights 5e-6 max abs
(the untiled decode differs by 1.3e-5, from the two networks' float order alone); tiled encode 1e-6. With the
encoder/decoder networks shared, the tiling itself (tile windows, blending, crops) is bit-identical to diffusers'
(float32, bfloat16; float16 too, checked by hand). Tiled vs untiled (tiny fixture VAE, random weights,
48x48 iid latent, 32 px tiles): mean abs 0.050, max 0.68 against mean |image| 0.43 -- the per-tile group-norm
statistics and attention, as in diffusers; with 64 px tiles 0.019 / 0.20.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fluxion
from fixtures import TINY_VAE_CONFIG, diffusers_to_original_autoencoder, randomize_parameters_
from fluxion.model.autoencoder import AutoEncoder, AutoEncoderConfig

SCALE, SHIFT = 0.3611, 0.1159

#: a 4-level (8x, as FLUX) VAE small enough for tests: 64 px / 8 latent tiles, 16 px / 2 latent overlap
DIFFUSERS_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=SCALE,
    shift_factor=SHIFT,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
OURS_CONFIG = dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=4, resolution=64)


@pytest.fixture(scope="module")
def pair():
    """(diffusers AutoencoderKL, fluxion AutoEncoder) with the same random non-zero weights, float32."""
    from diffusers import AutoencoderKL

    ref = randomize_parameters_(AutoencoderKL(**DIFFUSERS_CONFIG), seed=0).eval()
    ours = AutoEncoder(AutoEncoderConfig(**OURS_CONFIG)).eval()
    ours.load_state_dict(diffusers_to_original_autoencoder(ref.state_dict()))
    return ref, ours


@pytest.fixture
def ours(pair):
    return copy.deepcopy(pair[1])


def latents(shape=(2, 4, 20, 27), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(shape=(2, 3, 160, 216), seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_defaults_are_diffusers(pair, tiny_dev_dir):
    from diffusers import AutoencoderKL

    ref, ours = pair
    assert not ours.use_tiling and not ours.use_slicing
    names = ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    assert [getattr(ours, n) for n in names] == [getattr(ref, n) for n in names] == [64, 8, 0.25]
    # loaded from a diffusers folder: the tile side is its sample_size, as in diffusers (FLUX.1's is 1024)
    ref_folder = AutoencoderKL.from_pretrained(str(tiny_dev_dir / "vae"))
    ours_folder = fluxion.load_autoencoder(tiny_dev_dir / "vae")
    assert [getattr(ours_folder, n) for n in names] == [getattr(ref_folder, n) for n in names]
    assert ours_folder.tile_sample_min_size == TINY_VAE_CONFIG["sample_size"]


@torch.no_grad()
def test_tiled_decode_matches_diffusers(pair, ours):
    ref, _ = pair
    z = latents()  # 20 x 27 latent: 4 x 5 tiles of 8, the last ones partial
    ref.enable_tiling()
    try:
        expected = ref.decode(z / SCALE + SHIFT).sample
    finally:
        ref.disable_tiling()
    ours.enable_tiling()
    out = ours.decode(z)
    assert out.shape == (2, 3, 160, 216)
    assert max_err(out, expected) <= 2e-5  # measured 5e-6
    assert expected.abs().mean() > 0.05
    assert max_err(out, ours.disable_tiling().decode(z)) > 1e-2  # it did tile


@torch.no_grad()
def test_tiled_encode_matches_diffusers(pair, ours):
    ref, _ = pair
    x = images()  # 160 x 216 px: 4 x 5 tiles of 64
    ref.enable_tiling()
    try:
        dist = ref.encode(x).latent_dist
    finally:
        ref.disable_tiling()
    ours.enable_tiling()
    mean, logvar = ours.encode_moments(x)
    assert mean.shape == (2, 4, 20, 27)
    assert max_err(mean, dist.mean) <= 1e-5  # measured 8e-7 (log-variance 1e-6)
    assert max_err(logvar, dist.logvar) <= 1e-5
    assert max_err(ours.encode(x), SCALE * (dist.mean - SHIFT)) <= 1e-5
    assert dist.mean.abs().mean() > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float16 too, by hand (slow on CPU)
@torch.no_grad()
def test_tiling_is_bit_identical_to_diffusers(ours, dtype):
    """With the same encoder/decoder networks, tile windows, blends and crops give diffusers' exact bits."""
    from diffusers import AutoencoderKL

    ours.to(dtype).enable_tiling()
    ref = AutoencoderKL(**DIFFUSERS_CONFIG).eval()
    ref.encoder, ref.decoder = ours.encoder, ours.decoder
    ref.enable_tiling()
    for shape in [(2, 4, 20, 27), (1, 4, 9, 31)]:
        z = latents(shape).to(dtype)
        assert torch.equal(ours.tiled_decode(z), ref.decode(z).sample)
    x = images().to(dtype)
    assert torch.equal(ours._encode(x), ref._encode(x))


@torch.no_grad()
def test_one_tile_is_the_untiled_result(ours):
    for z in (latents((1, 4, 8, 8)), latents((2, 4, 8, 5)), latents((1, 4, 3, 8))):  # fits in one 8 x 8 tile
        plain = ours.decode(z)
        assert torch.equal(ours.enable_tiling().decode(z), plain)
        ours.disable_tiling()
    x = images((1, 3, 64, 48))
    plain = ours.encode_moments(x)
    tiled = ours.enable_tiling().encode_moments(x)
    assert all(torch.equal(a, b) for a, b in zip(plain, tiled))


class _Upsample(nn.Module):  # a decoder without context: every output pixel depends on one latent pixel
    def forward(self, z):
        return F.interpolate(z[:, :3] * 2 - 1, scale_factor=8, mode="nearest")


class _Pool(nn.Module):  # an encoder without context: every latent pixel depends on its own 8 x 8 block
    def forward(self, x):
        return F.avg_pool2d(x, 8).repeat(1, 3, 1, 1)[:, :8]


@pytest.mark.parametrize("hw", [(20, 27), (9, 9), (8, 30), (31, 5), (17, 16)])
@torch.no_grad()
def test_tiles_cover_the_output_exactly(ours, hw):
    """With context-free networks, blending equal values must give the untiled output: the geometry is right."""
    ours.decoder, ours.encoder = _Upsample(), _Pool()
    z = latents((1, 4, *hw))
    x = images((1, 3, 8 * hw[0], 8 * hw[1]))
    plain_dec, plain_enc = ours.decoder(z), ours.encoder(x)
    ours.enable_tiling()
    assert max_err(ours.tiled_decode(z), plain_dec) <= 1e-6
    assert max_err(ours.tiled_encode(x), plain_enc) <= 1e-6


@torch.no_grad()
def test_memory_is_bounded_by_the_tile(ours):
    """Every network call sees at most one tile, however large the input (4 x 5 = 20 calls here)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
             for m in (ours.encoder, ours.decoder)]
    ours.enable_tiling()
    ours.decode(latents())
    assert len(seen) == 20 and max(max(s) for s in seen) == 8
    seen.clear()
    ours.encode(images())
    assert len(seen) == 20 and max(max(s) for s in seen) == 64
    for h in hooks:
        h.remove()


@torch.no_grad()
def test_tiled_close_to_untiled(tiny_dev_dir):
    """Per-tile group-norm statistics make a tiled image differ from the untiled one; larger tiles, less."""
    ae = fluxion.load_autoencoder(tiny_dev_dir / "vae")
    z = latents((1, 4, 48, 48), seed=3)
    plain = ae.decode(z)
    errors = []
    for tile in (32, 64):  # pixels; 2x down-sampling, so 16 / 32 latent pixels
        out = ae.enable_tiling(tile_sample_min_size=tile).decode(z)
        errors.append(((out - plain).abs().mean().item(), max_err(out, plain)))
    (mean32, max32), (mean64, max64) = errors
    scale = plain.abs().mean().item()
    assert mean32 <= 0.25 * scale and max32 <= 1.0  # measured 0.050 / 0.68 (scale 0.43)
    assert mean64 < mean32 and max64 < max32  # measured 0.019 / 0.20
    assert ae.enable_tiling(tile_sample_min_size=96).tile_latent_min_size == 48
    assert torch.equal(ae.decode(z), plain)  # one tile: untiled


@torch.no_grad()
def test_slicing(ours):
    z, x = latents((3, 4, 10, 12)), images((3, 3, 80, 96))
    dec, enc = ours.decode(z), ours.encode(x)
    ours.enable_slicing()  # the same computation at batch 1: only the conv kernels' float order differs
    assert max_err(ours.decode(z), dec) <= 1e-5 and max_err(ours.encode(x), enc) <= 1e-5  # measured 3e-6
    ours.enable_tiling()  # both: each image on its own, tiled
    tiled = ours.decode(z)
    assert max_err(tiled, ours.disable_slicing().decode(z)) <= 1e-5


def test_tiled_encode_has_gradients(ours):
    x = images((1, 3, 80, 72)).requires_grad_()
    ours.enable_tiling().encode(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().mean() > 0


def test_bad_tile_geometry(ours):
    with pytest.raises(ValueError, match="line up"):
        ours.enable_tiling(tile_sample_min_size=60)  # 7.5 latent pixels
    with pytest.raises(ValueError, match="line up"):
        ours.enable_tiling(tile_sample_min_size=64, tile_overlap_factor=0.3)  # 2.4-pixel latent overlap
    with pytest.raises(ValueError, match="tile_overlap_factor"):
        ours.enable_tiling(tile_overlap_factor=1.0)
    assert not ours.use_tiling
    ours.enable_tiling(tile_sample_min_size=128, tile_overlap_factor=0.25)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.use_tiling) == (128, 16, True)


@torch.no_grad()
def test_pipeline_switches(tiny_dev_dir):
    from fluxion.flow import pack

    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    z = latents((1, 4, 24, 40), seed=5)  # 48 x 80 px > the tiny VAE's 32 px tile
    plain = pipe.decode(pack(z), 48, 80, output_type="pt")
    assert pipe.enable_vae_tiling() is pipe and pipe.vae.use_tiling
    tiled = pipe.decode(pack(z), 48, 80, output_type="pt")
    assert torch.equal(tiled, (pipe.vae.tiled_decode(z / SCALE + SHIFT) / 2 + 0.5).clamp(0, 1))
    assert not torch.equal(tiled, plain)
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_tiling and torch.equal(pipe.decode(pack(z), 48, 80, output_type="pt"), plain)
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing
    pipe.enable_vae_tiling(tile_sample_min_size=48)
    assert (pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size) == (48, 24)
