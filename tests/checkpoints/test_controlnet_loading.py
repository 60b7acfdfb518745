"""Loading FLUX ControlNets: diffusers folders, diffusers-layout single files (InstantX), XLabs' original layout
(written by the test from a diffusers net), the config inferred from the tensors; wrong layouts fail with one
error naming the first offending tensor."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import fluxion
from controlnet_fixtures import diffusers_controlnet, to_xlabs_layout
from fluxion.checkpoints import CheckpointError


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_folder_and_single_file_load_the_same(tmp_path):
    net = diffusers_controlnet(1, num_mode=5, guidance_embeds=True)
    net.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    from_folder = fluxion.FluxControlNetModel.from_pretrained(tmp_path / "folder")
    c = from_folder.config
    assert (c.depth, c.depth_single_blocks, c.num_heads, c.hidden_size, c.num_mode, c.guidance_embed) == \
        (2, 3, 2, 32, 5, True)
    assert c.axes_dim == (4, 6, 6) and not c.has_hint_block
    single = tmp_path / "instantx-union.safetensors"  # an InstantX single file: diffusers names, no config.json
    save_file(load_file(str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")), str(single))
    from_file = fluxion.FluxControlNetModel.from_single_file(single)
    _same_weights(from_folder, from_file)
    assert from_folder.dtype == torch.float32
    assert fluxion.FluxControlNetModel.from_pretrained(tmp_path / "folder", torch_dtype=torch.bfloat16).dtype == \
        torch.bfloat16


def test_xlabs_original_layout(tmp_path):
    net = diffusers_controlnet(2, conditioning_embedding_channels=4, patch_size=2, num_single_layers=0,
                               guidance_embeds=True)
    net.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    xlabs = to_xlabs_layout(net.state_dict())
    assert "pos_embed_input.weight" in xlabs and "input_hint_block.14.weight" in xlabs
    assert "double_blocks.0.img_attn.qkv.weight" in xlabs
    save_file(xlabs, str(tmp_path / "xlabs.safetensors"))
    ours = fluxion.FluxControlNetModel.from_single_file(tmp_path / "xlabs.safetensors")
    c = ours.config
    assert c.has_hint_block and c.conditioning_embedding_channels == 4 and c.patch_size == 2
    assert (c.depth, c.depth_single_blocks, c.guidance_embed) == (2, 0, True)
    _same_weights(ours, fluxion.FluxControlNetModel.from_pretrained(tmp_path / "folder"))


def test_xlabs_with_prefix(tmp_path):
    net = diffusers_controlnet(3, conditioning_embedding_channels=4, patch_size=2, num_single_layers=0)
    xlabs = {f"model.diffusion_model.{k}": v for k, v in to_xlabs_layout(net.state_dict()).items()}
    save_file(xlabs, str(tmp_path / "x.safetensors"))
    assert fluxion.FluxControlNetModel.from_single_file(tmp_path / "x.safetensors").config.has_hint_block


def test_unknown_layout_names_first_tensor(tmp_path):
    save_file({"encoder.conv.weight": torch.zeros(2, 2), "encoder.z.bias": torch.zeros(2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a FLUX ControlNet: tensor 'encoder.conv.weight'"):
        fluxion.FluxControlNetModel.from_single_file(tmp_path / "other.safetensors")


def test_transformer_is_not_a_controlnet(tiny_dev_dir):
    with pytest.raises(CheckpointError, match="controlnet_x_embedder.weight"):
        fluxion.FluxControlNetModel.from_pretrained(tiny_dev_dir / "transformer")


def test_extra_and_missing_tensors_are_named(tmp_path):
    net = diffusers_controlnet(4, conditioning_embedding_channels=4, patch_size=2, num_single_layers=0)
    xlabs = to_xlabs_layout(net.state_dict())
    save_file({**xlabs, "final_layer.linear.weight": torch.zeros(4, 32)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'final_layer.linear.weight'"):
        fluxion.FluxControlNetModel.from_single_file(tmp_path / "extra.safetensors")
    del xlabs["input_hint_block.6.weight"]
    save_file(xlabs, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="input_hint_block.6.weight"):
        fluxion.FluxControlNetModel.from_single_file(tmp_path / "missing.safetensors")


def test_hint_block_that_does_not_pack(tmp_path):
    net = diffusers_controlnet(5, conditioning_embedding_channels=4, patch_size=2, num_single_layers=0)
    xlabs = to_xlabs_layout(net.state_dict())
    xlabs["input_hint_block.14.weight"] = torch.zeros(3, 16, 3, 3)
    xlabs["input_hint_block.14.bias"] = torch.zeros(3)
    save_file(xlabs, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="hint block gives 3 channels"):
        fluxion.FluxControlNetModel.from_single_file(tmp_path / "bad.safetensors")


def test_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        fluxion.FluxControlNetModel.from_pretrained(tmp_path / "nothing")


def test_original_transformer_file_is_not_a_controlnet(tiny_dev_original_files):
    transformer_file, _ = tiny_dev_original_files
    with pytest.raises(CheckpointError, match="missing tensor 'controlnet_blocks.0.weight'"):
        fluxion.FluxControlNetModel.from_single_file(transformer_file)
