"""fluxion.FluxControlPipeline == diffusers' FluxControlPipeline (float32, 1e-4, seeded), with a full Control
model (in_channels = 2 x out) and with a base model plus a control LoRA (img_in widened with zero columns,
restored by unload_lora_weights(reset_to_overwritten_params=True)); its defaults, input checks and metadata.
diffusers is the test-only oracle.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fluxion
from oracle import assert_same_images, load_pair, run

PROMPTS = ["a robot made out of gold", "a house by the lake at dawn"]


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h)[:, None, None] * np.array([0.3, 1.0, 0.6])
    return Image.fromarray(np.clip(base + rng.integers(0, 80, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipes(tiny_control_dir):
    return load_pair("FluxControlPipeline", tiny_control_dir)


def control_lora(path, seed: int = 0, x_embedder_in: int = 32, broken: bool = False) -> str:
    """A diffusers/PEFT-format control LoRA for the tiny base model: x_embedder takes 2 x 16 inputs (noisy +
    control), plus LoRAs on a few other layers. `broken` adds a key of the wrong shape (the load must fail)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, n_in, n_out in [("x_embedder", x_embedder_in, 32), ("transformer_blocks.0.attn.to_q", 32, 32),
                              ("transformer_blocks.1.ff.net.0.proj", 32, 128),
                              ("single_transformer_blocks.0.attn.to_v", 32, 32)]:
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, n_in, generator=g) / n_in ** 0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(n_out, 4, generator=g) / 2
    if broken:
        sd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = torch.randn(4, 7, generator=g)
        sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.randn(32, 4, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    name = f"control_lora_{seed}{'_broken' if broken else ''}.safetensors"
    save_file(sd, str(path / name))
    return name


# ---------------------------------------------------------------- full Control model


def test_defaults_match_diffusers(pipes):
    import diffusers

    ref_params = inspect.signature(diffusers.FluxControlPipeline.__call__).parameters
    _, ours = pipes
    d = ours.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.max_sequence_length) == (
        ref_params["num_inference_steps"].default, ref_params["guidance_scale"].default,
        ref_params["max_sequence_length"].default) == (28, 3.5, 512)
    ours_params = inspect.signature(ours.generate).parameters
    assert [n for n in ref_params if n not in ours_params and n not in ("self", "joint_attention_kwargs")] == []


def test_two_prompts_one_control_image(pipes):
    """One (resized, non-square) control image for two prompts: repeated to the batch, then one draw."""
    out = assert_same_images(pipes, seed=1, prompt=PROMPTS, control_image=picture(40, 36), height=32, width=32)
    assert out.shape == (2, 32, 32, 3)
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_control_image_per_prompt_generator_list(pipes):
    """A control image per prompt, two images per prompt, one generator per image."""
    images = [picture(48, 32, seed=2), picture(48, 32, seed=3)]
    out = assert_same_images(pipes, seed=[2, 3, 4, 5], prompt=PROMPTS, control_image=images,
                             num_images_per_prompt=2, height=32, width=48, guidance_scale=30.0)
    assert out.shape == (4, 32, 48, 3)


def test_control_image_tensor_taken_as_given(pipes):
    """A [B, 3, H, W] tensor skips preprocessing (already in [-1, 1]), as in diffusers."""
    x = torch.from_numpy(np.asarray(picture(32, 32, seed=4), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    assert_same_images(pipes, seed=4, prompt=PROMPTS[0], control_image=x, height=32, width=32)


def test_packed_control_latents(pipes):
    """A [B, tokens, C] tensor is taken as encoded, packed control latents (no VAE, no draw), as in diffusers."""
    latents = torch.randn(1, 8 * 8, 16, generator=torch.Generator().manual_seed(5))
    assert_same_images(pipes, seed=5, prompt=PROMPTS, control_image=latents, height=32, width=32)


def test_control_image_changes_the_result(pipes):
    _, ours = pipes
    one = run(ours, 6, prompt=PROMPTS[0], control_image=picture(32, 32, seed=6), height=32, width=32)
    other = run(ours, 6, prompt=PROMPTS[0], control_image=picture(32, 32, seed=7).rotate(90), height=32, width=32)
    assert np.abs(one - other).max() > 1e-3


def test_metadata(pipes):
    _, ours = pipes
    out = ours(prompt=PROMPTS[0], control_image=picture(32, 32), height=32, width=32, num_inference_steps=2,
               max_sequence_length=32, generator=torch.Generator().manual_seed(0))
    p = out.parameters[0]
    assert p["pipeline"] == "FluxControlPipeline" and p["guidance_scale"] == 3.5 and p["num_inference_steps"] == 2
    assert "control_lora" not in p


# ---------------------------------------------------------------- base model + control LoRA


def test_control_lora_then_reset(tiny_dev_dir, tmp_path):
    ref, ours = load_pair("FluxControlPipeline", tiny_dev_dir)
    plain = fluxion.FluxPipeline.from_pipe(ours)
    before = run(plain, 8, prompt=PROMPTS[0], height=32, width=32)
    weight = ours.transformer.img_in.weight
    name = control_lora(tmp_path)
    for p in (ref, ours):
        p.load_lora_weights(str(tmp_path), weight_name=name)
    assert ours.transformer.config.in_channels == ref.transformer.config.in_channels == 32
    wide = ours.transformer.img_in.weight
    assert torch.equal(wide[:, :16], weight) and not wide[:, 16:].any()
    out = assert_same_images((ref, ours), seed=9, prompt=PROMPTS, control_image=picture(40, 36, seed=9),
                             height=32, width=32)
    other = run(ours, 9, prompt=PROMPTS, control_image=picture(40, 36, seed=10), height=32, width=32)
    assert np.abs(out - other).max() > 1e-3  # the control channels reach the model through the LoRA
    assert ours(prompt=PROMPTS[0], control_image=picture(32, 32), height=32, width=32, num_inference_steps=1,
                max_sequence_length=32).parameters[0]["control_lora"] == ours.get_active_adapters()

    for p in (ref, ours):
        p.unload_lora_weights(reset_to_overwritten_params=True)
    assert ours.transformer.config.in_channels == ref.transformer.config.in_channels == 16
    assert ours.transformer.img_in.weight is weight and ours.transformer.img_in.in_features == 16
    assert np.array_equal(run(plain, 8, prompt=PROMPTS[0], height=32, width=32), before)
    with pytest.raises(ValueError, match="load a control LoRA"):
        ours(prompt=PROMPTS[0], control_image=picture(32, 32), height=32, width=32)


def test_unload_without_reset_keeps_the_widened_layer(tiny_dev_dir, tmp_path):
    """As diffusers: unload_lora_weights() alone removes the adapters but keeps img_in widened."""
    ref, ours = load_pair("FluxControlPipeline", tiny_dev_dir)
    name = control_lora(tmp_path, seed=1)
    for p in (ref, ours):
        p.load_lora_weights(str(tmp_path), weight_name=name)
        p.unload_lora_weights()
    assert ours.transformer.config.in_channels == ref.transformer.config.in_channels == 32
    assert ours.get_list_adapters() == {}
    assert_same_images((ref, ours), seed=11, prompt=PROMPTS[0], control_image=picture(32, 32), height=32, width=32)
    ours.unload_lora_weights(reset_to_overwritten_params=True)
    assert ours.transformer.config.in_channels == 16


def test_failed_control_lora_load_restores_the_layer(tiny_dev_dir, tmp_path):
    ours = fluxion.FluxControlPipeline.from_pretrained(tiny_dev_dir)
    weight = ours.transformer.img_in.weight
    with pytest.raises(ValueError, match="to_k"):
        ours.load_lora_weights(str(tmp_path), weight_name=control_lora(tmp_path, broken=True))
    assert ours.transformer.img_in.weight is weight and ours.transformer.config.in_channels == 16
    assert ours.get_list_adapters() == {}


def test_narrow_lora_on_a_widened_layer_is_zero_padded(tiny_dev_dir, tmp_path):
    """After a control LoRA, a LoRA whose x_embedder takes the base's 16 inputs gets zero columns (diffusers'
    _maybe_expand_lora_state_dict), so it adapts the noisy channels only."""
    ours = fluxion.FluxControlPipeline.from_pretrained(tiny_dev_dir)
    ours.load_lora_weights(str(tmp_path), weight_name=control_lora(tmp_path, seed=2), adapter_name="control")
    ours.load_lora_weights(str(tmp_path), weight_name=control_lora(tmp_path, seed=3, x_embedder_in=16),
                           adapter_name="style")
    from fluxion.lora import adapter_pieces

    a = adapter_pieces(ours.transformer, "style")["img_in"][0].A
    assert a.shape == (4, 32) and not a[:, 16:].any()
    ours.unload_lora_weights(reset_to_overwritten_params=True)
    assert ours.transformer.img_in.in_features == 16


# ---------------------------------------------------------------- bad input: ValueError before any model runs


def test_control_checkpoint_refused_by_other_pipelines(tiny_control_dir):
    with pytest.raises(ValueError, match="FluxControlPipeline"):
        fluxion.FluxPipeline.from_pretrained(tiny_control_dir)
    with pytest.raises(ValueError, match="FluxControlPipeline"):
        fluxion.FluxFillPipeline.from_pretrained(tiny_control_dir)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs control_image"),
    (dict(control_image=[picture(32, 32)] * 3, prompt=PROMPTS), "3 control images for 2 prompts"),
    (dict(control_image=torch.zeros(1, 3, 16, 16)), r"must be \[B, 3, 32, 32\]"),
    (dict(control_image=torch.zeros(1, 64, 8)), r"packed control latents .* must be \[B, 64, 16\]"),
    (dict(control_image="edges.png"), "control_image must be"),
])
def test_bad_inputs(pipes, monkeypatch, kwargs, message):
    _, ours = pipes

    def boom(*args, **kw):
        raise AssertionError("a model ran before the input check")

    for name in ("encode_prompt", "encode_image", "decode"):
        monkeypatch.setattr(ours, name, boom)
    kwargs.setdefault("prompt", PROMPTS[0])
    with pytest.raises(ValueError, match=message):
        ours(height=32, width=32, num_inference_steps=2, **kwargs)
