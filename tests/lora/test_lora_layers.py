"""Adapters on fluxion's (fused) Linear layers: several at once, weights, disable, delete, fuse / unfuse
(bit-exact), unload (base model exactly), hotswap, trainable adapters. Checked against hand-merged
weights W + sum(weight * alpha/r * B @ A) on a tiny random FluxTransformer (float32, no files)."""
from __future__ import annotations

import copy

import pytest
import torch

from fixtures import randomize_parameters_
from fluxion.lora import (
    DEFAULT_TARGETS,
    LoraPiece,
    active_adapters,
    adapter_parameters,
    add_trainable_adapter,
    attach_adapter,
    delete_adapters,
    enable_lora,
    fuse_lora,
    hotswap_adapter,
    list_adapters,
    set_adapters,
    unfuse_lora,
    unload_lora,
)
from fluxion.lora.layers import LAYER_ATTR, REGISTRY_ATTR
from fluxion.model.transformer import FluxConfig, FluxTransformer

H = 32  # hidden size of the tiny model; mlp hidden 128; linear1 rows = 3*32 + 128


def tiny_transformer(seed=0) -> FluxTransformer:
    cfg = FluxConfig(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=H, num_heads=2, depth=2,
                     depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=True)
    return randomize_parameters_(FluxTransformer(cfg), seed=seed).eval()


def inputs(seed=0, n=12, length=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 3)
    ids[:, 1] = torch.arange(n) // 4
    ids[:, 2] = torch.arange(n) % 4
    return dict(img=torch.randn(1, n, 16, generator=g), img_ids=ids, txt=torch.randn(1, length, 32, generator=g),
                txt_ids=torch.zeros(length, 3), timesteps=torch.tensor([0.7]), y=torch.randn(1, 32, generator=g),
                guidance=torch.tensor([3.5]))


def run(model, x):
    with torch.no_grad():
        return model(**x)


def rand_piece(module, rows=None, rank=3, alpha=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_rows = module.out_features if rows is None else rows[1] - rows[0]
    A = torch.randn(rank, module.in_features, generator=g) * 0.3
    B = torch.randn(n_rows, rank, generator=g) * 0.3
    return LoraPiece(A, B, alpha / rank, rows)


def adapter(model, seed, rank=3, alpha=5.0):
    """Pieces on a mix of full layers and row blocks of fused ones (q/k/v of linear1, k of a qkv)."""
    m = model.get_submodule
    plan = {
        "double_blocks.0.img_attn.qkv": [None],
        "double_blocks.0.txt_attn.qkv": [(H, 2 * H)],  # the k block only
        "double_blocks.1.img_attn.proj": [None],
        "double_blocks.1.img_mlp.0": [None],
        "double_blocks.0.txt_mlp.2": [None],
        "single_blocks.0.linear1": [(0, H), (H, 2 * H), (2 * H, 3 * H)],  # q, k, v: not the mlp rows
        "single_blocks.1.linear1": [(3 * H, 7 * H)],  # the mlp rows only
        "single_blocks.1.linear2": [None],
        "final_layer.adaLN_modulation.1": [None],
        "img_in": [None],
    }
    out, k = {}, seed * 100
    for name, rows_list in plan.items():
        for rows in rows_list:
            k += 1
            out.setdefault(name, []).append(rand_piece(m(name), rows, rank, alpha, seed=k))
    return out


def merged(model, adapters_and_factors):
    """A copy of `model` with every piece merged by hand: W[rows] += factor * scale * B @ A."""
    ref = copy.deepcopy(model)
    unload_lora(ref)
    with torch.no_grad():
        for pieces, factor in adapters_and_factors:
            for name, plist in pieces.items():
                w = ref.get_submodule(name).weight
                for p in plist:
                    a, b = p.rows if p.rows is not None else (0, w.shape[0])
                    w[a:b] += factor * p.scale * (p.B @ p.A)
    return ref


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, snap):
    now = model.state_dict()
    assert list(now) == list(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


def assert_clean(model):
    assert REGISTRY_ATTR not in model.__dict__
    for name, mod in model.named_modules():
        assert LAYER_ATTR not in mod.__dict__, name
        assert not mod._forward_hooks, name


def test_one_adapter_equals_merged_weights_and_keeps_state_dict():
    model, x = tiny_transformer(), inputs()
    base_out, snap = run(model, x), snapshot(model)
    a = adapter(model, 1)
    attach_adapter(model, "a", a)
    assert list_adapters(model) == ["a"] and active_adapters(model) == ["a"]
    assert_state_equal(model, snap)  # adapters are not parameters of the model, base untouched
    out = run(model, x)
    assert (out - base_out).abs().max() > 1e-2
    torch.testing.assert_close(out, run(merged(model, [(a, 1.0)]), x), atol=1e-5, rtol=1e-5)


def test_two_adapters_with_weights_disable_enable_delete():
    model, x = tiny_transformer(), inputs()
    base_out = run(model, x)
    a, b = adapter(model, 1), adapter(model, 2, rank=2, alpha=1.5)
    attach_adapter(model, "a", a)
    attach_adapter(model, "b", b)
    assert active_adapters(model) == ["b"]  # like diffusers: the newest is the active one
    torch.testing.assert_close(run(model, x), run(merged(model, [(b, 1.0)]), x), atol=1e-5, rtol=1e-5)

    set_adapters(model, ["a", "b"], [0.8, 0.5])
    both = run(model, x)
    torch.testing.assert_close(both, run(merged(model, [(a, 0.8), (b, 0.5)]), x), atol=1e-5, rtol=1e-5)

    enable_lora(model, False)
    assert torch.equal(run(model, x), base_out)
    enable_lora(model, True)
    assert torch.equal(run(model, x), both)

    delete_adapters(model, "a")
    assert list_adapters(model) == ["b"] and active_adapters(model) == ["b"]
    torch.testing.assert_close(run(model, x), run(merged(model, [(b, 0.5)]), x), atol=1e-5, rtol=1e-5)
    delete_adapters(model, ["b"])
    assert_clean(model)
    assert torch.equal(run(model, x), base_out)
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        set_adapters(model, ["zzz"])


def test_fuse_unfuse_bit_exact_then_unload_gives_base_exactly():
    model, x = tiny_transformer(), inputs()
    base_out, snap = run(model, x), snapshot(model)
    a, b = adapter(model, 1), adapter(model, 2, rank=2, alpha=1.5)
    attach_adapter(model, "a", a)
    attach_adapter(model, "b", b)
    set_adapters(model, ["a", "b"], [0.8, 0.5])
    unfused = run(model, x)

    hand = merged(model, [(a, 0.8 * 0.7), (b, 0.5 * 0.7)])
    fuse_lora(model, lora_scale=0.7)
    for name, w in hand.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, x), run(hand, x), atol=1e-5, rtol=1e-5)  # fused ones not added twice

    unfuse_lora(model)
    assert_state_equal(model, snap)  # bit-exact restoration
    assert torch.equal(run(model, x), unfused)

    # fuse one adapter, then the other (the backup merges), then unfuse: still bit-exact
    fuse_lora(model, adapter_names=["b"])
    fuse_lora(model, adapter_names=["a"])
    with pytest.raises(ValueError, match="already fused"):
        fuse_lora(model, adapter_names=["a"])
    with pytest.raises(ValueError, match="unfuse"):
        delete_adapters(model, ["a"])
    unfuse_lora(model)
    assert_state_equal(model, snap)

    unload_lora(model)
    assert_clean(model)
    assert_state_equal(model, snap)
    assert torch.equal(run(model, x), base_out)


def test_fuse_then_unload_keeps_the_lora_baked_in():
    """diffusers' idiom: fuse_lora() + unload_lora_weights() leaves a merged model without adapters."""
    model, x = tiny_transformer(), inputs()
    a = adapter(model, 3)
    attach_adapter(model, "a", a)
    with_lora = run(model, x)
    fuse_lora(model)
    unload_lora(model)
    assert_clean(model)
    torch.testing.assert_close(run(model, x), with_lora, atol=1e-5, rtol=1e-5)


def test_bad_adapters_change_nothing():
    model, x = tiny_transformer(), inputs()
    base_out, snap = run(model, x), snapshot(model)
    good = rand_piece(model.img_in)
    bad = LoraPiece(torch.randn(3, 7), torch.randn(H, 3), 1.0)
    with pytest.raises(ValueError, match=r"txt_in: A has shape \[3, 7\], txt_in needs \[3, 32\]"):
        attach_adapter(model, "x", {"img_in": [good], "txt_in": [bad]})
    with pytest.raises(ValueError, match="rows"):
        attach_adapter(model, "x", {"single_blocks.0.linear1": [rand_piece(model.img_in, rows=(7 * H, 8 * H))]})
    with pytest.raises(ValueError, match="no layer"):
        attach_adapter(model, "x", {"nope.linear": [good]})
    with pytest.raises(ValueError, match="not a Linear"):
        attach_adapter(model, "x", {"double_blocks.0.img_attn.norm.query_norm": [good]})
    assert_clean(model)
    assert_state_equal(model, snap)
    assert torch.equal(run(model, x), base_out)
    attach_adapter(model, "x", {"img_in": [good]})
    with pytest.raises(ValueError, match="already loaded"):
        attach_adapter(model, "x", {"img_in": [good]})


def test_hotswap_replaces_weights_in_place():
    model, x = tiny_transformer(), inputs()
    a, b = adapter(model, 1), adapter(model, 2)
    attach_adapter(model, "a", a)
    objects = [p.A for plist in a.values() for p in plist]
    hotswap_adapter(model, "a", b)
    assert [p.A for plist in a.values() for p in plist] == objects  # same tensors, new values
    torch.testing.assert_close(run(model, x), run(merged(model, [(b, 1.0)]), x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="other shapes"):
        hotswap_adapter(model, "a", adapter(model, 3, rank=2))


def test_trainable_adapter_default_targets_zero_start_and_gradients():
    model, x = tiny_transformer(), inputs()
    base_out = run(model, x)
    model.requires_grad_(False)
    params = add_trainable_adapter(model, "train", rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    from fluxion.lora import adapter_pieces

    plan = {name: [p.rows for p in plist] for name, plist in adapter_pieces(model, "train").items()}
    qkv = [(0, H), (H, 2 * H), (2 * H, 3 * H)]
    expected = {}
    for i in range(2):
        d = f"double_blocks.{i}"
        expected |= {f"{d}.img_attn.qkv": qkv, f"{d}.txt_attn.qkv": qkv, f"{d}.img_attn.proj": [None],
                     f"{d}.txt_attn.proj": [None], f"{d}.img_mlp.0": [None], f"{d}.img_mlp.2": [None],
                     f"{d}.txt_mlp.0": [None], f"{d}.txt_mlp.2": [None]}
    for i in range(2):
        expected[f"single_blocks.{i}.linear1"] = qkv  # the recipe's to_q/to_k/to_v hit single blocks too
    assert plan == expected
    assert len(DEFAULT_TARGETS) == 12
    assert len(params) == 2 * sum(len(v) for v in expected.values())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert params == adapter_parameters(model, "train")
    assert torch.equal(run(model, x), base_out)  # B = 0: the model is unchanged at the start

    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.1)
    loss = model(**x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters())

    with pytest.raises(ValueError, match="matches no Linear"):
        add_trainable_adapter(model, "t2", targets=["attn.to_nothing"])
    # original names adapt whole layers
    add_trainable_adapter(model, "t3", rank=2, targets=["linear2"])
    assert {n: [p.rows for p in pl] for n, pl in adapter_pieces(model, "t3").items()} == {
        "single_blocks.0.linear2": [None], "single_blocks.1.linear2": [None]}


def test_joint_attention_kwargs_scale_scales_adapters_for_one_call(tiny_schnell_dir):
    import numpy as np

    from fluxion import FluxPipeline
    from fluxion.lora import add_trainable_adapter

    pipe = FluxPipeline.from_pretrained(tiny_schnell_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    params = add_trainable_adapter(pipe.transformer, "t", rank=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    full = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    off = pipe("a red circle", generator=torch.Generator().manual_seed(0), joint_attention_kwargs={"scale": 0.0},
               **kw).images
    half = pipe("a red circle", generator=torch.Generator().manual_seed(0), joint_attention_kwargs={"scale": 0.5},
                **kw).images
    assert np.abs(full - base).max() > 1e-3
    np.testing.assert_array_equal(off, base)
    assert 0 < np.abs(half - base).max() < np.abs(full - base).max()
    again = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(again, full)  # the scale lasted one call
