"""fluxion's LoRA == diffusers' LoRA, image for image (output_type="np", float32, 2 steps, 32x48, 1e-4).

diffusers (with PEFT) is the oracle only. Both pipelines load the same tiny random folder and the same
LoRA files; the files are made here with random weights.

What diffusers 0.42.1 cannot be the oracle for on the tiny model (these are covered against a hand
computation in test_lora_formats.py instead):
* kohya / ComfyUI `single_blocks.i.linear1`: its converter hard-codes FLUX.1's sizes (3072 x 3 + 12288)
  and fails an assertion on any other model;
* kohya `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer.*`: its converter emits
  these without the `transformer.` prefix, so they are silently dropped (and final_layer alphas ignored);
* original keys with `lora_A` / `lora_B` names (`diffusion_model.double_blocks...lora_A.weight`): not
  recognised; the same tensors named `lora_down` / `lora_up` are, so fluxion reading the lora_A file is
  compared with diffusers reading the lora_down one;
* kohya "mixture" files (`lora_transformer_...`): only attention layers and top-level layers convert;
* kohya CLIP files mixing attention and mlp layers: diffusers applies the mlp ones only (attention keys
  get legacy names that PEFT does not match); the oracle file uses CLIP attention layers only. diffusers
  also scales the caller's kohya CLIP tensors in place, so each pipeline gets its own copy here.
Other diffusers behaviours fluxion follows: a newly loaded adapter becomes the only active one;
`fuse_lora()` fuses the transformer only unless `components=` says otherwise.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fluxion
from fluxion.lora import DEFAULT_TARGETS, LoraPiece, add_trainable_adapter, attach_adapter

pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs")

ATOL = 1e-4
H, MLP = 32, 128


def load_pipes(folder):
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    ref = DiffusersFluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = fluxion.FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    return ours, ref


def images(pipe, seed=0):
    return pipe(prompt="a photo of a red cat on a table", height=32, width=48, num_inference_steps=2,
                max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(seed)).images


def assert_same(got, expected, base=None):
    err = np.abs(got - expected).max()
    assert err <= ATOL, f"max abs difference {err:.3g} > {ATOL}"
    if base is not None:  # the LoRA must visibly change the image, or the comparison proves nothing
        assert np.abs(expected - base).max() > 1e-2


@pytest.fixture
def dev(tiny_dev_dir):
    return load_pipes(tiny_dev_dir)


def pair(g, rank, n_in, n_out, std=0.3):
    return torch.randn(rank, n_in, generator=g) * std, torch.randn(n_out, rank, generator=g) * std


# ---------------------------------------------------------------- (a) fluxion writes, diffusers reads

WIDE = DEFAULT_TARGETS + ("proj_mlp", "proj_out", "norm.linear", "norm1.linear", "norm1_context.linear")


def _fluxion_adapter(ours, name, seed, targets=DEFAULT_TARGETS):
    """Random non-zero A and B on every training target, alpha 6 / rank 4, plus CLIP layers."""
    g = torch.Generator().manual_seed(seed)
    params = add_trainable_adapter(ours.transformer, name, rank=4, alpha=6.0, targets=targets, generator=g)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    clip = ours.clip.model
    te = {}
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            mod = clip.get_submodule(f"encoder.layers.{i}.{part}")
            A, B = pair(g, 2, mod.in_features, mod.out_features)
            te[f"encoder.layers.{i}.{part}"] = [LoraPiece(A, B, 3.0 / 2)]
    attach_adapter(clip, name, te)


@pytest.mark.parametrize("flavour,targets", [("dev", DEFAULT_TARGETS), ("schnell", DEFAULT_TARGETS), ("dev", WIDE)],
                         ids=["dev", "schnell", "dev-wide-targets"])
def test_fluxion_file_loads_in_diffusers(flavour, targets, request, tmp_path):
    """Wide targets add the single blocks' MLP and output (row and column pieces of fused layers), every
    modulation, and the final projection."""
    ours, ref = load_pipes(request.getfixturevalue(f"tiny_{flavour}_dir"))
    base = images(ours)
    _fluxion_adapter(ours, "mine", seed=1, targets=targets)
    path = ours.save_lora_weights(tmp_path, adapter_name="mine", base_model=flavour)
    assert path.name == "pytorch_lora_weights.safetensors"
    ref.load_lora_weights(str(tmp_path))  # unchanged: diffusers' own loader, default weight name
    assert set(ref.get_list_adapters()) == {"transformer", "text_encoder"}
    expected = images(ref)
    assert_same(images(ours), expected, base)
    # and fluxion reads its own file back to the same images
    ours.unload_lora_weights()
    ours.load_lora_weights(path)
    assert_same(images(ours), expected, base)


# ---------------------------------------------------------------- (b) files of other tools, both read

def _kohya_file(g, alpha_scale=1.0):
    """Every double-block layer, single blocks' linear2 / modulation, CLIP layers; ranks and alphas vary."""
    sd = {}
    layers = []
    for i in range(2):
        d = f"double_blocks_{i}"
        layers += [(f"{d}_img_attn_qkv", H, 3 * H), (f"{d}_txt_attn_qkv", H, 3 * H), (f"{d}_img_attn_proj", H, H),
                   (f"{d}_txt_attn_proj", H, H), (f"{d}_img_mlp_0", H, MLP), (f"{d}_img_mlp_2", MLP, H),
                   (f"{d}_txt_mlp_0", H, MLP), (f"{d}_txt_mlp_2", MLP, H), (f"{d}_img_mod_lin", H, 6 * H),
                   (f"{d}_txt_mod_lin", H, 6 * H)]
        layers += [(f"single_blocks_{i}_linear2", H + MLP, H), (f"single_blocks_{i}_modulation_lin", H, 3 * H)]
    for k, (stem, n_in, n_out) in enumerate(layers):
        rank = 2 + k % 3
        down, up = pair(g, rank, n_in, n_out, std=0.2)
        sd |= {f"lora_unet_{stem}.lora_down.weight": down, f"lora_unet_{stem}.lora_up.weight": up,
               f"lora_unet_{stem}.alpha": torch.tensor(alpha_scale * (1.0 + k % 4))}
    for i in range(2):  # attention layers only: diffusers drops these when the file also has CLIP mlp layers
        for part, n_in, n_out in (("self_attn_q_proj", H, H), ("self_attn_k_proj", H, H), ("self_attn_out_proj", H, H)):
            stem = f"lora_te1_text_model_encoder_layers_{i}_{part}"
            down, up = pair(g, 2, n_in, n_out)
            sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(3.0)}
    return sd


def test_kohya_file(dev, tmp_path):
    ours, ref = dev
    base = images(ours)
    save_file(_kohya_file(torch.Generator().manual_seed(2)), str(tmp_path / "kohya.safetensors"))
    ref.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    ours.load_lora_weights(tmp_path, weight_name="kohya.safetensors")
    assert ours.get_list_adapters() == {"transformer": ["default_0"], "text_encoder": ["default_0"]}
    assert_same(images(ours), images(ref), base)


def test_xlabs_file(dev, tmp_path):
    ours, ref = dev
    base = images(ours)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(2):
        for proc, n_in, n_out in (("qkv_lora1", H, 3 * H), ("qkv_lora2", H, 3 * H), ("proj_lora1", H, H),
                                  ("proj_lora2", H, H)):
            down, up = pair(g, 4, n_in, n_out)
            sd |= {f"double_blocks.{i}.processor.{proc}.down.weight": down,
                   f"double_blocks.{i}.processor.{proc}.up.weight": up}
        for proc, n_in, n_out in (("qkv_lora", H, 3 * H), ("proj_lora", H + MLP, H)):
            down, up = pair(g, 4, n_in, n_out)
            sd |= {f"single_blocks.{i}.processor.{proc}.down.weight": down,
                   f"single_blocks.{i}.processor.{proc}.up.weight": up}
    save_file(sd, str(tmp_path / "xlabs.safetensors"))
    ref.load_lora_weights(str(tmp_path / "xlabs.safetensors"))
    ours.load_lora_weights(tmp_path / "xlabs.safetensors")
    assert_same(images(ours), images(ref), base)


def test_original_key_file(dev, tmp_path):
    ours, ref = dev
    base = images(ours)
    g = torch.Generator().manual_seed(4)
    down_up, a_b = {}, {}
    layers = [("double_blocks.0.img_attn.qkv", H, 3 * H), ("double_blocks.1.txt_attn.qkv", H, 3 * H),
              ("double_blocks.0.txt_attn.proj", H, H), ("double_blocks.1.img_mlp.2", MLP, H),
              ("double_blocks.0.txt_mod.lin", H, 6 * H), ("single_blocks.1.linear2", H + MLP, H)]
    for k, (module, n_in, n_out) in enumerate(layers):
        down, up = pair(g, 3, n_in, n_out)
        alpha = torch.tensor(1.0 + k)
        key = f"diffusion_model.{module}"
        down_up |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": alpha}
        a_b |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": alpha}
    for part in ("q_proj", "out_proj"):  # ComfyUI's CLIP keys
        key = f"text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.{part}"
        down, up = pair(g, 2, H, H)
        down_up |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        a_b |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    save_file(down_up, str(tmp_path / "down_up.safetensors"))
    save_file(a_b, str(tmp_path / "a_b.safetensors"))
    ref.load_lora_weights(str(tmp_path / "down_up.safetensors"))
    expected = images(ref)
    ours.load_lora_weights(tmp_path / "down_up.safetensors", adapter_name="down_up")
    assert_same(images(ours), expected, base)
    ours.load_lora_weights(tmp_path / "a_b.safetensors", adapter_name="a_b")
    assert_same(images(ours), expected, base)


def test_kohya_mixture_file(dev):
    ours, ref = dev
    base = images(ours)
    g = torch.Generator().manual_seed(5)
    sd = {}
    layers = [(f"transformer_blocks_{i}_attn_{p}", H, H) for i in range(2)
              for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out_0", "to_add_out")]
    layers += [(f"single_transformer_blocks_{i}_attn_{p}", H, H) for i in range(2) for p in ("to_q", "to_k", "to_v")]
    layers += [("x_embedder", 16, H), ("norm_out_linear", H, 2 * H)]
    for k, (stem, n_in, n_out) in enumerate(layers):
        down, up = pair(g, 2, n_in, n_out)
        sd |= {f"lora_transformer_{stem}.lora_down.weight": down, f"lora_transformer_{stem}.lora_up.weight": up,
               f"lora_transformer_{stem}.alpha": torch.tensor(1.0 + k % 3)}
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})  # (diffusers may scale tensors in place)
    ours.load_lora_weights(sd)
    assert_same(images(ours), images(ref), base)


# ---------------------------------------------------------------- (c) several adapters, fuse, unfuse, unload

def test_two_adapters_weights_fuse_unfuse_unload(dev, tmp_path):
    ours, ref = dev
    base = images(ours)
    assert_same(base, images(ref))
    _fluxion_adapter(ours, "mine", seed=6)
    ours.save_lora_weights(tmp_path / "mine", adapter_name="mine")
    ours.unload_lora_weights()
    save_file(_kohya_file(torch.Generator().manual_seed(7), alpha_scale=0.5), str(tmp_path / "kohya.safetensors"))
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(tmp_path / "mine"), adapter_name="a")
        pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.8, 0.5])
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["a", "b"]
    weighted = images(ref)
    assert_same(images(ours), weighted, base)

    snapshot = {k: v.clone() for m in (ours.transformer, ours.clip.model) for k, v in m.state_dict().items()}
    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=0.7)
    assert_same(images(ours), images(ref), base)
    for pipe in (ours, ref):
        pipe.unfuse_lora()
    now = {k: v for m in (ours.transformer, ours.clip.model) for k, v in m.state_dict().items()}
    assert all(torch.equal(now[k], v) for k, v in snapshot.items())  # bit-exact
    assert_same(images(ours), weighted)
    # diffusers quirk: fuse_lora(lora_scale=s) leaves its unfused layers scaled by s after unfuse_lora();
    # set_adapters resets its scales (fluxion needs no reset: unfuse restores the state before fusing)
    ref.set_adapters(["a", "b"], [0.8, 0.5])
    assert_same(images(ref), weighted)

    for pipe in (ours, ref):
        pipe.set_adapters("b", 1.3)
    assert_same(images(ours), images(ref), base)
    for pipe in (ours, ref):
        pipe.disable_lora()
    assert np.array_equal(images(ours), base)
    for pipe in (ours, ref):
        pipe.enable_lora()
        pipe.delete_adapters("b")
        pipe.set_adapters(["a"], [0.6])
    assert_same(images(ours), images(ref), base)

    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {} and ours.get_active_adapters() == []
    assert np.array_equal(images(ours), base)  # exactly the base model again
