"""fluxion.FluxKontextPipeline == diffusers' FluxKontextPipeline (float32, 1e-4, seeded), its size rules, its
input checks and its metadata. diffusers is the test-only oracle.

The tiny VAE's scale factor is 2, so sizes are multiples of 4; the runs use a small `max_area` and
`_auto_resize=False` (the preferred resolutions are ~1 MP, too slow here): the auto-resize choice is checked
without running a model.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion
from fluxion.pipelines.kontext import PREFERRED_KONTEXT_RESOLUTIONS, output_size, reference_size
from oracle import SEQ, as_array, assert_same_images, load_pair, run

PROMPTS = ["make the cat blue", "turn it into a watercolour painting"]
NEGATIVE = ["blurry", "a photo of a dog"]
SMALL = dict(max_area=32 * 32, _auto_resize=False)


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.4, 0.7])
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipes(tiny_dev_dir):
    return load_pair("FluxKontextPipeline", tiny_dev_dir)


# ---------------------------------------------------------------- sizes (no model runs)


def test_preferred_list_and_defaults_match_diffusers():
    from diffusers import FluxKontextPipeline as Ref
    from diffusers.pipelines.flux import pipeline_flux_kontext as ref_module

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == list(ref_module.PREFERRED_KONTEXT_RESOLUTIONS)
    ref_sig = inspect.signature(Ref.__call__).parameters
    ours = inspect.signature(fluxion.FluxKontextPipeline.generate).parameters
    for name in ("max_area", "_auto_resize", "max_sequence_length", "true_cfg_scale", "output_type"):
        assert name in ours
    assert ours["max_area"].default == ref_sig["max_area"].default == 1024**2
    assert ours["_auto_resize"].default is ref_sig["_auto_resize"].default is True
    assert list(ours)[1:3] == list(ref_sig)[1:3] == ["image", "prompt"]  # positional order as diffusers
    defaults = fluxion.FluxKontextPipeline.CALL_DEFAULTS
    assert defaults["guidance_scale"] == ref_sig["guidance_scale"].default == 3.5
    assert defaults["num_inference_steps"] == ref_sig["num_inference_steps"].default == 28


def test_output_size_formula():
    # diffusers: height=48, width=64 without max_area -> 880 x 1168 (multiples of 16); no size -> 1024²
    assert output_size(48, 64, 1024**2, 16) == (880, 1168)
    assert output_size(1024, 1024, 1024**2, 16) == (1024, 1024)
    assert output_size(32, 48, 32 * 32, 4) == (24, 36)
    assert output_size(1000, 3000, 512**2, 16) == (288, 880)


def test_reference_size_against_diffusers_list():
    """The auto-resize choice as diffusers makes it: size floored first (VaeImageProcessor), then the nearest
    aspect ratio in the list (ties: smaller width), then floored again."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS as REF_LIST

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 2400, (300, 2))] + [(832, 1248), (1248, 832), (17, 33)]
    for multiple in (4, 16):
        proc = VaeImageProcessor(vae_scale_factor=multiple)
        for h, w in sizes:
            fh, fw = proc.get_default_height_width(Image.new("RGB", (w, h)))
            _, ew, eh = min((abs(fw / fh - a / b), a, b) for a, b in REF_LIST)
            assert reference_size(h, w, multiple) == (eh // multiple * multiple, ew // multiple * multiple), (h, w)
            assert reference_size(h, w, multiple, auto_resize=False) == (fh, fw)
    assert reference_size(200, 300, 16) == (832, 1248)  # 3:2 exactly


@pytest.mark.parametrize("size, kw", [
    ((300, 200), {}),
    ((97, 301), {"height": 48, "width": 64}),
    ((50, 50), {"height": 40, "width": 24, "max_area": 48 * 48}),
    ((210, 130), {"max_area": 20 * 20, "_auto_resize": False}),
])
def test_sizes_as_diffusers_chooses_them(pipes, size, kw):
    """diffusers' own call, stopped before its latents are made: the output and reference sizes it chose."""
    ref, ours = pipes
    seen = {}

    def stop(image, batch_size, channels, height, width, *args):
        seen.update(ref=tuple(image.shape[-2:]), out=(height, width))
        raise StopIteration

    ref.prepare_latents = stop
    try:
        with pytest.raises(StopIteration):
            ref(image=picture(*size), prompt="x", max_sequence_length=SEQ, **kw)
    finally:
        del ref.prepare_latents
    m = ours.vae_scale_factor * 2
    side = 128 * ours.vae_scale_factor  # diffusers' default_sample_size; only the aspect ratio matters
    out = output_size(kw.get("height", side), kw.get("width", side), kw.get("max_area", 1024**2), m)
    assert out == seen["out"]
    assert reference_size(size[1], size[0], m, kw.get("_auto_resize", True)) == seen["ref"]


# ---------------------------------------------------------------- parity


def test_image_of_another_size(pipes):
    out = assert_same_images(pipes, seed=1, image=picture(42, 26), prompt=PROMPTS[0], height=32, width=48, **SMALL)
    assert out.shape == (1, 24, 36, 3)


def test_no_image_is_text_to_image(pipes):
    out = assert_same_images(pipes, seed=2, prompt=PROMPTS[1], height=48, width=32, **SMALL)
    assert out.shape == (1, 36, 24, 3)


def test_batch_of_two_prompts(pipes):
    out = assert_same_images(pipes, seed=3, image=picture(30, 30), prompt=PROMPTS, **SMALL)
    assert out.shape == (2, 32, 32, 3)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_two_images_generator_list(pipes):
    images = [picture(36, 20, 1), picture(28, 28, 2)]
    assert_same_images(pipes, seed=[4, 5], image=images, prompt=PROMPTS, **SMALL)


def test_true_cfg_with_negative_prompt(pipes):
    kw = dict(image=picture(40, 28), prompt=PROMPTS, height=28, width=40, **SMALL)
    with_cfg = assert_same_images(pipes, seed=6, negative_prompt=NEGATIVE, true_cfg_scale=2.5, **kw)
    without = as_array(run(pipes[1], 6, **kw))
    assert np.abs(with_cfg - without).max() > 1e-3  # the negative pass did something


def test_latents_from_a_no_image_call(pipes):
    ref, ours = pipes
    kw = dict(prompt=PROMPTS[0], height=32, width=40, **SMALL)
    latents = assert_same_images(pipes, seed=7, output_type="latent", **kw)
    latents = torch.from_numpy(latents)
    out = assert_same_images(pipes, image=picture(44, 36), latents=latents, **kw)
    changed = as_array(run(ours, image=picture(44, 36, 9), latents=latents, **kw))
    assert np.abs(out - changed).max() > 1e-3  # the reference matters


def test_tensor_image_and_image_latents(pipes):
    image = torch.rand(1, 3, 26, 34, generator=torch.Generator().manual_seed(0))
    assert_same_images(pipes, seed=8, image=image, prompt=PROMPTS[1], **SMALL)
    latents = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    assert_same_images(pipes, seed=9, image=latents, prompt=PROMPTS[1], **SMALL)


# ---------------------------------------------------------------- checks before any model, metadata


@pytest.mark.parametrize("kw, match", [
    (dict(image="cat.png"), "image must be"),
    (dict(image=42), "image must be"),
    (dict(image=[picture(8, 8), np.zeros((8, 8, 3))]), "image must be"),
    (dict(image=np.zeros((0, 8, 3))), "image must be"),
    (dict(image=picture(2, 2)), "at least"),
    (dict(image=[picture(8, 8)] * 3, prompt=PROMPTS), "3 images for 2 outputs"),
    (dict(max_area=0), "max_area"),
    (dict(max_area=-16), "max_area"),
    (dict(max_area="big"), "max_area"),
    (dict(max_area=3), "too small"),
    (dict(height=-8), "height"),
    (dict(height=32, width=48, latents=torch.zeros(1, 4, 16)), "latents"),
])
def test_bad_input_fails_before_any_model(pipes, monkeypatch, kw, match):
    _, ours = pipes

    def boom(*a, **k):
        raise AssertionError("a model ran")

    monkeypatch.setattr(ours, "encode_prompt", boom)
    monkeypatch.setattr(ours, "encode_image", boom)
    kw = {"prompt": PROMPTS[0], **SMALL, **kw}
    with pytest.raises(ValueError, match=match):
        ours(**kw)


def test_metadata(pipes):
    _, ours = pipes
    g = torch.Generator().manual_seed(0)
    out = ours(picture(42, 26), PROMPTS[0], num_inference_steps=1, generator=g, max_sequence_length=SEQ,
               output_type="np", **SMALL)
    p = out.parameters[0]
    assert p["pipeline"] == "FluxKontextPipeline" and (p["height"], p["width"]) == (32, 32)
    assert (p["reference_height"], p["reference_width"], p["max_area"]) == (24, 40, 32 * 32)
    assert p["auto_resize"] is False
    p = ours(prompt=PROMPTS[0], num_inference_steps=1, max_sequence_length=SEQ, output_type="np",
             max_area=16 * 16).parameters[0]
    assert "reference_height" not in p and p["max_area"] == 256 and (p["height"], p["width"]) == (16, 16)
