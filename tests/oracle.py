"""Test helpers (not tests): load a fluxion pipeline and its diffusers twin on the same tiny folder, call both
with the same seed, compare images. diffusers is the test-only oracle."""
from __future__ import annotations

import numpy as np
import torch

import fluxion

ATOL = 1e-4
SEQ = 32  # T5 tokens: short keeps the tests fast; both pipelines get the same value


def load_pair(class_name: str, folder, **ours_kwargs):
    """(diffusers pipeline, fluxion pipeline) of the same class name on `folder`, float32, no progress bars."""
    import diffusers

    ref = getattr(diffusers, class_name).from_pretrained(str(folder), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = getattr(fluxion, class_name).from_pretrained(folder, torch_dtype=torch.float32, **ours_kwargs)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def run(pipe, seed=None, **kwargs):
    """Call with a fresh generator from `seed` (a list of seeds gives a list of generators)."""
    if isinstance(seed, list):
        kwargs["generator"] = [torch.Generator().manual_seed(s) for s in seed]
    elif seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    kwargs.setdefault("max_sequence_length", SEQ)
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    return pipe(**kwargs).images


def as_array(images):
    if isinstance(images, torch.Tensor):
        return images.numpy()
    if isinstance(images, list):
        return np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])
    return images


def assert_same_images(pipes, seed=None, atol=ATOL, **kwargs):
    """Both pipelines, same arguments and seed: the same images within `atol`; returns ours."""
    ref, ours = pipes
    expected = as_array(run(ref, seed, **kwargs))
    got = as_array(run(ours, seed, **kwargs))
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = np.abs(got - expected).max()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"
    assert expected.std() > 0.01  # a non-trivial image
    return got
