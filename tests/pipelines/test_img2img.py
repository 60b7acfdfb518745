"""fluxion.FluxImg2ImgPipeline == diffusers' FluxImg2ImgPipeline (float32, 1e-4, seeded generators), its input
checks (a ValueError before any model runs) and its metadata. diffusers is the test-only oracle.

The tiny VAE's scale factor is 2 (sizes are multiples of 4) and its latents have 4 channels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion
from fixtures import TINY_VAE_CONFIG
from oracle import SEQ, assert_same_images, load_pair, run

PROMPTS = ["a photo of a red cat on a table", "a painting of a fluffy dragon at sunset"]
LATENT_CH = TINY_VAE_CONFIG["latent_channels"]


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dev_pipes(tiny_dev_dir):
    return load_pair("FluxImg2ImgPipeline", tiny_dev_dir)


@pytest.fixture(scope="module")
def schnell_pipes(tiny_schnell_dir):
    return load_pair("FluxImg2ImgPipeline", tiny_schnell_dir)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def pipes(request, dev_pipes, schnell_pipes):
    return dev_pipes if request.param == "dev" else schnell_pipes


# ---------------------------------------------------------------- parity


def test_two_strengths(pipes):
    """0.6 of 5 steps starts at index 2; 0.3 of 4 steps at int(2.8) = 2 (truncated, not rounded)."""
    image = picture(48, 32)
    a = assert_same_images(pipes, seed=3, prompt=PROMPTS[0], image=image, height=32, width=48, strength=0.6,
                           num_inference_steps=5)
    b = assert_same_images(pipes, seed=3, prompt=PROMPTS[0], image=image, height=32, width=48, strength=0.3,
                           num_inference_steps=4)
    assert a.shape == (1, 32, 48, 3) and np.abs(a - b).max() > 1e-3


def test_full_strength_and_other_image(pipes):
    a = assert_same_images(pipes, seed=4, prompt=PROMPTS[1], image=picture(32, 32, 1), height=32, width=32,
                           strength=1.0)
    b = run(pipes[1], 4, prompt=PROMPTS[1], image=picture(32, 32, 2), height=32, width=32, strength=1.0)
    np.testing.assert_array_equal(a, b)  # at strength 1 the image is weighted 0 ...
    text_only = run(fluxion.FluxPipeline.from_pipe(pipes[1]), 4, prompt=PROMPTS[1], height=32, width=32,
                    guidance_scale=7.0)
    assert np.abs(a - text_only).max() > 1e-3  # ... but its sample is still drawn before the noise


def test_batch_of_two_prompts(pipes):
    out = assert_same_images(pipes, seed=6, prompt=PROMPTS, image=picture(32, 32), height=32, width=32,
                             num_inference_steps=4, strength=0.8)
    assert out.shape == (2, 32, 32, 3) and np.abs(out[0] - out[1]).max() > 1e-3


def test_generator_list(dev_pipes):
    """One image: only generator[0] draws its sample; each image's noise comes from its own generator."""
    assert_same_images(dev_pipes, seed=[3, 4], prompt=PROMPTS, image=picture(32, 32), height=32, width=32,
                       num_inference_steps=4)


def test_two_images_tiled_over_four_outputs(dev_pipes):
    """diffusers tiles images over the batch ([a, b, a, b]) while prompts repeat per image ([p0, p0, p1, p1])."""
    images = [np.asarray(picture(40, 36, s), dtype=np.float32) / 255 for s in (1, 2)]  # resized (nearest)
    out = assert_same_images(dev_pipes, seed=[1, 2, 3, 4], prompt=PROMPTS, image=images, num_images_per_prompt=2,
                             height=32, width=32, num_inference_steps=4)
    assert out.shape == (4, 32, 32, 3)


def test_defaults_are_diffusers(dev_pipes):
    ref, ours = dev_pipes
    assert (ours.defaults.guidance_scale, ours.defaults.strength, ours.defaults.num_inference_steps) == (7.0, 0.6, 28)
    assert_same_images(dev_pipes, seed=8, prompt=PROMPTS[0], image=picture(32, 32), height=32, width=32,
                       num_inference_steps=5)  # default strength 0.6 and guidance 7.0 in both


@pytest.mark.parametrize("kind", ["tensor01", "tensor11", "numpy"])
def test_image_kinds(dev_pipes, kind):
    x = torch.from_numpy(np.asarray(picture(44, 28, 5), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    image = {"tensor01": x, "tensor11": x * 2 - 1, "numpy": x[0].permute(1, 2, 0).numpy()}[kind]
    assert_same_images(dev_pipes, seed=9, prompt=PROMPTS[1], image=image, height=32, width=48, num_inference_steps=3)


def test_image_as_latents(dev_pipes):
    """A tensor with the VAE's latent channels is taken as image latents (not encoded, no draw)."""
    z = torch.randn(1, LATENT_CH, 16, 16, generator=torch.Generator().manual_seed(2))
    assert_same_images(dev_pipes, seed=10, prompt=PROMPTS[0], image=z, height=32, width=32, num_inference_steps=4)


def test_explicit_packed_latents(dev_pipes):
    latents = torch.randn(2, 8 * 12, LATENT_CH * 4, generator=torch.Generator().manual_seed(11))
    assert_same_images(dev_pipes, prompt=PROMPTS, image=picture(48, 32), height=32, width=48, latents=latents,
                       num_inference_steps=4)


def test_true_cfg_sigmas_and_latent_output(dev_pipes):
    assert_same_images(dev_pipes, seed=12, prompt=PROMPTS[0], negative_prompt="blurry", true_cfg_scale=2.0,
                       image=picture(32, 32), height=32, width=32, sigmas=[1.0, 0.8, 0.5, 0.3],
                       num_inference_steps=None, strength=0.7)
    assert_same_images(dev_pipes, seed=13, prompt=PROMPTS[0], image=picture(32, 32), height=32, width=32,
                       output_type="latent", num_inference_steps=3)


def test_extras_run(dev_pipes):
    _, ours = dev_pipes
    seen = []
    out = ours(PROMPTS[0], image=picture(32, 32), height=32, width=32, num_inference_steps=5, strength=0.6,
               generator=torch.Generator().manual_seed(1), max_sequence_length=SEQ, output_type="np",
               guidance_scale=[7.0, 5.0, 3.0, 2.0, 1.0], cache="fbcache", cache_threshold=0.05,
               callback_on_step_end=lambda pipe, i, t, kw: seen.append(i) or kw)
    assert seen == [0, 1, 2] and out.images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- metadata and defaults of the class


def test_parameters_record_strength(dev_pipes):
    _, ours = dev_pipes
    out = ours(PROMPTS, image=picture(32, 32), height=32, width=32, num_inference_steps=4, strength=0.5,
               generator=torch.Generator().manual_seed(0), max_sequence_length=SEQ, output_type="np")
    p = out.parameters
    assert len(p) == 2 and p[1]["prompt"] == PROMPTS[1]
    assert p[0]["pipeline"] == "FluxImg2ImgPipeline" and p[0]["strength"] == 0.5
    assert p[0]["num_inference_steps"] == 4 and p[0]["guidance_scale"] == 7.0


def test_class_is_exported():
    from fluxion.pipelines.img2img import FluxImg2ImgPipeline

    assert fluxion.FluxImg2ImgPipeline is FluxImg2ImgPipeline
    assert FluxImg2ImgPipeline.CALL_DEFAULTS == {"guidance_scale": 7.0, "strength": 0.6, "num_inference_steps": 28}


# ---------------------------------------------------------------- bad input: ValueError before any model runs


@pytest.fixture
def guarded(dev_pipes, monkeypatch):
    _, ours = dev_pipes

    def boom(*args, **kwargs):
        raise AssertionError("a model ran before the input check")

    monkeypatch.setattr(ours, "encode_prompt", boom)
    monkeypatch.setattr(ours.transformer, "forward", boom)
    monkeypatch.setattr(ours.vae, "encode", boom)
    return ours


@pytest.mark.parametrize("bad, match", [
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(strength=-0.2), "strength"),
    (dict(strength="0.5"), "strength"),
    (dict(strength=1e-20), "no step"),
    (dict(image=None), "image is required"),
    (dict(image="cat.png"), "image must be"),
    (dict(image=[picture(32, 32), np.zeros((32, 32, 3))]), "image must be"),
    (dict(image=torch.zeros(1, 5, 32, 32)), "3 colour channels"),
    (dict(image=torch.zeros(1, LATENT_CH, 8, 8)), "as latents"),
    (dict(image=[picture(32, 32, s) for s in range(3)]), "divides"),
    (dict(latents=torch.zeros(2, 16, LATENT_CH)), "latents"),
])
def test_bad_input(guarded, bad, match):
    kwargs = {**dict(prompt=PROMPTS, image=picture(32, 32), height=32, width=32, num_inference_steps=4,
                     max_sequence_length=SEQ), **bad}
    with pytest.raises(ValueError, match=match):
        guarded(**kwargs)
