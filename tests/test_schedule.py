"""fluxion.flow: the shifted schedule equals diffusers' FlowMatchEulerDiscreteScheduler; 2x2 packing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fixtures import DEV_SCHEDULER_CONFIG, SCHNELL_SCHEDULER_CONFIG
from fluxion.flow import DEV_SCHEDULE, SCHNELL_SCHEDULE, ScheduleConfig, get_schedule, pack, unpack

RESOLUTIONS = [(256, 256), (512, 512), (768, 1360), (1024, 1024)]
STEPS = [1, 4, 28, 50]


def seq_len(h: int, w: int) -> int:
    return (h // 16) * (w // 16)


def diffusers_sigmas(config: dict, steps: int, image_seq_len: int, sigmas=None) -> np.ndarray:
    """What FluxPipeline feeds its scheduler, and the sigmas (with the final 0) it gets back."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("hw", RESOLUTIONS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize(
    "name, dconfig, ours",
    [
        ("dev", DEV_SCHEDULER_CONFIG, ScheduleConfig.from_dict(DEV_SCHEDULER_CONFIG)),
        ("schnell", SCHNELL_SCHEDULER_CONFIG, ScheduleConfig.from_dict(SCHNELL_SCHEDULER_CONFIG)),
    ],
)
def test_schedule_matches_diffusers(name, dconfig, ours, hw, steps):
    n = seq_len(*hw)
    expected = diffusers_sigmas(dconfig, steps, n)
    got = get_schedule(steps, n, ours)
    assert got.dtype == torch.float32
    assert got.shape == (steps + 1,)
    assert got[0] == 1.0 and got[-1] == 0.0
    assert np.all(np.diff(got.numpy()) < 0), "the schedule must strictly decrease"
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6, rtol=0)


def test_named_configs():
    dev = ScheduleConfig.from_dict(DEV_SCHEDULER_CONFIG)
    assert dev.use_dynamic_shifting and (dev.base_shift, dev.max_shift) == (0.5, 1.15)
    # with dynamic shifting the static shift (3.0 in the dev folder) plays no part
    assert torch.equal(get_schedule(28, 4096, dev), get_schedule(28, 4096, DEV_SCHEDULE))
    assert ScheduleConfig.from_dict(SCHNELL_SCHEDULER_CONFIG).use_dynamic_shifting is False
    assert SCHNELL_SCHEDULE.shift == 1.0


def test_dev_shift_by_hand():
    """mu = 0.5 + 0.65 * (N - 256) / 3840; t' = e^mu / (e^mu + 1/t - 1)."""
    n = seq_len(1024, 1024)  # 4096 tokens: mu = 1.15
    got = get_schedule(4, n, DEV_SCHEDULE).double()
    mu = 1.15
    for t, g in zip([1.0, 0.75, 0.5, 0.25], got[:4].tolist()):
        assert g == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / t - 1), abs=1e-6)
    # schnell: no shift at all
    np.testing.assert_allclose(get_schedule(4, n, SCHNELL_SCHEDULE).numpy(), [1, 0.75, 0.5, 0.25, 0], atol=1e-7)


def test_static_shift_matches_diffusers():
    config = dict(SCHNELL_SCHEDULER_CONFIG, shift=3.0)
    expected = diffusers_sigmas(config, 8, 1024)
    np.testing.assert_allclose(get_schedule(8, 1024, ScheduleConfig.from_dict(config)).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("name, dconfig", [("dev", DEV_SCHEDULER_CONFIG), ("schnell", SCHNELL_SCHEDULER_CONFIG)])
def test_custom_sigmas_match_diffusers(name, dconfig):
    sigmas = [1.0, 0.9, 0.62, 0.4, 0.15]
    expected = diffusers_sigmas(dconfig, len(sigmas), 1024, sigmas=np.array(sigmas))
    got = get_schedule(len(sigmas), 1024, ScheduleConfig.from_dict(dconfig), sigmas=sigmas)
    assert got.shape == (len(sigmas) + 1,)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [1.5, 0.5], [[1.0, 0.5]]])
def test_bad_sigmas(bad):
    with pytest.raises(ValueError, match="sigmas"):
        get_schedule(3, 256, DEV_SCHEDULE, sigmas=bad)


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_inference_steps"):
        get_schedule(0, 256, DEV_SCHEDULE)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(1, 16, 2, 2), (2, 16, 8, 12), (3, 4, 6, 4)])
def test_pack_unpack_round_trip(shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    b, c, hh, ww = shape
    packed = pack(z)
    assert packed.shape == (b, (hh // 2) * (ww // 2), c * 4)
    assert torch.equal(unpack(packed, hh, ww), z)


def test_pack_matches_diffusers():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    expected = FluxPipeline._pack_latents(z, 2, 16, 6, 10)
    assert torch.equal(pack(z), expected)
    # diffusers' _unpack_latents takes image pixels and the vae scale factor (8 -> latent 6x10 for 48x80)
    assert torch.equal(unpack(expected, 6, 10), FluxPipeline._unpack_latents(expected, 48, 80, 8))


def test_pack_channel_order_by_hand():
    """Token (i, j) holds [c0: (0,0) (0,1) (1,0) (1,1), c1: ...] of the 2x2 patch at rows 2i.., cols 2j.."""
    c, hh, ww = 2, 4, 6
    z = torch.arange(c * hh * ww, dtype=torch.float32).reshape(1, c, hh, ww) + 1  # non-zero, all distinct
    packed = pack(z)
    assert packed.shape == (1, 6, 8)
    # first token: top-left patch; channel 0 values 1, 2 (row 0) and 7, 8 (row 1), then channel 1 (offset 24)
    assert packed[0, 0].tolist() == [1, 2, 7, 8, 25, 26, 31, 32]
    # token 1 is the next patch to the right (row-major over the h x w token grid)
    assert packed[0, 1].tolist() == [3, 4, 9, 10, 27, 28, 33, 34]
    # token 3 is the first patch of the second patch row (rows 2-3)
    assert packed[0, 3].tolist() == [13, 14, 19, 20, 37, 38, 43, 44]
    for i in range(2):
        for j in range(3):
            token = packed[0, i * 3 + j]
            for ch in range(c):
                for ph in range(2):
                    for pw in range(2):
                        assert token[ch * 4 + ph * 2 + pw] == z[0, ch, 2 * i + ph, 2 * j + pw]


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(1, 16, 3, 4))
    with pytest.raises(ValueError, match="tokens"):
        unpack(torch.randn(1, 6, 64), 4, 4)
