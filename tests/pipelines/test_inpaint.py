"""fluxion.FluxInpaintPipeline == diffusers' FluxInpaintPipeline (float32, 1e-4 for arrays, 1/255 for PIL output
with padding_mask_crop; seeded generators, left in the same state), the padding_mask_crop helpers against
diffusers' image processor, the input checks (a ValueError before any model runs) and the metadata.

The tiny VAE's scale factor is 2 (sizes are multiples of 4) and its latents have 4 channels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import TINY_VAE_CONFIG
from fluxion.pipelines import image_inputs as II
from oracle import SEQ, as_array, load_pair

PROMPTS = ["a photo of a red cat on a table", "a painting of a fluffy dragon at sunset"]
LATENT_CH = TINY_VAE_CONFIG["latent_channels"]


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def box_mask(w: int, h: int, box: tuple[int, int, int, int], mode: str = "L") -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m).convert(mode)


@pytest.fixture(scope="module")
def dev_pipes(tiny_dev_dir):
    return load_pair("FluxInpaintPipeline", tiny_dev_dir)


@pytest.fixture(scope="module")
def schnell_pipes(tiny_schnell_dir):
    return load_pair("FluxInpaintPipeline", tiny_schnell_dir)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def pipes(request, dev_pipes, schnell_pipes):
    return dev_pipes if request.param == "dev" else schnell_pipes


def same_images_and_generators(pipes, seeds, atol=1e-4, **kwargs):
    """Both pipelines from fresh generators: the same images, and the generators left in the same state (the
    masked-image draw diffusers makes is reproduced)."""
    results = []
    for pipe in pipes:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        kw = {"max_sequence_length": SEQ, "num_inference_steps": 4, "output_type": "np", **kwargs}
        images = as_array(pipe(generator=gens if len(gens) > 1 else gens[0], **kw).images)
        results.append((images, [g.get_state() for g in gens]))
    (expected, ref_states), (got, our_states) = results
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= atol, np.abs(got - expected).max()
    assert all(torch.equal(a, b) for a, b in zip(ref_states, our_states))
    return got


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("strength, steps", [(0.6, 5), (1.0, 3)])
def test_seeded(pipes, strength, steps):
    out = same_images_and_generators(pipes, [3], prompt=PROMPTS[0], image=picture(48, 32),
                                     mask_image=box_mask(48, 32, (10, 8, 30, 20)), height=32, width=48,
                                     strength=strength, num_inference_steps=steps)
    assert out.shape == (1, 32, 48, 3)


def test_batch_generator_list_one_mask(dev_pipes):
    same_images_and_generators(dev_pipes, [3, 4], prompt=PROMPTS, image=picture(32, 32),
                               mask_image=box_mask(32, 32, (4, 4, 20, 28)), height=32, width=32)


def test_masks_per_prompt_and_images_per_prompt(dev_pipes):
    masks = [box_mask(32, 32, (0, 0, 16, 32)), box_mask(32, 32, (8, 12, 32, 24))]
    out = same_images_and_generators(dev_pipes, [5], prompt=PROMPTS, image=picture(32, 32), mask_image=masks,
                                     num_images_per_prompt=2, height=32, width=32)
    assert out.shape == (4, 32, 32, 3)


def test_soft_rgb_mask_resized(dev_pipes):
    """An RGB mask of another size is resized (lanczos, in RGB) before greyscale and binarising, as diffusers."""
    rng = np.random.default_rng(7)
    soft = Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).resize((52, 40), Image.BILINEAR)
    same_images_and_generators(dev_pipes, [6], prompt=PROMPTS[1], image=picture(52, 40), mask_image=soft,
                               height=32, width=48)


def test_tensor_mask_and_image(dev_pipes):
    x = torch.from_numpy(np.asarray(picture(32, 32, 3), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 5:21, 9:30] = 0.7
    same_images_and_generators(dev_pipes, [8], prompt=PROMPTS[0], image=x, mask_image=mask, height=32, width=32)


def test_masked_image_latents_as_pixels(dev_pipes):
    """Pixels given as masked_image_latents are encoded by diffusers (a draw of their latent's shape)."""
    masked = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    same_images_and_generators(dev_pipes, [9, 10], prompt=PROMPTS, image=picture(32, 32),
                               mask_image=box_mask(32, 32, (4, 4, 20, 28)), masked_image_latents=masked,
                               height=32, width=32)


def test_masked_image_latents_as_latents_not_drawn(dev_pipes):
    """Latents given as masked_image_latents are neither used by a 64-channel model nor drawn for."""
    _, ours = dev_pipes
    kw = dict(prompt=PROMPTS[0], image=picture(32, 32), mask_image=box_mask(32, 32, (4, 4, 20, 28)), height=32,
              width=32, num_inference_steps=3, max_sequence_length=SEQ, output_type="np")
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    a = ours(generator=g1, **kw).images
    b = ours(generator=g2, masked_image_latents=torch.zeros(1, LATENT_CH, 16, 16), **kw).images
    np.testing.assert_array_equal(a, b)
    torch.randn((1, LATENT_CH, 16, 16), generator=g2, dtype=torch.float32)  # the draw only the first call made
    assert torch.equal(g1.get_state(), g2.get_state())


def test_explicit_unpacked_latents(dev_pipes):
    """diffusers' inpaint takes unpacked latents, used as the start and as the noise of the re-noised original."""
    latents = torch.randn(2, LATENT_CH, 16, 24, generator=torch.Generator().manual_seed(11))
    same_images_and_generators(dev_pipes, [12], prompt=PROMPTS, image=picture(48, 32),
                               mask_image=box_mask(48, 32, (10, 8, 30, 20)), latents=latents, height=32, width=48)


def test_latent_output_and_true_cfg(dev_pipes):
    same_images_and_generators(dev_pipes, [13], prompt=PROMPTS[0], negative_prompt="blurry", true_cfg_scale=2.0,
                               image=picture(32, 32), mask_image=box_mask(32, 32, (4, 4, 20, 28)), height=32,
                               width=32, output_type="latent")


@pytest.mark.parametrize("size, box, pad", [((48, 40), (30, 6, 44, 14), 4), ((40, 48), (2, 20, 38, 26), 0)])
def test_padding_mask_crop(dev_pipes, size, box, pad):
    """The crop around the mask is repainted at (height, width) and pasted back into the original."""
    w, h = size
    image, mask = picture(w, h, 4), box_mask(w, h, box)
    out = same_images_and_generators(dev_pipes, [14], atol=1 / 255 + 1e-6, prompt=PROMPTS[1], image=image,
                                     mask_image=mask, padding_mask_crop=pad, height=32, width=32, output_type="pil")
    assert out.shape == (1, h, w, 3)
    outside = np.asarray(mask) == 0
    np.testing.assert_allclose(out[0][outside], np.asarray(image, dtype=np.float32)[outside] / 255, atol=1e-6)


# ---------------------------------------------------------------- padding_mask_crop helpers == diffusers'


def test_crop_helpers_match_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=4)
    masks = [box_mask(48, 40, (30, 6, 44, 14)), box_mask(40, 48, (2, 20, 38, 26)), box_mask(64, 32, (60, 0, 64, 4)),
             box_mask(32, 64, (0, 50, 3, 64)), box_mask(50, 30, (10, 10, 11, 11))]
    for mask in masks:
        for w, h, pad in [(32, 32, 0), (48, 32, 4), (32, 48, 16), (24, 40, 100)]:
            assert II.crop_region(mask, w, h, pad) == proc.get_crop_region(mask, w, h, pad=pad), (mask.size, w, h)
    image = picture(37, 23, 1)
    for w, h in [(32, 32), (48, 16), (16, 48), (37, 23)]:
        for mode in ("fill", "crop"):
            ours = II._resize_pil(image, w, h, mode)
            assert np.array_equal(np.asarray(ours), np.asarray(proc.resize(image, h, w, resize_mode=mode))), (w, h)
    soft = picture(37, 23, 2).convert("L")
    generated = picture(16, 16, 3)
    for crop in [None, (4, 2, 30, 20)]:
        base = generated.resize(soft.size) if crop is None else generated
        expected = proc.apply_overlay(soft, image, base, crop)
        assert np.array_equal(np.asarray(II.overlay(soft, image, base, crop)), np.asarray(expected))


def test_cropped_preprocessing_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    image_proc = VaeImageProcessor(vae_scale_factor=4)
    mask_proc = VaeImageProcessor(vae_scale_factor=4, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    image, mask = picture(48, 40, 5), box_mask(48, 40, (30, 6, 44, 14), "RGB")
    crop = II.crop_region(mask, 32, 32, 4)
    kw = dict(height=32, width=32, crops_coords=crop, resize_mode="fill")
    torch.testing.assert_close(II.preprocess_image(image, 32, 32, crop=crop, resize_mode="fill"),
                               image_proc.preprocess(image, **kw), rtol=0, atol=0)
    torch.testing.assert_close(II.preprocess_mask(mask, 32, 32, crop=crop, resize_mode="fill"),
                               mask_proc.preprocess(mask, **kw), rtol=0, atol=0)


# ---------------------------------------------------------------- metadata


def test_parameters_record_strength_and_crop(dev_pipes):
    _, ours = dev_pipes
    out = ours(PROMPTS[0], image=picture(40, 40), mask_image=box_mask(40, 40, (4, 4, 12, 12)), padding_mask_crop=2,
               height=32, width=32, num_inference_steps=4, strength=0.75, generator=torch.Generator().manual_seed(0),
               max_sequence_length=SEQ)
    p = out.parameters[0]
    assert p["pipeline"] == "FluxInpaintPipeline" and p["strength"] == 0.75 and p["padding_mask_crop"] == 2
    assert p["guidance_scale"] == 7.0 and out.images[0].size == (40, 40)


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


MASK = box_mask(32, 32, (4, 4, 20, 28))


@pytest.mark.parametrize("bad, match", [
    (dict(strength=0), "strength"),
    (dict(strength=1.01), "strength"),
    (dict(image=None), "image is required"),
    (dict(image=3.0), "image must be"),
    (dict(mask_image=None), "mask_image is required"),
    (dict(mask_image="mask.png"), "mask_image must be"),
    (dict(mask_image=[MASK, MASK, MASK]), "3 masks"),
    (dict(image=[picture(32, 32, s) for s in range(2)], mask_image=[MASK] * 2, prompt=PROMPTS[0]), "divides"),
    (dict(image=torch.zeros(1, LATENT_CH, 16, 16)), "masked_image_latents"),
    (dict(masked_image_latents=np.zeros((1, 3, 32, 32))), "masked_image_latents"),
    (dict(masked_image_latents=torch.zeros(1, 3, 16, 16)), "masked_image_latents"),
    (dict(masked_image_latents=torch.zeros(3, LATENT_CH, 16, 16)), "masked_image_latents"),
    (dict(latents=torch.zeros(2, 64, LATENT_CH * 4)), "unpacked"),
    (dict(padding_mask_crop=4, image=np.zeros((32, 32, 3))), "PIL"),
    (dict(padding_mask_crop=4, mask_image=[MASK]), "PIL"),
    (dict(padding_mask_crop=4, output_type="np"), "output_type='pil'"),
    (dict(padding_mask_crop=-1), "padding_mask_crop"),
    (dict(padding_mask_crop=2.5), "padding_mask_crop"),
    (dict(padding_mask_crop=4, mask_image=box_mask(40, 32, (4, 4, 20, 28))), "one size"),
    (dict(padding_mask_crop=4, mask_image=box_mask(32, 32, (0, 0, 0, 0))), "black everywhere"),
])
def test_bad_input(guarded, bad, match):
    kwargs = {**dict(prompt=PROMPTS, image=picture(32, 32), mask_image=MASK, height=32, width=32,
                     num_inference_steps=4, max_sequence_length=SEQ, output_type="pil"), **bad}
    with pytest.raises(ValueError, match=match):
        guarded(**kwargs)
