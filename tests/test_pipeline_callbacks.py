"""callback_on_step_end behaves as diffusers': called after every step with the latents, which it may replace."""
import numpy as np
import torch

from fluxion import FluxPipeline


def test_callback_sees_every_step_and_can_replace_latents(tiny_schnell_dir):
    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def record(p, i, t, tensors):
        assert p is pipe
        seen.append((i, float(t), tensors["latents"].shape))
        return tensors

    kw = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, output_type="np")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=record, **kw).images
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert np.allclose([t for _, t, _ in seen], [1000.0, 1000 * 2 / 3, 1000 / 3], atol=1e-3)

    def zero_after_last(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else tensors

    zeroed = pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=zero_after_last,
                  **kw).images
    assert not np.allclose(zeroed, base)
    assert zeroed.std() < base.std()  # all-zero latents decode to a flat-ish image
