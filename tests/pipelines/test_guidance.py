"""Guidance over time (#15): guidance_scale / true_cfg_scale as numbers, per-step lists, callables and presets;
the guidance_start / guidance_end window of true CFG. Tiny random dev folder (guidance embedder), seeded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fluxion
from fluxion.flow import get_schedule
from fluxion.model.layers import timestep_embedding
from fluxion.pipelines import guidance as G

SEQ = 16
STEPS = 4
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def dev(tiny_dev_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embed
    return pipe


@pytest.fixture(scope="module")
def schnell(tiny_schnell_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_schnell_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.transformer.config.guidance_embed
    return pipe


def call(pipe, seed=3, **kw):
    kw = {"prompt": "a photo of a red cat on a table", "num_inference_steps": STEPS, "max_sequence_length": SEQ,
          "output_type": "np", **SIZE, **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


# ---------------------------------------------------------------- a constant schedule is the scalar call


CONSTANTS = {
    "preset": lambda v: G.constant(v),
    "string": lambda v: f"constant:{v}",
    "plain string": lambda v: str(v),
    "list": lambda v: [v] * STEPS,
    "tuple": lambda v: (v,) * STEPS,
    "callable": lambda v: (lambda i, s: v),
}


@pytest.mark.parametrize("form", list(CONSTANTS))
@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_constant_guidance_schedule_equals_scalar(dev, form, output_type):
    scalar = call(dev, guidance_scale=4.5, output_type=output_type)
    got = call(dev, guidance_scale=CONSTANTS[form](4.5), output_type=output_type)
    scalar, got = np.asarray(scalar), np.asarray(got)
    assert scalar.std() > 0.01
    assert np.array_equal(got, scalar)
    other = np.asarray(call(dev, guidance_scale=1.5, output_type=output_type))
    assert not np.array_equal(other, scalar)  # the guidance value matters: the comparison can fail


@pytest.mark.parametrize("form", list(CONSTANTS))
def test_constant_true_cfg_schedule_equals_scalar(dev, form):
    kw = dict(negative_prompt="blurry, grey", guidance_scale=2.0)
    scalar = call(dev, true_cfg_scale=2.5, **kw)
    got = call(dev, true_cfg_scale=CONSTANTS[form](2.5), **kw)
    assert np.array_equal(got, scalar)
    assert not np.array_equal(call(dev, true_cfg_scale=1.5, **kw), scalar)
    assert not np.array_equal(call(dev, guidance_scale=2.0), scalar)  # true CFG ran


def test_varying_schedule_changes_the_image(dev):
    base = call(dev, guidance_scale=3.5)
    assert not np.array_equal(call(dev, guidance_scale=[3.5, 3.5, 3.5, 9.0]), base)
    assert not np.array_equal(call(dev, guidance_scale="linear:7:1"), base)
    kw = dict(negative_prompt="blurry", guidance_scale=3.5)
    cfg = call(dev, true_cfg_scale=3.0, **kw)
    assert not np.array_equal(call(dev, true_cfg_scale=[3.0, 3.0, 3.0, 6.0], **kw), cfg)


# ---------------------------------------------------------------- per-step values reach the guidance embedder


def _recorded_guidance(pipe, **kw) -> torch.Tensor:
    """Every input row of the transformer's guidance embedder during one call, in call order."""
    rows = []
    handle = pipe.transformer.guidance_in.register_forward_pre_hook(lambda m, args: rows.append(args[0].clone()))
    try:
        call(pipe, **kw)
    finally:
        handle.remove()
    return torch.cat(rows)


def _embedded(values) -> torch.Tensor:
    return timestep_embedding(torch.tensor(values, dtype=torch.float32), 256)


@pytest.mark.parametrize("schedule", [[7.0, 5.0, 3.0, 1.5], [1.0, 9.0, 2.0, 4.0], "linear:7:2", "cosine:6:1.5",
                                      "step:8:2:0.5"])
def test_per_step_guidance_reaches_the_embedder(dev, schedule):
    expected = G.per_step(schedule, get_schedule(STEPS, 64, dev.schedule), 0, "guidance_scale")
    if isinstance(schedule, list):
        assert expected == schedule
    got = _recorded_guidance(dev, guidance_scale=schedule)
    assert got.shape[0] == STEPS, got.shape  # one row per step (the runner batches them in one pass)
    assert torch.allclose(got, _embedded(expected), atol=1e-6, rtol=0)
    assert not torch.allclose(got, _embedded(expected[::-1]), atol=1e-3, rtol=0)  # order matters


def test_callable_guidance_gets_step_and_sigma(dev):
    seen = []

    def fn(i, sigma):
        seen.append((i, sigma))
        return 2.0 + i + sigma

    got = _recorded_guidance(dev, guidance_scale=fn)
    sigmas = get_schedule(STEPS, 64, dev.schedule)[:-1].tolist()
    assert [i for i, _ in seen] == list(range(STEPS))
    assert np.allclose([s for _, s in seen], sigmas)
    assert torch.allclose(got, _embedded([2.0 + i + s for i, s in enumerate(sigmas)]), atol=1e-6, rtol=0)


def test_per_step_guidance_with_true_cfg(dev):
    """With true CFG batched ([cond; uncond] in one call) each step's value is there for both halves."""
    values = [6.0, 4.0, 3.0, 2.0]
    got = _recorded_guidance(dev, guidance_scale=values, negative_prompt="blurry", true_cfg_scale=2.0)
    assert torch.allclose(got, _embedded(values).repeat_interleave(2, 0), atol=1e-6, rtol=0)


def test_strength_cut_takes_the_tail():
    """A schedule with one value per full step gives the run's tail after a strength cut; presets span the run."""
    sched = get_schedule(6, 64)
    full = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert G.per_step(full, sched, 2, "g") == [4.0, 3.0, 2.0, 1.0]
    assert G.per_step([9.0, 8.0, 7.0, 6.0], sched, 2, "g") == [9.0, 8.0, 7.0, 6.0]  # one per step run
    assert G.per_step("linear:7:1", sched, 2, "g") == [7.0, 5.0, 3.0, 1.0]
    seen = []
    G.per_step(lambda i, s: seen.append((i, s)) or 1.0, sched, 2, "g")
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert np.allclose([s for _, s in seen], sched[2:-1].tolist())
    G.check(full, 6, 4, "g")
    G.check([1.0] * 4, 6, 4, "g")
    with pytest.raises(ValueError, match=r"5 values.*6 steps.*4 run"):
        G.check([1.0] * 5, 6, 4, "g")


def test_strength_cut_in_img2img(dev, tiny_dev_dir):
    """The embedder sees the tail of a full-length schedule after an img2img strength cut."""
    try:
        cls = fluxion.pipelines.FluxImg2ImgPipeline
    except (AttributeError, ImportError):
        pytest.skip("FluxImg2ImgPipeline does not exist yet")
    from PIL import Image

    pipe = cls.from_pipe(dev)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    values = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0]
    rows = []
    h = pipe.transformer.guidance_in.register_forward_pre_hook(lambda m, args: rows.append(args[0].clone()))
    try:
        pipe(prompt="a red cat", image=image, strength=0.5, num_inference_steps=6, guidance_scale=values,
             max_sequence_length=SEQ, output_type="np", generator=torch.Generator().manual_seed(0), **SIZE)
    finally:
        h.remove()
    assert torch.allclose(torch.cat(rows), _embedded([5.0, 4.0, 3.0]), atol=1e-6, rtol=0)


def test_schnell_ignores_guidance_but_checks_it(schnell):
    """No guidance embedder: a schedule changes nothing, but a bad one is still refused."""
    base = call(schnell)
    assert np.array_equal(call(schnell, guidance_scale=[9.0, 1.0, 2.0, 3.0]), base)
    with pytest.raises(ValueError, match="3 values"):
        call(schnell, guidance_scale=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------- presets, parse, window


def _progress_values(preset, n):
    sched = torch.linspace(1, 0, n + 1)
    return G.per_step(preset, sched, 0, "g")


def test_preset_values():
    assert _progress_values(G.constant(3.5), 5) == [3.5] * 5
    assert _progress_values(G.linear(7, 2), 6) == pytest.approx([7, 6, 5, 4, 3, 2])
    cos = _progress_values(G.cosine(7, 2), 5)
    assert cos[0] == pytest.approx(7) and cos[-1] == pytest.approx(2) and cos[2] == pytest.approx(4.5)
    assert cos[1] > 4.5 + (7 - 4.5) / 2  # eases out of the start: above the linear value 5.75
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    assert _progress_values(G.step(8, 2, at=0.5), 5) == [8, 8, 2, 2, 2]  # progress 0, .25 | .5, .75, 1
    assert _progress_values(G.step(8, 2, at=0.4), 6) == [8, 8, 2, 2, 2, 2]  # 0, .2 | .4, ...
    assert _progress_values(G.linear(7, 2), 1) == [7.0]  # one step: the start value
    assert _progress_values(G.linear(1, 5), 3) == [1, 3, 5]  # rising works too


def test_parse():
    assert G.parse("linear:7:2") == G.linear(7, 2)
    assert G.parse(" cosine:7:2 ") == G.cosine(7, 2)
    assert G.parse("step:7:2:0.4") == G.step(7, 2, 0.4)
    assert G.parse("step:7:2") == G.step(7, 2, 0.5)
    assert G.parse("constant:3.5") == G.constant(3.5)
    assert G.parse("4") == G.constant(4)
    for p in (G.linear(7, 2), G.cosine(6, 1.5), G.step(7, 2, 0.4), G.constant(3.5)):
        assert G.parse(str(p)) == p  # the metadata form parses back
    assert G.describe("linear:7:2") == "linear:7:2" and G.describe([1, 2]) == [1.0, 2.0] and G.describe(3.5) == 3.5


@pytest.mark.parametrize("bad", ["linear:7", "linear:7:2:3", "cosine", "constant", "constant:1:2", "step:7",
                                 "step:7:2:0.5:1", "step:7:2:1.5", "quadratic:7:2", "linear:a:2", "", "seven",
                                 "linear:nan:2", "linear:7:inf", "nan", "inf", "-inf", "constant:nan"])
def test_parse_errors(bad):
    with pytest.raises(ValueError):
        G.parse(bad)
    with pytest.raises(ValueError):
        G.check(bad, 4, 4, "guidance_scale")


def test_window():
    v = [5.0] * 4
    assert G.window(v, 0.0, 1.0) == v
    assert G.window(v, 0.5, 1.0) == [1.0, 1.0, 5.0, 5.0]  # i/N < start: off
    assert G.window(v, 0.0, 0.5) == [5.0, 5.0, 1.0, 1.0]  # (i+1)/N > end: off
    assert G.window(v, 0.3, 0.8) == [1.0, 1.0, 5.0, 1.0]  # 0/4, 1/4 < .3: off; 3/4 <= .8: on; 4/4 > .8: off
    assert G.window([2.0, 3.0, 4.0, 5.0], 0.25, 1.0) == [1.0, 3.0, 4.0, 5.0]  # each step keeps its own value
    for start, end in [(0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), ("0", 1.0)]:
        with pytest.raises(ValueError):
            G.check_window(start, end)


def _count_transformer_calls(pipe, **kw):
    batches = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        images = call(pipe, **kw)
    finally:
        h.remove()
    return images, batches


def test_window_skips_the_negative_pass(dev):
    kw = dict(negative_prompt="blurry", true_cfg_scale=3.0, guidance_scale=2.0)
    full, batches = _count_transformer_calls(dev, **kw)
    assert batches == [2] * STEPS  # [cond; uncond] in one call per step
    late, batches = _count_transformer_calls(dev, guidance_start=0.5, **kw)
    assert sorted(batches) == [1] * (STEPS + 2)  # 4 positive passes, 2 negative (steps 2 and 3)
    early, batches = _count_transformer_calls(dev, guidance_end=0.25, **kw)
    assert len(batches) == STEPS + 1
    plain, batches = _count_transformer_calls(dev, guidance_scale=2.0)
    assert batches == [1] * STEPS
    for a, b in [(full, late), (full, early), (late, early), (late, plain), (early, plain)]:
        assert not np.array_equal(a, b)
    # the window is the same as a per-step true-CFG schedule with 1 (off) outside it
    assert np.array_equal(late, call(dev, negative_prompt="blurry", true_cfg_scale=[1.0, 1.0, 3.0, 3.0],
                                     guidance_scale=2.0))
    # a full window is the default
    assert np.array_equal(full, call(dev, guidance_start=0.0, guidance_end=1.0, **kw))


def test_true_cfg_at_one_runs_no_negative_pass(dev):
    img, batches = _count_transformer_calls(dev, negative_prompt="blurry", true_cfg_scale=1.0, guidance_scale=2.0)
    assert batches == [1] * STEPS
    assert np.array_equal(img, call(dev, guidance_scale=2.0))
    _, batches = _count_transformer_calls(dev, negative_prompt="blurry", true_cfg_scale=[1.0, 2.0, 1.0, 1.0],
                                          guidance_scale=2.0)
    assert len(batches) == STEPS + 1


# ---------------------------------------------------------------- bad schedules fail before any model runs


@pytest.fixture
def no_model(dev, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(dev, "encode_prompt", refuse)
    monkeypatch.setattr(dev.transformer, "forward", refuse)
    return dev


@pytest.mark.parametrize("name", ["guidance_scale", "true_cfg_scale"])
@pytest.mark.parametrize("length", [3, 5, 1])
def test_wrong_length_schedule_names_both_lengths(no_model, name, length):
    with pytest.raises(ValueError, match=rf"{name} has {length} values but there are {STEPS} steps"):
        call(no_model, negative_prompt="blurry", **{name: [2.0] * length})


@pytest.mark.parametrize("name", ["guidance_scale", "true_cfg_scale"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, [2.0, math.nan, 2.0, 2.0], [2.0, 2.0, 2.0, math.inf],
                                 "nan", "linear:inf:2", G.constant(math.nan), G.linear(7, math.inf), True,
                                 [2.0, True, 2.0, 2.0], [2.0, "3", 2.0, 2.0], {"a": 1}, object()])
def test_bad_values_rejected_before_any_model_runs(no_model, name, bad):
    with pytest.raises(ValueError, match=name):
        call(no_model, negative_prompt="blurry", **{name: bad})


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.8, 0.2), (-0.5, 1.0), (0.0, 2.0)])
def test_bad_window_rejected_before_any_model_runs(no_model, window):
    with pytest.raises(ValueError, match="guidance_start"):
        call(no_model, negative_prompt="blurry", true_cfg_scale=3.0, guidance_start=window[0], guidance_end=window[1])


@pytest.mark.parametrize("bad", [lambda i, s: math.nan, lambda i, s: math.inf if i == 2 else 3.0])
def test_callable_giving_non_finite_values_rejected(dev, bad):
    with pytest.raises(ValueError, match="guidance_scale must give finite numbers"):
        call(dev, guidance_scale=bad)
    with pytest.raises(ValueError, match="true_cfg_scale must give finite numbers"):
        call(dev, negative_prompt="blurry", true_cfg_scale=bad)
