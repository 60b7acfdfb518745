"""fluxion.FluxFillPipeline == diffusers' FluxFillPipeline (float32, 1e-4, seeded): inpainting, outpainting,
a strength cut, batches with generator lists; its defaults, input checks and metadata. diffusers is the
test-only oracle.

The tiny Fill model (conftest `tiny_fill_dir`) takes 16 noisy + 16 masked-image + 16 mask channels: the tiny
VAE's scale factor is 2, so each 2x2 pixel block of the mask gives 4 channels, packed 2x2 to 16.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion
from fluxion.pipelines.fill import pack_mask
from oracle import assert_same_images, load_pair, run

PROMPTS = ["a white paper cup on a table", "a red cat sitting in the sun"]


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5, 0.2])
    return Image.fromarray(np.clip(base + rng.integers(0, 80, (h, w, 3)), 0, 255).astype(np.uint8))


def box_mask(w: int, h: int, box, outpaint: bool = False) -> Image.Image:
    """White (repaint) inside `box` = (x0, y0, x1, y1), or outside it with outpaint=True."""
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(255 - m if outpaint else m)


@pytest.fixture(scope="module")
def pipes(tiny_fill_dir):
    return load_pair("FluxFillPipeline", tiny_fill_dir)


@pytest.fixture
def no_model_runs(pipes, monkeypatch):
    """Our pipeline with every model part made to fail: a ValueError seen then came before any model ran."""
    _, ours = pipes

    def boom(*args, **kwargs):
        raise AssertionError("a model ran before the input check")

    for name in ("encode_prompt", "encode_image", "decode"):
        monkeypatch.setattr(ours, name, boom)
    return ours


# ---------------------------------------------------------------- parity


def test_defaults_match_diffusers(pipes):
    import diffusers

    ref_params = inspect.signature(diffusers.FluxFillPipeline.__call__).parameters
    _, ours = pipes
    d = ours.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.strength, d.max_sequence_length) == (
        ref_params["num_inference_steps"].default, ref_params["guidance_scale"].default,
        ref_params["strength"].default, ref_params["max_sequence_length"].default) == (50, 30.0, 1.0, 512)
    for name in ("image", "mask_image", "masked_image_latents", "height", "width", "strength", "generator",
                 "latents", "prompt_embeds", "pooled_prompt_embeds", "joint_attention_kwargs"):
        assert name in ref_params
        assert name in inspect.signature(ours.generate).parameters or name == "joint_attention_kwargs"


def test_inpaint(pipes):
    """A resized (non-square) image and a box mask; strength 1.0: the init sample only advances the generator."""
    out = assert_same_images(pipes, seed=1, prompt=PROMPTS[0], image=picture(40, 36), mask_image=box_mask(32, 32,
                             (8, 4, 24, 20)), height=32, width=32)
    assert out.shape == (1, 32, 32, 3)


def test_outpaint_two_prompts_and_strength_cut(pipes):
    """A mask covering the border (outpainting), two prompts sharing image and mask, strength 0.75 (the image
    latents are noised to the cut's first sigma)."""
    image, mask = picture(48, 32, seed=2), box_mask(48, 32, (12, 8, 36, 24), outpaint=True)
    out = assert_same_images(pipes, seed=2, prompt=PROMPTS, image=image, mask_image=mask, height=32, width=48,
                             strength=0.75, num_inference_steps=4, guidance_scale=12.0)
    assert out.shape == (2, 32, 48, 3)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_generator_list_masks_tiled(pipes):
    """One prompt, two images per prompt, two masks (tiled over the outputs as diffusers tiles them), one
    generator per image: each draws its own init sample, noise and masked-image sample."""
    masks = [box_mask(32, 32, (0, 0, 16, 32)), box_mask(32, 32, (8, 8, 28, 28))]
    out = assert_same_images(pipes, seed=[3, 4], prompt=PROMPTS[1], image=picture(32, 32, seed=3), mask_image=masks,
                             num_images_per_prompt=2, height=32, width=32)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_numpy_mask_and_tensor_image(pipes):
    image = torch.from_numpy(np.asarray(picture(32, 32, seed=5), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mask = np.zeros((32, 32, 1), np.float32)
    mask[4:30, 10:20] = 1.0
    assert_same_images(pipes, seed=5, prompt=PROMPTS[0], image=image, mask_image=mask, height=32, width=32)


# ---------------------------------------------------------------- our own behaviour


def test_mask_packing_layout():
    """Channel (py * f + px) of each f x f block, then 2x2 packed with feature index c * 4 + ph * 2 + pw."""
    f = 2
    mask = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    packed = pack_mask(mask, f)
    assert packed.shape == (2, 4, 16)
    for b, tok, feat in [(0, 0, 0), (1, 3, 7), (0, 2, 13)]:
        c, ph, pw = feat // 4, (feat // 2) % 2, feat % 2
        py, px = c // f, c % f
        row, col = (tok // 2) * 2 + ph, (tok % 2) * 2 + pw  # latent pixel
        assert packed[b, tok, feat] == mask[b, 0, row * f + py, col * f + px]


def test_masked_image_latents_replace_the_mask(pipes):
    """Precomputed conditioning ([masked-image latents | packed mask]) instead of mask_image: no image is
    needed at strength 1.0; the conditioning reaches the model (a different one changes the image)."""
    _, ours = pipes
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 8 * 8, 32, generator=g)  # 32x32 pixels: 8x8 tokens of 16 + 16 features
    one = run(ours, 7, prompt=PROMPTS[0], masked_image_latents=cond, height=32, width=32)
    again = run(ours, 7, prompt=PROMPTS[0], masked_image_latents=cond, height=32, width=32)
    other = run(ours, 7, prompt=PROMPTS[0], masked_image_latents=cond.flip(1), height=32, width=32)
    assert np.array_equal(one, again) and np.abs(one - other).max() > 1e-3


def test_metadata(pipes):
    _, ours = pipes
    out = ours(prompt=PROMPTS[0], image=picture(32, 32), mask_image=box_mask(32, 32, (0, 0, 16, 32)), height=32,
               width=32, num_inference_steps=2, strength=0.5, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0))
    p = out.parameters[0]
    assert p["pipeline"] == "FluxFillPipeline" and p["strength"] == 0.5 and p["mask_coverage"] == 0.5
    assert p["num_inference_steps"] == 1 and p["guidance_scale"] == 30.0  # steps run after the strength cut
    assert isinstance(out.images[0], Image.Image)


# ---------------------------------------------------------------- bad input: ValueError before any model runs


def test_fill_checkpoint_refused_by_other_pipelines(tiny_fill_dir, tiny_dev_dir):
    with pytest.raises(ValueError, match="FluxFillPipeline"):
        fluxion.FluxPipeline.from_pretrained(tiny_fill_dir)
    with pytest.raises(ValueError, match="FluxFillPipeline"):
        fluxion.FluxControlPipeline.from_pretrained(tiny_fill_dir)
    with pytest.raises(ValueError, match="FluxPipeline"):
        fluxion.FluxFillPipeline.from_pretrained(tiny_dev_dir)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs image and mask_image"),
    (dict(image="pic"), "needs image and mask_image"),
    (dict(mask_image="mask"), "needs image and mask_image"),
    (dict(image="pic", mask_image=["mask"] * 3, num_images_per_prompt=2), "3 masks for 2 outputs"),
    (dict(image="pic", mask_image=["mask"] * 4, prompt=PROMPTS, num_images_per_prompt=3), "4 masks for 6"),
    (dict(image=["pic"] * 3, mask_image="mask", prompt=PROMPTS), "3 images for 2 outputs"),
    (dict(image=["pic"] * 2, mask_image=["mask"] * 4, num_images_per_prompt=4), "2 images and 4 masks"),
    (dict(image="pic", mask_image="mask", masked_image_latents=torch.zeros(1, 64, 32)), "not both"),
    (dict(masked_image_latents=torch.zeros(1, 64, 16)), r"masked_image_latents must be packed \[1 or 1, 64, 32\]"),
    (dict(masked_image_latents=torch.zeros(1, 64, 32), strength=0.5), "image is needed"),
    (dict(image="pic", mask_image="mask", strength=0.0), "strength"),
])
def test_bad_inputs(no_model_runs, kwargs, message):
    given = {"pic": picture(32, 32), "mask": box_mask(32, 32, (0, 0, 8, 8))}

    def real(v):  # "pic" / "mask" placeholders (parametrize ids stay short) -> images
        if isinstance(v, list):
            return [real(x) for x in v]
        return given.get(v, v) if isinstance(v, str) else v

    kwargs = {k: real(v) for k, v in kwargs.items()}
    kwargs.setdefault("prompt", PROMPTS[0])
    with pytest.raises(ValueError, match=message):
        no_model_runs(height=32, width=32, num_inference_steps=2, **kwargs)
