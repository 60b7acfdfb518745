"""inspect_checkpoint: part, layout, config and parameter count, without building the model."""
from __future__ import annotations

import warnings

import pytest
import torch

import fluxion
from fixtures import TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG, write_original_transformer_file
from fluxion.checkpoints import inspect_checkpoint


@pytest.fixture(scope="module")
def reference_counts(tiny_dev_dir, tiny_schnell_dir):
    """Parameter counts of the diffusers models themselves (the oracle)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return {
        "dev": count(FluxTransformer2DModel.from_pretrained(str(tiny_dev_dir / "transformer"))),
        "schnell": count(FluxTransformer2DModel.from_pretrained(str(tiny_schnell_dir / "transformer"))),
        "vae": count(AutoencoderKL.from_pretrained(str(tiny_dev_dir / "vae"))),
    }


def inspect_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tiny head dim makes original files warn about RoPE axes
        return inspect_checkpoint(path)


def check_transformer_info(info, guidance: bool, expected_params: int):
    assert info["part"] == "transformer"
    c = info["config"]
    assert c["depth"] == TINY_TRANSFORMER_CONFIG["num_layers"] == 2
    assert c["depth_single_blocks"] == TINY_TRANSFORMER_CONFIG["num_single_layers"]
    assert c["guidance_embed"] is guidance
    assert c["hidden_size"] == 32 and c["num_heads"] == 2 and c["in_channels"] == 16
    assert c["context_in_dim"] == 32 and c["vec_in_dim"] == 32 and c["mlp_ratio"] == 4.0
    assert info["parameters"] == expected_params
    assert info["dtypes"] == {"float32": expected_params}
    assert info["bytes"] == 4 * expected_params
    assert info["variant"].startswith("dev-style" if guidance else "schnell-style")


@pytest.mark.parametrize("flavour", ["dev", "schnell"])
def test_diffusers_transformer_folder(flavour, tiny_dev_dir, tiny_schnell_dir, reference_counts):
    folder = tiny_dev_dir if flavour == "dev" else tiny_schnell_dir
    for path in (folder / "transformer", folder):  # the pipeline root resolves to its transformer
        info = inspect_checkpoint(path)
        assert info["format"].startswith("diffusers layout")
        assert info["config"]["axes_dim"] == list(TINY_TRANSFORMER_CONFIG["axes_dims_rope"])
        check_transformer_info(info, flavour == "dev", reference_counts[flavour])


def test_counts_differ_by_the_guidance_embedder(reference_counts):
    hidden = 32
    assert reference_counts["dev"] - reference_counts["schnell"] == (256 * hidden + hidden) + (hidden * hidden + hidden)


@pytest.mark.parametrize("flavour", ["dev", "schnell"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_transformer_file(flavour, prefix, tiny_dev_dir, tiny_schnell_dir, reference_counts, tmp_path):
    folder = tiny_dev_dir if flavour == "dev" else tiny_schnell_dir
    path = write_original_transformer_file(folder, tmp_path / "flux.safetensors", prefix=prefix)
    info = inspect_quietly(path)
    assert info["format"].startswith("original layout, 1 file")
    assert (prefix in info["format"]) if prefix else ("prefix" not in info["format"])
    check_transformer_info(info, flavour == "dev", reference_counts[flavour])
    # and the model it describes has that many parameters
    model = fluxion.load_transformer(path, axes_dim=(4, 6, 6))
    assert fluxion.model.count_parameters(model) == info["parameters"]


def test_sharded_folder(tiny_dev_dir, reference_counts, tmp_path):
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel.from_pretrained(str(tiny_dev_dir / "transformer")).save_pretrained(
        str(tmp_path), max_shard_size="100KB"
    )
    info = inspect_checkpoint(tmp_path)
    files = len(list(tmp_path.glob("*.safetensors")))
    assert files > 1 and info["format"] == f"diffusers layout, {files} files"
    check_transformer_info(info, True, reference_counts["dev"])


def test_bf16_file_dtypes(tiny_schnell_dir, tmp_path):
    model = fluxion.load_transformer(tiny_schnell_dir / "transformer", torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    fluxion.save_transformer(model, path)
    info = inspect_checkpoint(path)  # our own metadata carries the RoPE axes: no warning
    n = fluxion.model.count_parameters(model)
    assert info["dtypes"] == {"bfloat16": n} and info["bytes"] == 2 * n


def test_diffusers_vae_folder(tiny_dev_dir, reference_counts):
    info = inspect_checkpoint(tiny_dev_dir / "vae")
    assert info["part"] == "autoencoder"
    assert info["format"].startswith("diffusers layout")
    c = info["config"]
    assert c["z_channels"] == TINY_VAE_CONFIG["latent_channels"]
    assert c["ch"] == 16 and c["ch_mult"] == [1, 2] and c["num_res_blocks"] == 1
    assert c["norm_groups"] == 8 and c["scale_factor"] == 0.3611 and c["shift_factor"] == 0.1159
    assert info["parameters"] == reference_counts["vae"]
    assert "variant" not in info


def test_original_ae_file_with_our_metadata(tiny_dev_dir, reference_counts, tmp_path):
    """An ae.safetensors written by fluxion carries the norm group count, so inspect needs no override."""
    ae = fluxion.load_autoencoder(tiny_dev_dir / "vae")
    path = tmp_path / "ae.safetensors"
    fluxion.save_autoencoder(ae, path)
    info = inspect_checkpoint(path)
    assert info["part"] == "autoencoder" and info["format"].startswith("original layout")
    assert info["config"]["norm_groups"] == 8 and info["config"]["ch_mult"] == [1, 2]
    assert info["parameters"] == reference_counts["vae"]


def test_original_ae_file_without_metadata(tiny_dev_original_files, reference_counts):
    info = inspect_checkpoint(tiny_dev_original_files[1])
    assert info["part"] == "autoencoder" and info["parameters"] == reference_counts["vae"]


def test_not_a_flux_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"linear.weight": torch.randn(3, 3)}, str(path))
    with pytest.raises(fluxion.CheckpointError, match="neither a FLUX transformer nor a FLUX autoencoder") as e:
        inspect_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(fluxion.CheckpointError):
        inspect_checkpoint(tmp_path / "missing.safetensors")


def test_inspect_reports_the_real_cause(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(fluxion.CheckpointError, match="no such file"):
        inspect_checkpoint(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage" * 100)
    with pytest.raises(fluxion.CheckpointError, match="corrupt"):
        inspect_checkpoint(garbage)
