"""fluxion.FluxControlNetPipeline == diffusers' FluxControlNetPipeline, image for image (float32, 1e-4): an
InstantX-style net, a Union net with two modes in one call, two nets with a per-net scale list, the
control_guidance_start/end window, true CFG, an XLabs-style net (hint block) loaded from XLabs' original layout;
bad inputs fail before any compute."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion
from controlnet_fixtures import diffusers_controlnet, to_xlabs_layout
from fixtures import TINY_VAE_CONFIG, randomize_parameters_
from oracle import as_array, run

ATOL = 1e-4
PROMPTS = ["a photo of a red cat on a table", "a painting of a fluffy dragon at sunset"]


def _image(seed, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pair(folder, ref_net, tmp_path, name="net", cls="FluxControlNetPipeline"):
    """(diffusers pipeline, ours) on `folder`, each with the same ControlNet (ours loaded from diffusers' save)."""
    import diffusers

    nets = ref_net if isinstance(ref_net, list) else [ref_net]
    ours = []
    for k, net in enumerate(nets):
        net.save_pretrained(str(tmp_path / f"{name}{k}"), safe_serialization=True)
        ours.append(fluxion.FluxControlNetModel.from_pretrained(tmp_path / f"{name}{k}"))
    ref_cn = diffusers.FluxMultiControlNetModel(nets) if isinstance(ref_net, list) else ref_net
    our_cn = fluxion.FluxMultiControlNetModel(ours) if isinstance(ref_net, list) else ours[0]
    ref = getattr(diffusers, cls).from_pretrained(str(folder), controlnet=ref_cn, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    pipe = getattr(fluxion, cls).from_pretrained(folder, controlnet=our_cn, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return ref, pipe


def _same(pipes, seed, atol=ATOL, **kwargs):
    ref, ours = pipes
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    expected = as_array(run(ref, seed, **kwargs))
    got = as_array(run(ours, seed, **kwargs))
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"
    assert expected.std() > 0.01
    return got


@pytest.fixture(scope="module")
def instantx(tiny_dev_dir, tmp_path_factory):
    return _pair(tiny_dev_dir, diffusers_controlnet(10), tmp_path_factory.mktemp("cn_instantx"))


def test_defaults_as_diffusers(instantx):
    assert instantx[1].defaults.guidance_scale == 7.0 and instantx[1].defaults.num_inference_steps == 28


def test_instantx_parity(instantx):
    """Control image VAE-sampled with the generator before the noise; a list of generators, two prompts."""
    _same(instantx, [3, 4], prompt=PROMPTS, control_image=_image(0), controlnet_conditioning_scale=0.8)


def test_instantx_parity_images_per_prompt(instantx):
    _same(instantx, 5, prompt=PROMPTS[0], control_image=_image(1), num_images_per_prompt=2)


def test_guidance_window_parity(instantx):
    got = _same(instantx, 6, prompt=PROMPTS[0], control_image=_image(2), num_inference_steps=4,
                control_guidance_start=0.25, control_guidance_end=0.75)
    without = as_array(run(instantx[1], 6, prompt=PROMPTS[0], control_image=_image(2), num_inference_steps=4,
                           height=32, width=32))
    assert np.abs(got - without).max() > 1e-3  # the window changes the image


def test_true_cfg_parity(instantx):
    """The net runs once on the positive prompt; both passes (batched [cond; uncond]) get its residuals."""
    _same(instantx, 7, prompt=PROMPTS, negative_prompt=["blurry", "a dog"], true_cfg_scale=2.0,
          control_image=_image(3))


def test_guidance_net_parity(tiny_dev_dir, tmp_path):
    pipes = _pair(tiny_dev_dir, diffusers_controlnet(11, guidance_embeds=True), tmp_path)
    _same(pipes, 8, prompt=PROMPTS[0], control_image=_image(4), guidance_scale=4.0)


def test_union_two_modes_parity(tiny_dev_dir, tmp_path):
    """One Union net in a FluxMultiControlNetModel, two control images with two modes in one call. (diffusers
    makes scalar control_guidance_start/end lists of len(nets) = 1 and zips them with the scales, silently dropping
    the second image; lists of one entry per image avoid that there; we expand scalars per image.)"""
    pipes = _pair(tiny_dev_dir, [diffusers_controlnet(12, num_mode=4)], tmp_path)
    kw = dict(prompt=PROMPTS[1], control_image=[_image(5), _image(6)], control_mode=[0, 3],
              controlnet_conditioning_scale=[0.6, 1.2])
    got = _same(pipes, 9, **kw, control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 1.0])
    scalar = as_array(run(pipes[1], 9, **kw, height=32, width=32))
    assert np.abs(got - scalar).max() == 0


def test_union_single_net_parity(tiny_dev_dir, tmp_path):
    pipes = _pair(tiny_dev_dir, diffusers_controlnet(13, num_mode=4), tmp_path)
    _same(pipes, 10, prompt=PROMPTS[1], control_image=_image(7), control_mode=2)


def test_two_nets_of_different_depths_are_not_truncated(tiny_dev_dir, tmp_path):
    """diffusers zips the two nets' residual lists, truncating to the shorter (1 double block here); we spread
    each net over the transformer's blocks before summing (`combine`), so the images differ from diffusers'."""
    pipes = _pair(tiny_dev_dir, [diffusers_controlnet(14), diffusers_controlnet(15, num_layers=1,
                                                                                   num_single_layers=2)], tmp_path)
    kw = dict(prompt=PROMPTS[0], control_image=[_image(8), _image(9)], controlnet_conditioning_scale=[0.5, 1.5],
              height=32, width=32)
    ref, ours = (as_array(run(p, 11, **kw)) for p in pipes)
    assert np.isfinite(ours).all() and np.abs(ref - ours).max() > 1e-3


def test_two_same_kind_nets_scale_list_and_window_parity(tiny_dev_dir, tmp_path):
    pipes = _pair(tiny_dev_dir, [diffusers_controlnet(16), diffusers_controlnet(17)], tmp_path)
    _same(pipes, 12, prompt=PROMPTS, control_image=[_image(10), _image(11)],
          controlnet_conditioning_scale=[0.5, 1.5], control_guidance_start=[0.0, 0.25],
          control_guidance_end=[0.75, 1.0], num_inference_steps=4)


# ---------------------------------------------------------------- XLabs (hint block), VAE scale 8


@pytest.fixture(scope="module")
def scale8_dir(tiny_dev_dir, tmp_path_factory):
    """The tiny dev folder with a 4-level VAE (scale factor 8), so the hint block's ÷8 meets the latent grid."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("tiny_dev_vae8") / "pipe"
    shutil.copytree(tiny_dev_dir, folder)
    shutil.rmtree(folder / "vae")
    torch.manual_seed(20)
    cfg = {**TINY_VAE_CONFIG, "down_block_types": ("DownEncoderBlock2D",) * 4,
           "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (16, 16, 32, 32)}
    vae = randomize_parameters_(AutoencoderKL(**cfg), seed=21).eval()
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    return folder


def _xlabs_pair(folder, tmp_path):
    import diffusers
    from safetensors.torch import save_file

    ref_net = diffusers_controlnet(18, conditioning_embedding_channels=4, patch_size=2, num_single_layers=0,
                                   guidance_embeds=True)
    path = tmp_path / "flux-tiny-canny-controlnet.safetensors"
    save_file(to_xlabs_layout(ref_net.state_dict()), str(path))
    ours = fluxion.FluxControlNetModel.from_single_file(path)
    assert ours.config.has_hint_block and ours.config.patch_size == 2 and ours.config.guidance_embed
    ref = diffusers.FluxControlNetPipeline.from_pretrained(str(folder), controlnet=ref_net, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    pipe = fluxion.FluxControlNetPipeline.from_pretrained(folder, controlnet=ours, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return ref, pipe


def test_xlabs_original_file_parity(scale8_dir, tmp_path):
    """Raw pixels in [-1, 1] through the hint block (no draw), residuals repeated over the double blocks."""
    pipes = _xlabs_pair(scale8_dir, tmp_path)
    _same(pipes, [13, 14], prompt=PROMPTS, control_image=_image(12, 64), height=64, width=64,
          controlnet_conditioning_scale=0.7)


def test_xlabs_plus_instantx_combine(scale8_dir, tmp_path):
    """diffusers crashes on this mix (nets[0] decides the encoding for all); each net gets its own here, and the
    result equals the sum of each net's own contribution."""
    _, pipe = _xlabs_pair(scale8_dir, tmp_path)
    xlabs = pipe.controlnet
    instantx = fluxion.FluxControlNetModel.from_pretrained(_save(diffusers_controlnet(19), tmp_path / "ix"))
    pipe.set_controlnet([xlabs, instantx])
    out = as_array(run(pipe, 15, prompt=PROMPTS[0], control_image=[_image(13, 64), _image(14, 64)], height=64,
                       width=64, controlnet_conditioning_scale=[0.7, 0.4]))
    assert np.isfinite(out).all() and out.std() > 0.01


def _save(net, folder):
    net.save_pretrained(str(folder), safe_serialization=True)
    return folder


# ---------------------------------------------------------------- step cache


def test_step_cache_runs_with_controlnet(instantx):
    """fbcache: the nets run every step; a skipped step reuses the last full step's later-block residuals (which
    hold that step's ControlNet residuals). With a huge threshold every step after the first is skipped."""
    _, ours = instantx
    out = ours(prompt=PROMPTS[0], control_image=_image(0), height=32, width=32, num_inference_steps=4,
               max_sequence_length=32, output_type="np", cache="fbcache", cache_threshold=1e9,
               generator=torch.Generator().manual_seed(0))
    assert out.cache_stats["skipped"] == 3 and np.isfinite(out.images).all()


# ---------------------------------------------------------------- bad input, before compute


def _no_compute(pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before the input check")

    monkeypatch.setattr(pipe, "encode_prompt", boom)
    monkeypatch.setattr(pipe, "encode_image", boom)


def test_bad_inputs(instantx, tiny_dev_dir, tmp_path, monkeypatch):
    _, ours = instantx
    _no_compute(ours, monkeypatch)
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=2)
    with pytest.raises(ValueError, match="needs control_image"):
        ours(**kw)
    with pytest.raises(ValueError, match="control images for 2 prompts"):
        ours(**{**kw, "prompt": PROMPTS, "num_images_per_prompt": 1},
             control_image=[_image(0), _image(1), _image(2)])
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 2 entries"):
        ours(**kw, control_image=_image(0), controlnet_conditioning_scale=[1.0, 0.5])
    with pytest.raises(ValueError, match="start < end"):
        ours(**kw, control_image=_image(0), control_guidance_start=0.8, control_guidance_end=0.2)

    multi = fluxion.FluxControlNetPipeline.from_pipe(ours, controlnet=[ours.controlnet, ours.controlnet])
    _no_compute(multi, monkeypatch)
    with pytest.raises(ValueError, match="got 1 control images for 2 ControlNets"):
        multi(**kw, control_image=[_image(0)])
    with pytest.raises(ValueError, match="one entry per net"):
        multi(**kw, control_image=_image(0))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries"):
        multi(**kw, control_image=[_image(0), _image(1)], controlnet_conditioning_scale=[1.0, 0.5, 0.2])

    union = fluxion.FluxControlNetModel.from_pretrained(_save(diffusers_controlnet(30, num_mode=2), tmp_path / "u"))
    up = fluxion.FluxControlNetPipeline.from_pipe(ours, controlnet=union)
    _no_compute(up, monkeypatch)
    with pytest.raises(ValueError, match="out of range"):
        up(**kw, control_image=_image(0), control_mode=2)
    with pytest.raises(ValueError, match="out of range"):
        up(**kw, control_image=_image(0))

    wide = fluxion.FluxControlNetModel.from_pretrained(_save(diffusers_controlnet(31, attention_head_dim=32,
                                                                                  axes_dims_rope=(8, 12, 12)),
                                                             tmp_path / "w"))
    with pytest.raises(ValueError, match="hidden_size"):
        fluxion.FluxControlNetPipeline.from_pipe(ours, controlnet=wide)
    with pytest.raises(ValueError, match="hidden_size"):
        fluxion.FluxControlNetPipeline.from_pretrained(tiny_dev_dir, controlnet=wide)
    bare = fluxion.FluxControlNetPipeline.from_pipe(ours)
    bare.controlnet = None
    with pytest.raises(ValueError, match="no ControlNet"):
        bare(**kw, control_image=_image(0))


def test_tensor_control_image_parity(instantx):
    """A [B, 3, H, W] tensor is taken as given (already in [-1, 1]), as diffusers takes it."""
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(40)) * 2 - 1
    _same(instantx, 16, prompt=PROMPTS[0], control_image=pixels)


def test_quantized_transformer_with_controlnet(tiny_dev_dir, instantx):
    """The residuals are added to the activations, whatever the transformer's Linear layers are."""
    _, ours = instantx
    q = fluxion.FluxControlNetPipeline.from_pretrained(tiny_dev_dir, controlnet=ours.controlnet, quantize="int8")
    q.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS[0], control_image=_image(0), height=32, width=32)
    a, b = as_array(run(q, 17, **kw)), as_array(run(ours, 17, **kw))
    assert np.isfinite(a).all() and np.abs(a - b).mean() < 0.05


# ---------------------------------------------------------------- img2img variant


@pytest.fixture(scope="module")
def img2img(tiny_dev_dir, tmp_path_factory):
    return _pair(tiny_dev_dir, diffusers_controlnet(50), tmp_path_factory.mktemp("cn_i2i"),
                 cls="FluxControlNetImg2ImgPipeline")


def test_img2img_defaults(img2img):
    d = img2img[1].defaults
    assert (d.guidance_scale, d.strength, d.num_inference_steps) == (7.0, 0.6, 28)


def test_img2img_parity(img2img):
    """Draws: control sample, init-image sample, noise; strength cut."""
    _same(img2img, [20, 21], prompt=PROMPTS, image=_image(30), control_image=_image(31), strength=0.7,
          num_inference_steps=5, controlnet_conditioning_scale=0.9)


def test_img2img_window_counts_steps_run(img2img):
    """keep_i over the N steps left after the strength cut (5 steps x 0.8 -> 4 run: i = 1, 2 kept)."""
    _same(img2img, 22, prompt=PROMPTS[0], image=_image(32), control_image=_image(33), strength=0.8,
          num_inference_steps=5, control_guidance_start=0.25, control_guidance_end=0.75)


def test_img2img_multi_parity(tiny_dev_dir, tmp_path):
    pipes = _pair(tiny_dev_dir, [diffusers_controlnet(51), diffusers_controlnet(52)], tmp_path,
                  cls="FluxControlNetImg2ImgPipeline")
    # diffusers' img2img variant needs control_mode as a list with several nets (None: no mode), or it zips an
    # empty mode tensor and fails
    _same(pipes, 23, prompt=PROMPTS[0], image=_image(34), control_image=[_image(35), _image(36)],
          controlnet_conditioning_scale=[0.5, 1.1], num_inference_steps=4, control_mode=[None, None])


# ---------------------------------------------------------------- inpaint variant


def _mask(seed, size=32):
    m = np.zeros((size, size), dtype=np.uint8)
    m[size // 4 : 3 * size // 4, size // 8 : size // 2 + seed % 4] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def inpaint(tiny_dev_dir, tmp_path_factory):
    return _pair(tiny_dev_dir, diffusers_controlnet(60), tmp_path_factory.mktemp("cn_inpaint"),
                 cls="FluxControlNetInpaintPipeline")


def test_inpaint_parity(inpaint):
    """Draws: control sample, init-image sample, noise, masked-image sample; blend after every step."""
    _same(inpaint, [24, 25], prompt=PROMPTS, image=_image(40), mask_image=_mask(0), control_image=_image(41),
          strength=0.8, num_inference_steps=4, controlnet_conditioning_scale=0.8)


def test_inpaint_window_parity(inpaint):
    _same(inpaint, 26, prompt=PROMPTS[0], image=_image(42), mask_image=_mask(1), control_image=_image(43),
          num_inference_steps=5, strength=0.8, control_guidance_start=0.25, control_guidance_end=0.75)


def test_inpaint_padding_mask_crop(inpaint):
    """diffusers' ControlNet inpaint variant forgets to paste the crop back (its FluxInpaintPipeline does it):
    ours equals diffusers' output pasted back with diffusers' own `apply_overlay`."""
    ref, ours = inpaint
    image, mask = _image(44), _mask(2)
    kw = dict(prompt=PROMPTS[0], image=image, mask_image=mask, control_image=_image(45), num_inference_steps=3,
              padding_mask_crop=4, output_type="pil", height=32, width=32)
    expected = run(ref, 27, **kw)
    box = ref.mask_processor.get_crop_region(mask, 32, 32, pad=4)
    expected = as_array([ref.image_processor.apply_overlay(mask, image, im, box) for im in expected])
    got = as_array(run(ours, 27, **kw))
    assert np.abs(got - expected).max() <= 1.5 / 255


# ---------------------------------------------------------------- with a LoRA on the transformer


def test_lora_parity(tiny_dev_dir, tmp_path):
    """A diffusers-format LoRA on the transformer's attention, with an InstantX net: the same image as diffusers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(70)
    lora = {}
    for i in range(2):
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"transformer.transformer_blocks.{i}.attn.{part}"
            lora[f"{key}.lora_A.weight"] = torch.randn(4, 32, generator=g) * 0.3
            lora[f"{key}.lora_B.weight"] = torch.randn(32, 4, generator=g) * 0.3
    save_file(lora, str(tmp_path / "lora.safetensors"))
    pipes = _pair(tiny_dev_dir, diffusers_controlnet(71), tmp_path)
    for p in pipes:
        p.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    assert pipes[1].get_list_adapters() == {"transformer": ["default_0"]}
    _same(pipes, 28, prompt=PROMPTS[0], control_image=_image(46))
