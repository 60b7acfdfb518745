"""StepRunner: exact reuse of the text projection, RoPE table and all-steps modulation, and the first-block cache."""
import numpy as np
import pytest
import torch

from fluxion import FluxPipeline
from fluxion.model.step_runner import StepRunner
from fluxion.model.transformer import FluxConfig, FluxTransformer
from fluxion.flow import image_ids, text_ids

CONFIG = FluxConfig(in_channels=16, vec_in_dim=12, context_in_dim=20, hidden_size=32, num_heads=2, depth=2,
                    depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FluxTransformer(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():  # random, non-zero everywhere (adaLN-zero style inits would hide the blocks)
            p.normal_(0, 0.2)
    return m


def step(runner, i, img, img_ids, txt, txt_ids, timesteps, y):
    return runner(i, img, img_ids, txt, txt_ids, timesteps, y)


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, 16, 16, generator=g), img_ids=image_ids(8, 8),
                txt=torch.randn(batch, 5, 20, generator=g), txt_ids=text_ids(5),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, 12, generator=g))


@torch.no_grad()
def test_reused_text_projection_and_rope_change_nothing(model):
    x = inputs()
    cache = StepRunner(model)
    ref = model(**x)
    for t in (0.9, 0.4):  # later steps: new timesteps and latents, same prompt tensors
        x2 = dict(x, timesteps=torch.full((2,), t), img=x["img"] * t)
        assert torch.equal(step(cache, 0, **x2), model(**x2))
    assert torch.equal(step(cache, 0, **x), ref)
    # A new prompt tensor is recomputed, never served stale.
    other = dict(x, txt=torch.randn(2, 5, 20))
    assert torch.equal(step(cache, 0, **other), model(**other))
    assert cache.stats["skipped"] == 0


@torch.no_grad()
def test_fbcache_skips_when_the_first_block_barely_changes(model):
    x = inputs(1)
    cache = StepRunner(model, threshold=0.05)
    step(cache, 0, **x)
    nudged = dict(x, img=x["img"] * (1 + 1e-4))  # a tiny change: the first residual moves far below 5%
    reused = step(cache, 1, **nudged)
    assert cache.stats == {"steps": 2, "skipped": 1}
    assert not torch.equal(reused, model(**nudged))  # the later blocks were not run...
    assert torch.allclose(reused, model(**nudged), atol=1e-2)  # ...and their cached residual stands in well
    moved = dict(x, img=torch.randn(2, 16, 16))  # a large change recomputes everything
    assert torch.allclose(step(cache, 2, **moved), model(**moved), atol=1e-6)
    assert cache.stats == {"steps": 3, "skipped": 1}


@torch.no_grad()
def test_fbcache_compares_with_the_last_full_step_not_the_last_step(model):
    x = inputs(2)
    cache = StepRunner(model, threshold=0.05)
    step(cache, 0, **x)
    for k in range(1, 40):  # small drifts that add up: once past the threshold, a full step must run
        step(cache, k, **dict(x, img=x["img"] * (1 + 0.01 * k)))
    assert 0 < cache.stats["skipped"] < 39


def test_pipeline_fbcache_runs_fewer_full_steps_and_records_it(tiny_schnell_dir):
    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_inference_steps=12, max_sequence_length=16, output_type="np")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    assert base.cache_stats == {"steps": 0, "skipped": 0}  # caching off: nothing counted
    cached = pipe("a red circle", generator=torch.Generator().manual_seed(0), cache="fbcache", cache_threshold=0.9,
                  **kw)
    assert cached.cache_stats["steps"] == 12 and cached.cache_stats["skipped"] > 0
    assert cached.parameters[0]["cache"] == "fbcache:0.9" and base.parameters[0]["cache"] is None
    assert not np.array_equal(cached.images, base.images)
    assert np.abs(cached.images - base.images).mean() < 0.1
    pipe.enable_cache("fbcache", 0.9)  # pipeline-wide, as diffusers' enable_cache
    again = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    assert np.array_equal(again.images, cached.images)
    pipe.disable_cache()
    assert np.array_equal(pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images, base.images)


@pytest.mark.parametrize("kw, match", [(dict(cache="teacache"), "cache must be None or 'fbcache'"),
                                       (dict(cache="fbcache", cache_threshold=0), "cache_threshold must be"),
                                       (dict(cache="fbcache"), "cache_threshold must be")])
def test_bad_cache_arguments_fail_before_sampling(tiny_schnell_dir, kw, match, monkeypatch):
    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded a prompt before the check"))
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", height=32, width=32, **kw)


@torch.no_grad()
def test_conditioning_computed_for_all_steps_at_once_matches_per_step(model):
    x = inputs(3)
    steps = [1.0, 0.75, 0.5, 0.25]
    cache = StepRunner(model, timesteps=steps)
    for i, t in enumerate(steps + [0.6]):  # step 4 is not a planned step: computed on its own
        xt = dict(x, timesteps=torch.full((2,), t), img=x["img"] * t)
        assert torch.allclose(step(cache, i, **xt), model(**xt), rtol=1e-5, atol=1e-5)  # batched matmul rounding
    vec, mods = cache._conditioning(2, torch.full((2,), 0.5), x["y"], None, 2)
    assert torch.allclose(vec, model.conditioning(torch.full((2,), 0.5), x["y"], None), atol=1e-6)
    assert len(mods) == CONFIG.depth + CONFIG.depth_single_blocks + 1
