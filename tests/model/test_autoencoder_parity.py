"""fluxion's AutoEncoder == diffusers' AutoencoderKL (float32, 1e-4), from the vae/ folder and from ae.safetensors."""
from __future__ import annotations

import pytest
import torch

import fluxion
from fixtures import TINY_VAE_CONFIG

ATOL = 1e-4
SCALE, SHIFT = TINY_VAE_CONFIG["scaling_factor"], TINY_VAE_CONFIG["shift_factor"]
Z = TINY_VAE_CONFIG["latent_channels"]


@pytest.fixture(scope="module")
def reference_vae(tiny_dev_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(tiny_dev_dir / "vae"), torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["diffusers_folder", "pipeline_root", "original_file"])
def ours(request, tiny_dev_dir, tiny_dev_original_files):
    if request.param == "diffusers_folder":
        return fluxion.load_autoencoder(tiny_dev_dir / "vae")
    if request.param == "pipeline_root":
        return fluxion.load_autoencoder(tiny_dev_dir, torch_dtype=torch.float32)
    _, ae_file = tiny_dev_original_files
    # GroupNorm's group count is not in any tensor shape: the tiny VAE uses 8, not FLUX's 32
    return fluxion.load_autoencoder(
        ae_file, norm_groups=TINY_VAE_CONFIG["norm_num_groups"], scale_factor=SCALE, shift_factor=SHIFT
    )


def images(batch=2, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"


def test_config(ours):
    c = ours.config
    assert c.z_channels == Z and c.norm_groups == 8 and c.ch_mult == (1, 2) and c.num_res_blocks == 1
    assert ours.downsample_factor == 2
    assert (c.scale_factor, c.shift_factor) == (SCALE, SHIFT)
    assert ours.dtype == torch.float32


@torch.no_grad()
def test_encode_mean_matches(ours, reference_vae):
    x = images(seed=1)
    dist = reference_vae.encode(x).latent_dist
    mean, logvar = ours.encode_moments(x)
    assert_close(mean, dist.mean)
    assert_close(logvar, dist.logvar)
    z = ours.encode(x)
    assert z.shape == (2, Z, 8, 12)
    assert_close(z, SCALE * (dist.mean - SHIFT))
    assert z.abs().mean() > 0.05


@torch.no_grad()
def test_decode_matches(ours, reference_vae):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, Z, 6, 10, generator=g)
    expected = reference_vae.decode(z / SCALE + SHIFT).sample
    out = ours.decode(z)
    assert out.shape == (2, 3, 12, 20)
    assert_close(out, expected)
    assert expected.abs().mean() > 0.05


@torch.no_grad()
def test_round_trip_matches(ours, reference_vae):
    x = images(batch=1, h=32, w=16, seed=3)
    expected = reference_vae.decode(reference_vae.encode(x).latent_dist.mean).sample
    assert_close(ours(x), expected)


@torch.no_grad()
def test_encode_sample(ours):
    x = images(seed=4)
    mean = ours.encode(x)
    a = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    b = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    c = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.isfinite(a).all()
    assert a.shape == mean.shape
    assert not torch.allclose(a, mean)
    assert torch.equal(a, b)  # seeded
    assert not torch.allclose(a, c)
    # the sample is mean + scale * std * noise: its deviation from the mean is bounded by the posterior std
    _, logvar = ours.encode_moments(x)
    noise = (a - mean) / (SCALE * torch.exp(0.5 * logvar))
    assert noise.abs().max() < 6 and 0.5 < noise.std() < 1.5


def test_dtype_argument(tiny_dev_dir):
    ae = fluxion.load_autoencoder(tiny_dev_dir / "vae", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ae.parameters())


def test_wrong_norm_groups_is_caught(tiny_dev_original_files):
    _, ae_file = tiny_dev_original_files
    with pytest.raises(ValueError, match="norm_groups"):
        fluxion.load_autoencoder(ae_file, norm_groups=32)  # 16 channels do not split into 32 groups
