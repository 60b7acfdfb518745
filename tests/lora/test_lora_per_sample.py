"""Mixed-adapter batching (issue #17): `pipe.lora_per_sample([...])` gives each image of one batched call its own
LoRA set and weights. Checked on the tiny random FLUX.1-dev folder against separate single-image runs (with
`set_adapters`), with and without true CFG (which stacks [cond; uncond] rows), plus no leaks, reset, threads and
the errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fluxion.lora import add_trainable_adapter, attach_adapter
from fluxion.lora import layers as L

PROMPTS = ["a red circle", "a blue square", "a green line"]
KW = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
CFG = dict(negative_prompt="blurry", true_cfg_scale=2.5)


def _randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _clip_pieces(clip, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"):
        mod = clip.get_submodule(name)
        A = torch.randn(2, mod.in_features, generator=g) * 0.3
        B = torch.randn(mod.out_features, 2, generator=g) * 0.3
        out[name] = [L.LoraPiece(A, B, 1.5)]
    return out


@pytest.fixture(scope="module")
def pipe(tiny_dev_dir):
    from fluxion import FluxPipeline

    p = FluxPipeline.from_pretrained(tiny_dev_dir)
    p.set_progress_bar_config(disable=True)
    # "a": transformer (default targets) + CLIP text encoder; "b": transformer only (other layers, rank 3)
    _randomize(add_trainable_adapter(p.transformer, "a", rank=2, generator=torch.Generator().manual_seed(1)), 2)
    attach_adapter(p.clip.model, "a", _clip_pieces(p.clip.model, 3))
    _randomize(add_trainable_adapter(p.transformer, "b", rank=3, targets=["attn.to_out.0", "ff.net.2", "linear2"],
                                     generator=torch.Generator().manual_seed(4)), 5)
    return p


def _one(pipe, prompt, seed, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **KW, **kw).images[0]


def _separate(pipe, **kw):
    """Each image alone: A at 0.8, B at 0.5, then the base model (adapters disabled)."""
    pipe.set_adapters(["a"], [0.8])
    ia = _one(pipe, PROMPTS[0], 10, **kw)
    pipe.set_adapters(["b"], [0.5])
    ib = _one(pipe, PROMPTS[1], 11, **kw)
    pipe.disable_lora()
    try:
        base = _one(pipe, PROMPTS[2], 12, **kw)
    finally:
        pipe.enable_lora()
    return ia, ib, base


def _batched(pipe, weights=({"a": 0.8}, {"b": 0.5}, {}), **kw):
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    pipe.set_adapters(["a", "b"], [1.0, 1.0])  # ignored inside lora_per_sample
    with pipe.lora_per_sample(list(weights)):
        assert L.SAMPLE_WEIGHTS.get() is not None
        out = pipe(PROMPTS, generator=gens, **KW, **kw).images
    assert L.SAMPLE_WEIGHTS.get() is None
    return out


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "true_cfg"])
def test_mixed_batch_equals_separate_runs(pipe, cfg):
    kw = CFG if cfg else {}
    ia, ib, base = _separate(pipe, **kw)
    out = _batched(pipe, **kw)
    # the adapters do change the images (else the test proves nothing)
    assert np.abs(ia - base).max() > 1e-3 and np.abs(ib - base).max() > 1e-3
    pipe.disable_lora()
    try:
        base_a = _one(pipe, PROMPTS[0], 10, **kw)
    finally:
        pipe.enable_lora()
    assert np.abs(ia - base_a).max() > 1e-3
    np.testing.assert_allclose(out[0], ia, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], ib, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[2], base, atol=1e-5, rtol=0)  # no adapter leaks into the plain sample


def test_two_adapters_on_one_sample_and_call_scale(pipe):
    pipe.set_adapters(["a", "b"], [0.3, -0.7])
    both = _one(pipe, PROMPTS[0], 10, joint_attention_kwargs={"scale": 0.5})
    pipe.set_adapters(["b"], [1.2])
    only_b = _one(pipe, PROMPTS[1], 11, joint_attention_kwargs={"scale": 0.5})
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    with pipe.lora_per_sample([{"a": 0.3, "b": -0.7}, {"b": 1.2, "a": 0}]):
        out = pipe(PROMPTS[:2], generator=gens, joint_attention_kwargs={"scale": 0.5}, **KW).images
    np.testing.assert_allclose(out[0], both, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], only_b, atol=1e-5, rtol=0)


def test_reset_after_exception_and_other_threads_see_nothing(pipe):
    seen = {}
    with pytest.raises(RuntimeError, match="boom"):
        with pipe.lora_per_sample([{"a": 1.0}]):
            t = threading.Thread(target=lambda: seen.setdefault("other", L.SAMPLE_WEIGHTS.get()))
            t.start()
            t.join()
            seen["here"] = L.SAMPLE_WEIGHTS.get()
            raise RuntimeError("boom")
    assert seen["other"] is None and seen["here"] is not None
    assert L.SAMPLE_WEIGHTS.get() is None


def test_other_thread_runs_unaffected_during_a_per_sample_call(pipe):
    pipe.set_adapters(["a"], [0.8])
    ref = _one(pipe, PROMPTS[0], 10)
    got = {}

    def other():
        got["img"] = _one(pipe, PROMPTS[0], 10)

    with pipe.lora_per_sample([{}]):  # this thread: no adapter at all
        t = threading.Thread(target=other)
        t.start()
        t.join()
    np.testing.assert_array_equal(got["img"], ref)


def test_errors(pipe):
    with pytest.raises(ValueError, match="'nope'.*not loaded"):
        with pipe.lora_per_sample([{"a": 1.0}, {"nope": 0.5}]):
            pass
    for bad in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="finite number"):
            with pipe.lora_per_sample([{"a": bad}]):
                pass
    with pytest.raises(ValueError, match="one dict per image"):
        with pipe.lora_per_sample({"a": 1.0}):
            pass
    with pytest.raises(ValueError, match="empty"):
        with pipe.lora_per_sample([]):
            pass
    assert L.SAMPLE_WEIGHTS.get() is None
    # wrong count vs the batch: 2 dicts for 3 prompts
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    with pytest.raises(ValueError, match=r"given for 2 images, but this call makes 3"):
        with pipe.lora_per_sample([{"a": 1.0}, {"b": 1.0}]):
            pipe(PROMPTS, generator=gens, **KW)
    assert L.SAMPLE_WEIGHTS.get() is None


def test_fused_adapter_cannot_be_per_sample(pipe):
    pipe.set_adapters(["a"], [0.5])
    pipe.fuse_lora(adapter_names=["a"])
    try:
        with pytest.raises(ValueError, match="'a' is fused"):
            with pipe.lora_per_sample([{"a": 1.0}]):
                pass
        # fused after entering: caught at the layer
        pipe.unfuse_lora()
        with pytest.raises(ValueError, match="'a' is fused"):
            with pipe.lora_per_sample([{"a": 1.0}]):
                pipe.fuse_lora(adapter_names=["a"])
                _one(pipe, PROMPTS[0], 10)
    finally:
        pipe.unfuse_lora()
    assert L.SAMPLE_WEIGHTS.get() is None


def test_num_images_per_prompt(pipe):
    """Two prompts x 2 images: per image weights; text-encoder adapter weights shared within a prompt."""
    pipe.set_adapters(["a", "b"], [0.8, 0.25])
    ref0 = pipe(PROMPTS[0], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], num_images_per_prompt=2,
                **KW).images
    pipe.set_adapters(["a"], [0.4])
    ref1 = pipe(PROMPTS[1], generator=[torch.Generator().manual_seed(s) for s in (3, 4)], num_images_per_prompt=2,
                **KW).images
    pipe.set_adapters(["a", "b"], [0.8, 0.0])
    ref0b = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(2), **KW).images[0]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    with pipe.lora_per_sample([{"a": 0.8, "b": 0.25}, {"a": 0.8, "b": 0.25}, {"a": 0.4}, {"a": 0.4}]):
        out = pipe(PROMPTS[:2], generator=gens, num_images_per_prompt=2, **KW).images
    np.testing.assert_allclose(out, np.concatenate([ref0, ref1]), atol=1e-5, rtol=0)
    # "b" (transformer only) may differ inside a prompt's images
    with pipe.lora_per_sample([{"a": 0.8, "b": 0.25}, {"a": 0.8}, {"a": 0.4}, {"a": 0.4}]):
        out = pipe(PROMPTS[:2], generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)],
                   num_images_per_prompt=2, **KW).images
    np.testing.assert_allclose(out[0], ref0[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], ref0b, atol=1e-5, rtol=0)
    # "a" has a text-encoder part: its weights must agree within a prompt
    with pytest.raises(ValueError, match="share"):
        with pipe.lora_per_sample([{"a": 0.8}, {"a": 0.5}, {}, {}]):
            pipe(PROMPTS[:2], generator=gens, num_images_per_prompt=2, **KW)


def test_unset_hook_path_is_unchanged(pipe):
    """Without lora_per_sample the registry's active adapters apply to every sample (the common path)."""
    pipe.set_adapters(["a"], [0.8])
    alone = _one(pipe, PROMPTS[0], 10)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    out = pipe(PROMPTS[:2], generator=gens, **KW).images
    np.testing.assert_allclose(out[0], alone, atol=1e-5, rtol=0)


def test_call_count_check_helper(pipe):
    pipe._check_lora_per_sample(5)  # nothing set: no check
    with pipe.lora_per_sample([{"a": 1.0}, {}]):
        pipe._check_lora_per_sample(2)
        with pytest.raises(ValueError, match="2 images.*makes 4"):
            pipe._check_lora_per_sample(4)
