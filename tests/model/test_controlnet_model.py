"""fluxion's FluxControlNetModel == diffusers' FluxControlNetModel (tiny random nets, float32, 1e-4), through a
diffusers-folder save/load round trip; residual injection rules; summing several nets."""
from __future__ import annotations

import pytest
import torch

from controlnet_fixtures import save_diffusers_controlnet
from fluxion.model.controlnet import FluxControlNetModel, FluxMultiControlNetModel, combine, per_block
from fluxion.model.transformer import BlockResiduals

ATOL = 1e-4


def _inputs(batch=2, n_img=12, n_txt=5, seed=0, pixels=None):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        hidden_states=torch.randn(batch, n_img, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.tensor([0.7] * batch),
        img_ids=torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], -1).float(),
        txt_ids=torch.zeros(n_txt, 3),
    )
    d["controlnet_cond"] = torch.randn(batch, n_img, 16, generator=g) if pixels is None else pixels
    return d


def _compare(ref, ours, inp, guidance=None, mode=None, scale=0.7):
    with torch.no_grad():
        kw = {} if mode is None else {"controlnet_mode": torch.tensor([[mode]] * inp["hidden_states"].shape[0])}
        exp_d, exp_s = ref(**inp, guidance=guidance, conditioning_scale=scale, return_dict=False, **kw)
        got = ours(inp["hidden_states"], inp["img_ids"], inp["encoder_hidden_states"], inp["txt_ids"],
                   inp["timestep"], inp["pooled_projections"], guidance, cond=inp["controlnet_cond"], mode=mode,
                   scale=scale)
    assert len(got.double) == len(exp_d)
    for a, b in zip(got.double, exp_d):
        assert (a - b).abs().max() <= ATOL
    assert len(got.single) == (0 if exp_s is None else len(exp_s))
    for a, b in zip(got.single, exp_s or []):
        assert (a - b).abs().max() <= ATOL
    assert max(float(t.abs().max()) for t in got.double) > 0.01  # non-trivial
    return got


def _load_pair(tmp_path, seed=0, **overrides):
    from diffusers import FluxControlNetModel as Ref

    folder = save_diffusers_controlnet(tmp_path / "net", seed, **overrides)
    return Ref.from_pretrained(str(folder), torch_dtype=torch.float32).eval(), FluxControlNetModel.from_pretrained(folder)


def test_instantx_forward_parity(tmp_path):
    ref, ours = _load_pair(tmp_path)
    assert not ours.config.has_hint_block and ours.config.depth == 2 and ours.config.depth_single_blocks == 3
    got = _compare(ref, ours, _inputs())
    assert not got.repeat


def test_guidance_net_forward_parity(tmp_path):
    ref, ours = _load_pair(tmp_path, seed=1, guidance_embeds=True)
    assert ours.config.guidance_embed
    _compare(ref, ours, _inputs(seed=1), guidance=torch.tensor([3.5, 3.5]))
    inp = _inputs(seed=1)
    with pytest.raises(ValueError, match="guidance"):
        ours(inp["hidden_states"], inp["img_ids"], inp["encoder_hidden_states"], inp["txt_ids"], inp["timestep"],
             inp["pooled_projections"], cond=inp["controlnet_cond"])


def test_union_forward_parity(tmp_path):
    ref, ours = _load_pair(tmp_path, seed=2, num_mode=3)
    assert ours.union and ours.config.num_mode == 3
    for mode in (0, 2):
        _compare(ref, ours, _inputs(seed=2), mode=mode)
    inp = _inputs(seed=2)
    with pytest.raises(ValueError, match="out of range"):
        ours(inp["hidden_states"], inp["img_ids"], inp["encoder_hidden_states"], inp["txt_ids"], inp["timestep"],
             inp["pooled_projections"], cond=inp["controlnet_cond"], mode=3)


def test_hint_block_forward_parity(tmp_path):
    """XLabs style: raw pixels through the hint block (÷8), packed 2x2 (4 channels x 4 = 16 features)."""
    ref, ours = _load_pair(tmp_path, seed=3, conditioning_embedding_channels=4, patch_size=2, num_single_layers=0)
    assert ours.config.has_hint_block and ours.config.patch_size == 2
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    inp = _inputs(seed=3, n_img=6, pixels=pixels)
    got = _compare(ref, ours, inp)
    assert got.repeat and not got.single


def test_fresh_net_adds_nothing():
    from fluxion.model.controlnet import FluxControlNetConfig

    net = FluxControlNetModel(FluxControlNetConfig(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=32,
                                                   num_heads=2, depth=2, depth_single_blocks=1, axes_dim=(4, 6, 6)))
    inp = _inputs()
    r = net(inp["hidden_states"], inp["img_ids"], inp["encoder_hidden_states"], inp["txt_ids"], inp["timestep"],
            inp["pooled_projections"], cond=inp["controlnet_cond"])
    assert all(float(t.abs().max()) == 0 for t in r.double + r.single)


def test_combine_same_kind_sums_samples_and_mixed_kinds_spread_per_block():
    a = BlockResiduals([torch.full((1,), 1.0), torch.full((1,), 2.0)], [torch.full((1,), 5.0)], repeat=False)
    b = BlockResiduals([torch.full((1,), 10.0), torch.full((1,), 20.0)], [torch.full((1,), 50.0)], repeat=False)
    s = combine([a, b], 4, 3)
    assert [float(t) for t in s.double] == [11, 22] and [float(t) for t in s.single] == [55]
    x = BlockResiduals([torch.full((1,), 100.0), torch.full((1,), 200.0)], [], repeat=True)  # XLabs
    m = combine([a, x], 4, 3)
    # block i: a gets samples[i // 2], x gets samples[i % 2]
    assert [float(t) for t in m.double] == [101, 201, 102, 202]
    assert [float(t) for t in m.single] == [5, 5, 5]
    img = torch.zeros(1)
    for i in range(4):  # spreading keeps what each net would add alone
        assert float(m.after_double(i, 4, img)) == float(a.after_double(i, 4, img) + x.after_double(i, 4, img))
    assert len(per_block(x, 4, 3).double) == 4


def test_multi_net_sums_nets(tmp_path):
    net = FluxControlNetModel.from_pretrained(save_diffusers_controlnet(tmp_path / "a", 4))
    net2 = FluxControlNetModel.from_pretrained(save_diffusers_controlnet(tmp_path / "b", 5))
    inp = _inputs(seed=4)
    args = (inp["hidden_states"], inp["img_ids"], inp["encoder_hidden_states"], inp["txt_ids"], inp["timestep"],
            inp["pooled_projections"])
    multi = FluxMultiControlNetModel([net, net2])
    with torch.no_grad():
        got = multi(*args, conds=[inp["controlnet_cond"]] * 2, modes=[None, None], scales=[0.5, 2.0], depth=2,
                    depth_single=3)
        one = net(*args, cond=inp["controlnet_cond"], scale=0.5)
        two = net2(*args, cond=inp["controlnet_cond"], scale=2.0)
    for g, a, b in zip(got.double + got.single, one.double + one.single, two.double + two.single):
        torch.testing.assert_close(g, a + b)
