"""fluxion.FluxPipeline == diffusers' FluxPipeline, image for image (output_type="np", float32, 1e-4).

Both pipelines load the same tiny random folder (tests/fixtures.py); diffusers is the oracle only.
The tiny VAE has two levels, so its scale factor is 2 and sizes must be multiples of 4 (not 16).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion
from fixtures import TINY_VAE_CONFIG
from oracle import SEQ, assert_same_images, run

VAE_SCALE = 2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1)
LATENT_CH = TINY_VAE_CONFIG["latent_channels"]
PROMPTS = ["a photo of a red cat on a table", "a painting of a fluffy dragon at sunset"]
NEGATIVE = ["blurry", "a photo of a dog"]


def _load(folder):
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    ref = DiffusersFluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    assert ref.vae_scale_factor == VAE_SCALE
    ours = fluxion.FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture(scope="module")
def dev_pipes(tiny_dev_dir):
    return _load(tiny_dev_dir)


@pytest.fixture(scope="module")
def schnell_pipes(tiny_schnell_dir):
    return _load(tiny_schnell_dir)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def pipes(request, dev_pipes, schnell_pipes):
    return dev_pipes if request.param == "dev" else schnell_pipes


def packed_latents(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT_CH, h // VAE_SCALE, w // VAE_SCALE, generator=g)
    return fluxion.flow.pack(z)


# ---------------------------------------------------------------- parity


def test_vae_scale_factor(pipes):
    ref, ours = pipes
    assert ours.vae_scale_factor == ref.vae_scale_factor == VAE_SCALE


def test_explicit_latents(pipes):
    latents = packed_latents(1, 32, 48, seed=11)
    out = assert_same_images(pipes, prompt=PROMPTS[0], height=32, width=48, latents=latents)
    assert out.shape == (1, 32, 48, 3)


def test_generator_draws_noise_as_diffusers(pipes):
    """No latents: the noise must be drawn exactly as diffusers draws it (unpacked, then packed)."""
    out = assert_same_images(pipes, seed=5, prompt=PROMPTS[1], height=48, width=32)
    assert out.shape == (1, 48, 32, 3)


def test_batch_of_two_prompts(pipes):
    out = assert_same_images(pipes, seed=6, prompt=PROMPTS, height=32, width=32)
    assert out.shape == (2, 32, 32, 3)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_num_images_per_prompt(pipes):
    out = assert_same_images(pipes, seed=7, prompt=PROMPTS[0], height=32, width=48, num_images_per_prompt=2)
    assert out.shape == (2, 32, 48, 3)
    assert np.abs(out[0] - out[1]).max() > 1e-3  # different noise per image


def test_generator_list(dev_pipes):
    assert_same_images(dev_pipes, seed=[3, 4], prompt=PROMPTS, height=32, width=32)


def test_true_cfg(pipes):
    ref, ours = pipes
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, true_cfg_scale=2.5, height=32, width=32)
    with_cfg = assert_same_images(pipes, seed=8, **kwargs)
    without = run(ours, 8, prompt=PROMPTS, height=32, width=32)
    assert np.abs(with_cfg - without).max() > 1e-3  # the negative branch did something


def test_true_cfg_single_prompt_two_images(dev_pipes):
    assert_same_images(
        dev_pipes, seed=9, prompt=PROMPTS[0], negative_prompt=NEGATIVE[1], true_cfg_scale=3.0,
        num_images_per_prompt=2, height=32, width=32,
    )


def test_custom_sigmas(pipes):
    assert_same_images(pipes, seed=10, prompt=PROMPTS[0], height=32, width=32, sigmas=[1.0, 0.8, 0.45, 0.2],
                       num_inference_steps=None)


def test_guidance_scale_and_prompt_2(dev_pipes):
    assert_same_images(dev_pipes, seed=12, prompt=PROMPTS[0], prompt_2=PROMPTS[1], guidance_scale=5.0,
                       height=32, width=32)


def test_default_sequence_length_dev(dev_pipes):
    """dev's default max_sequence_length is 512 in both."""
    assert_same_images(dev_pipes, seed=13, prompt=PROMPTS[0], height=16, width=16, num_inference_steps=2,
                       max_sequence_length=None)


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_tensor_output_types_match(pipes, output_type):
    out = assert_same_images(pipes, seed=14, prompt=PROMPTS[0], height=32, width=48, output_type=output_type,
                             num_inference_steps=2)
    if output_type == "pt":
        assert out.shape == (1, 3, 32, 48)
    else:  # packed latents
        assert out.shape == (1, (32 // VAE_SCALE // 2) * (48 // VAE_SCALE // 2), LATENT_CH * 4)


# ---------------------------------------------------------------- output types, determinism


def test_output_types_agree(dev_pipes):
    _, ours = dev_pipes
    kw = dict(prompt=PROMPTS, height=32, width=48, num_inference_steps=2)
    arr = run(ours, 1, output_type="np", **kw)
    pt = run(ours, 1, output_type="pt", **kw)
    lat = run(ours, 1, output_type="latent", **kw)
    pil = run(ours, 1, output_type="pil", **kw)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 48, 3) and arr.dtype == np.float32
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 32, 48)
    assert isinstance(lat, torch.Tensor) and lat.shape == (2, 8 * 12, LATENT_CH * 4)
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, Image.Image) and im.size == (48, 32) and im.mode == "RGB" for im in pil)
    assert 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))
    # decoding the latents gives the same images
    with torch.no_grad():  # FluxPipeline.decode is not no_grad itself (the weights require grad)
        np.testing.assert_allclose(ours.decode(lat, 32, 48, "np"), arr, atol=1e-6)


def test_same_seed_same_image_different_seed_different(pipes):
    _, ours = pipes
    kw = dict(prompt=PROMPTS[0], height=32, width=32, num_inference_steps=2)
    a = run(ours, 21, **kw)
    b = run(ours, 21, **kw)
    c = run(ours, 22, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_return_dict_false_and_parameters(dev_pipes):
    _, ours = dev_pipes
    g = torch.Generator().manual_seed(0)
    (images,) = ours(PROMPTS[0], height=16, width=16, num_inference_steps=1, generator=g, output_type="np",
                     max_sequence_length=SEQ, return_dict=False)
    assert images.shape == (1, 16, 16, 3)
    out = ours(PROMPTS, height=16, width=16, num_inference_steps=1, generator=g, output_type="np",
               max_sequence_length=SEQ, num_images_per_prompt=2)
    assert [p["prompt"] for p in out.parameters] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert out.parameters[0]["num_inference_steps"] == 1 and out.parameters[0]["guidance_scale"] == 3.5
