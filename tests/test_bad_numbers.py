"""Issue #16, classes 3 (non-finite numbers), 4 (silent substitution) and 10 (unbounded requests), on the
pipelines' core, and property tests (hypothesis) over the numeric and size arguments: every value either is
accepted and gives a finite image, or raises a ValueError naming the argument before any model runs."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fluxion
from fluxion import CheckpointError
from fluxion.lora import layers as L

GOOD = dict(prompt="a red cat", height=16, width=16, num_inference_steps=2, output_type="np", max_sequence_length=16)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pipe(tiny_dev_dir):
    p = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir)
    p.set_progress_bar_config(disable=True)
    return p


class Guard:
    """Counts model calls; `strict` makes any call fail (argument errors must come first)."""

    def __init__(self, pipe):
        self.calls, self.strict = 0, False
        self.modules = (pipe.transformer, pipe.clip.model, pipe.t5.model, pipe.vae.decoder, pipe.vae.encoder)
        self.handles = [m.register_forward_pre_hook(self.hook) for m in self.modules]

    def hook(self, module, args):
        self.calls += 1
        if self.strict:
            raise AssertionError("a model ran before the arguments were checked")

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def guard(pipe):
    g = Guard(pipe)
    yield g
    g.remove()


def call(pipe, **changes):
    return pipe(**{**GOOD, "generator": torch.Generator().manual_seed(0), **changes})


# ---------------------------------------------------------------- class 3: non-finite numbers


@pytest.mark.parametrize("name, value", [
    ("guidance_scale", NAN), ("guidance_scale", INF), ("true_cfg_scale", NAN), ("guidance_scale", [1.0, NAN]),
    ("latents", "nan"), ("prompt_embeds", "nan"), ("sigmas", [1.0, NAN]), ("cache_threshold", NAN),
])
def test_non_finite_arguments_are_refused_before_work(pipe, guard, name, value):
    guard.strict = True
    changes = {name: value}
    if value == "nan":
        shape = {"latents": (1, 16, 16), "prompt_embeds": (1, 16, 32)}[name]
        t = torch.randn(shape)
        t[0, 0, 0] = NAN
        changes[name] = t
        if name == "prompt_embeds":
            changes.update(prompt=None, pooled_prompt_embeds=torch.randn(1, 32))
    if name == "true_cfg_scale":
        changes["negative_prompt"] = "blurry"
    if name == "cache_threshold":
        changes["cache"] = "fbcache"
    if name == "sigmas":
        changes["num_inference_steps"] = None
    with pytest.raises(ValueError, match=name.split("_scale")[0]):
        call(pipe, **changes)


def test_latents_that_turn_non_finite_stop_with_the_step_named(pipe, tmp_path):
    def poison(p, i, t, tensors):
        x = tensors["latents"]
        return {"latents": x * INF} if i == 1 else tensors

    with pytest.raises(ValueError, match="NaN or infinite at step 2 of 3"):
        call(pipe, num_inference_steps=3, callback_on_step_end=poison)


def test_non_finite_weights_stop_the_generation(tiny_dev_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.transformer.single_blocks[0].linear2.weight[0, 0] = NAN
    with pytest.raises(ValueError, match="step 1 of 2"):
        call(pipe)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_lora_scales_must_be_finite(pipe, bad):
    with pytest.raises(ValueError, match="scale"):
        call(pipe, joint_attention_kwargs={"scale": bad})
    with pytest.raises(ValueError, match="lora_scale"):
        L.fuse_lora(pipe.transformer, lora_scale=bad)
    with pytest.raises(ValueError, match="adapter weights"):
        L.normalize_weights(["a", "b"], bad)


# ---------------------------------------------------------------- class 4: an explicit value is valid or an error


@pytest.mark.parametrize("name, value", [("height", 0), ("width", 0), ("max_sequence_length", 0),
                                         ("num_inference_steps", 0), ("num_images_per_prompt", 0)])
def test_zero_is_not_unset(pipe, guard, name, value):
    guard.strict = True
    with pytest.raises(ValueError, match=name):
        call(pipe, **{name: value})


@pytest.mark.parametrize("sigmas", [[0.5, 1.0], [1.0, 0.5, 0.5], [True, 0.5]])
def test_unsorted_or_repeated_sigmas(pipe, guard, sigmas):
    guard.strict = True
    with pytest.raises(ValueError, match="strictly decreasing"):
        call(pipe, sigmas=sigmas, num_inference_steps=None)


def test_a_folder_without_model_index_is_refused(tiny_dev_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_dev_dir, copy)
    (copy / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        fluxion.FluxPipeline.from_pretrained(copy)


def test_cli_limits_and_budgets_are_checked(tmp_path, capsys):
    from fluxion.cli import main
    from fluxion.eval.run import run_eval

    assert main(["generate", "x", "--max-memory", "-1", "--out", str(tmp_path / "a.png")]) == 2
    assert "--max-memory" in capsys.readouterr().err
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit"):
            run_eval(limit=limit)
    assert not (tmp_path / "a.png").exists()


# ---------------------------------------------------------------- class 10: unbounded requests


def test_a_size_that_cannot_fit_is_refused_with_the_estimate(pipe, guard):
    guard.strict = True
    with pytest.raises(ValueError, match=r"100000x100000 image .* GiB of activations"):
        call(pipe, height=100000, width=100000)


# ---------------------------------------------------------------- property tests


ANY_NUMBER = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.none())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(-64, 64), width=st.integers(-8, 40),
       steps=st.one_of(st.integers(-3, 3), st.floats(allow_nan=True)), guidance=ANY_NUMBER,
       seq=st.one_of(st.integers(-2, 600), st.booleans()), n=st.integers(-1, 2))
def test_numeric_arguments_are_accepted_with_a_finite_image_or_refused_by_name(pipe, height, width, steps, guidance,
                                                                               seq, n):
    g = Guard(pipe)
    kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=seq,
              num_images_per_prompt=n)
    try:
        images = call(pipe, **kw).images
    except ValueError as e:
        names = {"height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length",
                 "num_images_per_prompt"}
        assert any(name in str(e) for name in names), str(e)
        assert g.calls == 0, f"a model ran before {e}"
    else:
        assert np.isfinite(images).all() and images.shape[0] == n
    finally:
        g.remove()


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                       st.lists(st.floats(allow_nan=True), max_size=4)))
def test_guidance_schedules_parse_or_fail_by_name(value):
    from fluxion.pipelines import guidance as G

    try:
        G.check(value, 2, 2, "guidance_scale")
        values = G.per_step(value, torch.tensor([1.0, 0.5, 0.0]), 0, "guidance_scale")
    except ValueError as e:
        assert "guidance" in str(e)
    else:
        assert len(values) == 2 and all(math.isfinite(v) for v in values)
