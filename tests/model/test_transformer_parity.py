"""fluxion's FluxTransformer == diffusers' FluxTransformer2DModel (float32, 1e-4), from every checkpoint layout.

diffusers is the oracle only: it loads the tiny random folders built by tests/fixtures.py.
"""
from __future__ import annotations

import json

import pytest
import torch

import fluxion
from fixtures import TINY_TRANSFORMER_CONFIG, write_original_transformer_file
from fluxion.model import FluxTransformer, count_parameters, preset

ATOL = 1e-4
IN_CH = TINY_TRANSFORMER_CONFIG["in_channels"]
CTX = TINY_TRANSFORMER_CONFIG["joint_attention_dim"]
POOLED = TINY_TRANSFORMER_CONFIG["pooled_projection_dim"]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flavour(request, tiny_dev_dir, tiny_schnell_dir):
    """(name, pipeline folder, diffusers transformer)."""
    from diffusers import FluxTransformer2DModel

    folder = tiny_dev_dir if request.param == "dev" else tiny_schnell_dir
    ref = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32).eval()
    return request.param, folder, ref


def random_inputs(batch=2, n_img=12, n_txt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, n_img, IN_CH, generator=g),
        txt=torch.randn(batch, n_txt, CTX, generator=g),
        y=torch.randn(batch, POOLED, generator=g),
        timesteps=torch.rand(batch, generator=g) * 0.9 + 0.05,
        guidance=torch.rand(batch, generator=g) * 4 + 1,
        # random integer positions on all three axes, so every RoPE axis matters
        img_ids=torch.randint(0, 9, (n_img, 3), generator=g).float(),
        txt_ids=torch.randint(0, 5, (n_txt, 3), generator=g).float(),
    )


@torch.no_grad()
def reference_forward(ref, x) -> torch.Tensor:
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"] if ref.config.guidance_embeds else None,
        return_dict=False,
    )[0]


@torch.no_grad()
def our_forward(model, x, img_ids=None, txt_ids=None) -> torch.Tensor:
    return model(
        x["img"],
        x["img_ids"] if img_ids is None else img_ids,
        x["txt"],
        x["txt_ids"] if txt_ids is None else txt_ids,
        x["timesteps"],
        x["y"],
        x["guidance"] if model.config.guidance_embed else None,
    )


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"


def check_parity(model: FluxTransformer, ref, name: str):
    assert model.config.guidance_embed is (name == "dev")
    assert model.dtype == torch.float32
    assert count_parameters(model) == sum(p.numel() for p in ref.parameters())
    x = random_inputs(seed=1)
    expected = reference_forward(ref, x)
    assert expected.abs().mean() > 0.1  # non-trivial output
    assert_close(our_forward(model, x), expected)


# ---------------------------------------------------------------- checkpoint layouts


def test_from_diffusers_transformer_folder(flavour):
    name, folder, ref = flavour
    check_parity(fluxion.load_transformer(folder / "transformer"), ref, name)


def test_from_pipeline_root_folder(flavour):
    name, folder, ref = flavour
    check_parity(fluxion.load_transformer(folder, torch_dtype=torch.float32), ref, name)


def test_from_original_single_file(flavour, tmp_path):
    name, folder, ref = flavour
    path = write_original_transformer_file(folder, tmp_path / "flux1-tiny.safetensors")
    check_parity(fluxion.load_transformer(path, axes_dim=TINY_TRANSFORMER_CONFIG["axes_dims_rope"]), ref, name)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_from_prefixed_original_file(flavour, tmp_path, prefix):
    name, folder, ref = flavour
    path = write_original_transformer_file(folder, tmp_path / "prefixed.safetensors", prefix=prefix)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert all(k.startswith(prefix) for k in f.keys())
    check_parity(fluxion.load_transformer(path, axes_dim=(4, 6, 6)), ref, name)


def test_from_sharded_diffusers_folder(flavour, tmp_path):
    name, _, ref = flavour
    out = tmp_path / "sharded"
    ref.save_pretrained(str(out), max_shard_size="50KB", safe_serialization=True)
    index = list(out.glob("*.safetensors.index.json"))
    shards = list(out.glob("*.safetensors"))
    assert len(index) == 1 and len(shards) > 2, "the tiny model should be split into several shards"
    weight_map = json.loads(index[0].read_text())["weight_map"]
    assert len(set(weight_map.values())) == len(shards)
    check_parity(fluxion.load_transformer(out), ref, name)
    check_parity(fluxion.load_transformer(index[0]), ref, name)  # the index file itself


def test_original_file_without_axes_uses_config_or_warns(tiny_dev_dir, tmp_path):
    """Head dim 16 is not FLUX.1's 128: loading the bare original file must say which RoPE split it assumed."""
    path = write_original_transformer_file(tiny_dev_dir, tmp_path / "t.safetensors")
    with pytest.warns(UserWarning, match="axes_dim"):
        model = fluxion.load_transformer(path)
    assert sum(model.config.axes_dim) == 16


def test_dtype_argument(tiny_schnell_dir):
    model = fluxion.load_transformer(tiny_schnell_dir / "transformer", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model = fluxion.load_transformer(tiny_schnell_dir / "transformer", torch_dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


# ---------------------------------------------------------------- inputs


def test_batched_ids_are_accepted(flavour):
    """ids [N, 3] and [B, N, 3] (the same ids per sample) give the same result as diffusers."""
    name, folder, ref = flavour
    model = fluxion.load_transformer(folder / "transformer")
    x = random_inputs(batch=3, seed=2)
    expected = reference_forward(ref, x)
    batched_img = x["img_ids"][None].expand(3, -1, -1).clone()
    batched_txt = x["txt_ids"][None].expand(3, -1, -1).clone()
    assert_close(our_forward(model, x, img_ids=batched_img, txt_ids=batched_txt), expected)
    assert_close(our_forward(model, x, img_ids=batched_img), expected)  # mixed [B,N,3] and [L,3]
    assert_close(our_forward(model, x, txt_ids=batched_txt[:1]), expected)  # [1, L, 3] broadcasts


def test_per_sample_ids_are_used_per_sample(tiny_dev_dir):
    """[B, N, 3] ids that differ per sample: each sample equals its own single-sample run."""
    model = fluxion.load_transformer(tiny_dev_dir / "transformer")
    x = random_inputs(batch=2, seed=3)
    g = torch.Generator().manual_seed(4)
    img_ids = torch.randint(0, 9, (2, x["img"].shape[1], 3), generator=g).float()
    both = our_forward(model, x, img_ids=img_ids)
    for b in range(2):
        xb = {k: v[b : b + 1] if k not in ("img_ids", "txt_ids") else v for k, v in x.items()}
        assert_close(both[b : b + 1], our_forward(model, xb, img_ids=img_ids[b]))
    assert not torch.allclose(both[0], our_forward(model, {k: v[:1] if k not in ("img_ids", "txt_ids") else v
                                                           for k, v in x.items()}, img_ids=img_ids[1])[0])


def test_scalar_timestep_and_guidance_broadcast(tiny_dev_dir):
    model = fluxion.load_transformer(tiny_dev_dir / "transformer")
    x = random_inputs(batch=2, seed=5)
    x["timesteps"] = torch.full((2,), 0.4)
    x["guidance"] = torch.full((2,), 3.5)
    full = our_forward(model, x)
    x["timesteps"], x["guidance"] = torch.tensor(0.4), torch.tensor([3.5])
    assert_close(our_forward(model, x), full, atol=0)


def test_guidance_required_for_dev(tiny_dev_dir):
    model = fluxion.load_transformer(tiny_dev_dir / "transformer")
    x = random_inputs(seed=6)
    with pytest.raises(ValueError, match="guidance"):
        model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], None)


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name, expected", [("flux1-dev", 11_901_408_320), ("flux1-schnell", 11_891_178_560)])
def test_preset_parameter_counts(name, expected):
    config = preset(name)
    assert (config.hidden_size, config.depth, config.depth_single_blocks) == (3072, 19, 38)
    assert config.guidance_embed is (name == "flux1-dev")
    with torch.device("meta"):
        model = FluxTransformer(config)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == expected


def test_preset_unknown_and_copy():
    with pytest.raises(ValueError, match="flux1-dev"):
        preset("flux2-pro")
    a = preset("flux1-dev")
    a.depth = 1
    assert preset("flux1-dev").depth == 19  # presets hand out copies
