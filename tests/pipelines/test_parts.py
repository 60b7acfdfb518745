"""Pipelines expose their parts under diffusers' names, take any of them as replacements, and `from_pipe`
shares them without reloading; per-call state (LoRA call scale, cache stats) is never stored on shared objects."""
import threading

import numpy as np
import pytest
import torch

import fluxion
from fluxion.lora import layers as L
from fluxion.pipelines.base import PART_NAMES

KW = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")


def image(pipe, seed=0, **kw):
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


@pytest.fixture(scope="module")
def pipe(tiny_dev_dir):
    p = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir)
    p.set_progress_bar_config(disable=True)
    return p


def test_parts_under_diffusers_names(pipe):
    import transformers

    assert isinstance(pipe.text_encoder, transformers.CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, transformers.T5EncoderModel)
    assert pipe.tokenizer is pipe.clip.tokenizer and pipe.tokenizer_2 is pipe.t5.tokenizer
    assert pipe.scheduler is pipe.schedule
    assert set(pipe.components) == set(PART_NAMES)
    assert pipe.components["transformer"] is pipe.transformer and pipe.components["vae"] is pipe.vae


def test_from_pretrained_takes_every_part(pipe, tiny_dev_dir):
    again = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, **pipe.components)
    for name in PART_NAMES:
        assert getattr(again, name) is getattr(pipe, name), name
    np.testing.assert_array_equal(image(again), image(pipe))


def test_scheduler_part_as_diffusers_passes_it(pipe, tiny_dev_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler  # the oracle's scheduler object, as a script passes it

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_dev_dir), subfolder="scheduler")
    again = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, scheduler=sched, transformer=pipe.transformer)
    assert again.scheduler == pipe.scheduler
    shifted = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, transformer=pipe.transformer,
                                                   scheduler={"use_dynamic_shifting": False, "shift": 3.0})
    assert not np.array_equal(image(shifted), image(pipe))  # the given schedule is the one used
    with pytest.raises(ValueError, match="scheduler must be"):
        fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, scheduler=42)


@pytest.mark.parametrize("name", ["FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline"])
def test_from_pipe_shares_the_loaded_parts(pipe, name):
    cls = getattr(fluxion, name)
    other = cls.from_pipe(pipe)
    assert type(other) is cls
    for part in PART_NAMES:
        assert getattr(other, part) is getattr(pipe, part), part
    assert other.model_path == pipe.model_path and other.device == pipe.device


def test_from_pipe_text_to_image_is_the_same_pipeline(pipe):
    np.testing.assert_array_equal(image(fluxion.FluxPipeline.from_pipe(pipe)), image(pipe))


def test_lora_call_scale_is_per_thread(pipe):
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def scaled():
        with pipe.lora_scale(0.25):
            seen["scaled"] = L.CALL_SCALE.get()
            inside.set()
            done.wait(5)

    t = threading.Thread(target=scaled)
    t.start()
    inside.wait(5)
    seen["other"] = L.CALL_SCALE.get()  # another request while the first is inside its scaled call
    done.set()
    t.join()
    assert seen == {"scaled": 0.25, "other": 1.0}


def test_cache_stats_come_with_each_call_not_on_the_pipeline(pipe):
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), cache="fbcache", cache_threshold=5.0, **KW)
    assert out.cache_stats["steps"] == 2 and out.cache_stats["skipped"] == 1
    assert not hasattr(pipe, "last_cache_stats")
