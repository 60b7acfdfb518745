"""Per-sample guidance (#17): `pipe.guidance_per_sample(guidance_scale=[...], true_cfg_scale=[...])` gives each
image of one call its own distilled guidance and true-CFG scale; each image equals its own separate run.
Tiny random dev folder (guidance embedder), seeded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fluxion
from fluxion.pipelines import per_sample as PS

SEQ = 16
STEPS = 4
SIZE = dict(height=32, width=32)
PROMPTS = ["a photo of a red cat on a table", "a blue house by the sea", "a green apple"]
SEEDS = [3, 7, 11]


@pytest.fixture(scope="module")
def dev(tiny_dev_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embed
    return pipe


def call(pipe, prompt, seeds, **kw):
    kw = {"num_inference_steps": STEPS, "max_sequence_length": SEQ, "output_type": "np", **SIZE, **kw}
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt, generator=gens if len(gens) > 1 else gens[0], **kw)


def alone(pipe, k, **kw):
    return call(pipe, PROMPTS[k], [SEEDS[k]], **kw).images[0]


def test_distilled_guidance_per_image_equals_separate_runs(dev):
    values = [1.5, 3.5, 6.0]
    with dev.guidance_per_sample(guidance_scale=values) as table:
        assert table.guidance == tuple(values) and table.true_cfg is None
        out = call(dev, PROMPTS, SEEDS, guidance_scale=9.0)  # the call's own value is replaced
    for k, g in enumerate(values):
        np.testing.assert_allclose(out.images[k], alone(dev, k, guidance_scale=g), atol=1e-5)
        assert out.parameters[k]["guidance_scale"] == g
    # the values matter: a batch with one value is not the same
    same = call(dev, PROMPTS, SEEDS, guidance_scale=3.5).images
    assert not np.allclose(same[0], out.images[0], atol=1e-4)
    assert PS.SAMPLE_GUIDANCE.get() is None


@pytest.mark.parametrize("cfg", [[1.0, 2.5, 4.0], [3.0, 0.5, 2.0], [2.0, 2.0, 5.0]])
def test_true_cfg_per_image_equals_separate_runs(dev, cfg):
    g = [2.0, 4.0, 3.0]
    neg = ["blurry", "grey, dull", "low quality"]
    with dev.guidance_per_sample(guidance_scale=g, true_cfg_scale=cfg):
        out = call(dev, PROMPTS, SEEDS, negative_prompt=neg, true_cfg_scale=1.0)
    for k in range(3):
        ref = alone(dev, k, guidance_scale=g[k], true_cfg_scale=cfg[k], negative_prompt=neg[k])
        np.testing.assert_allclose(out.images[k], ref, atol=1e-5)
        assert out.parameters[k]["true_cfg_scale"] == (cfg[k] if cfg[k] > 1 else None)


def test_true_cfg_only_and_window(dev):
    cfg = [1.0, 3.0]
    with dev.guidance_per_sample(true_cfg_scale=cfg):
        out = call(dev, PROMPTS[:2], SEEDS[:2], negative_prompt="blurry", guidance_scale=2.5, guidance_start=0.5)
    for k in range(2):
        ref = alone(dev, k, guidance_scale=2.5, true_cfg_scale=cfg[k], negative_prompt="blurry", guidance_start=0.5)
        np.testing.assert_allclose(out.images[k], ref, atol=1e-5)


def test_true_cfg_at_most_one_keeps_the_conditional_prediction_exactly(dev):
    """In a CFG batch, an image with true_cfg <= 1 gets v itself (torch.where), not v_neg + c * (v - v_neg):
    0.5 and 1.0 give the very same image, as a run without CFG does."""
    outs = []
    for low in (0.5, 1.0):
        with dev.guidance_per_sample(true_cfg_scale=[low, 3.0]):
            outs.append(call(dev, PROMPTS[:2], SEEDS[:2], negative_prompt="blurry", guidance_scale=2.0).images)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_allclose(outs[0][0], alone(dev, 0, guidance_scale=2.0), atol=1e-5)


def test_num_images_per_prompt(dev):
    g = [2.0, 5.0, 3.0, 4.0]
    with dev.guidance_per_sample(guidance_scale=g):
        out = call(dev, PROMPTS[:2], [1, 2, 3, 4], num_images_per_prompt=2)
    for k in range(4):
        ref = call(dev, PROMPTS[k // 2], [k + 1], guidance_scale=g[k]).images[0]
        np.testing.assert_allclose(out.images[k], ref, atol=1e-5)


def test_context_var_resets_after_the_call_and_after_an_exception(dev):
    assert PS.SAMPLE_GUIDANCE.get() is None
    with dev.guidance_per_sample(guidance_scale=[2.0]):
        assert PS.SAMPLE_GUIDANCE.get() is not None
        call(dev, PROMPTS[0], [1], num_inference_steps=1)
    assert PS.SAMPLE_GUIDANCE.get() is None

    def boom(pipe, i, t, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with dev.guidance_per_sample(guidance_scale=[2.0]):
            call(dev, PROMPTS[0], [1], num_inference_steps=1, callback_on_step_end=boom)
    assert PS.SAMPLE_GUIDANCE.get() is None


@pytest.fixture
def no_model(dev, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(dev, "encode_prompt", refuse)
    monkeypatch.setattr(dev.transformer, "forward", refuse)
    return dev


@pytest.mark.parametrize("kw, match", [
    (dict(guidance_scale=[2.0, 3.0]), "for 2 images, but this call makes 3"),
    (dict(true_cfg_scale=[2.0] * 4), "for 4 images, but this call makes 3"),
])
def test_count_mismatch_is_a_value_error_before_any_model_runs(no_model, kw, match):
    with pytest.raises(ValueError, match=match):
        with no_model.guidance_per_sample(**kw):
            call(no_model, PROMPTS, SEEDS, negative_prompt="blurry")
    assert PS.SAMPLE_GUIDANCE.get() is None


@pytest.mark.parametrize("kw, match", [
    (dict(guidance_scale=[2.0, math.nan]), r"guidance_scale\[1\] must be a finite number"),
    (dict(true_cfg_scale=[math.inf]), r"true_cfg_scale\[0\] must be a finite number"),
    (dict(guidance_scale=["3"]), "must be a finite number"),
    (dict(guidance_scale=[True]), "must be a finite number"),
    (dict(guidance_scale=3.0), "one number per image"),
    (dict(guidance_scale=[]), "at least one image"),
    (dict(guidance_scale=[1.0, 2.0], true_cfg_scale=[2.0]), "2 values and true_cfg_scale 1"),
])
def test_bad_values_are_value_errors(no_model, kw, match):
    with pytest.raises(ValueError, match=match):
        with no_model.guidance_per_sample(**kw):
            pass
    assert PS.SAMPLE_GUIDANCE.get() is None


def test_both_none_is_a_plain_call(dev):
    with dev.guidance_per_sample() as table:
        assert table is None
        got = call(dev, PROMPTS[0], [5], guidance_scale=2.0).images[0]
    np.testing.assert_array_equal(got, call(dev, PROMPTS[0], [5], guidance_scale=2.0).images[0])
