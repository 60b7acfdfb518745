"""Bad inputs fail early and clearly: pipeline arguments (before any model runs) and broken checkpoints."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fluxion
from fluxion import CheckpointError
from fixtures import TINY_VAE_CONFIG, write_original_transformer_file

MULTIPLE = 2 * 2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1)  # 2 * vae_scale_factor = 4 for the tiny VAE


# ---------------------------------------------------------------- pipeline arguments


@pytest.fixture(scope="module")
def pipe(tiny_dev_dir):
    p = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def no_compute(pipe, monkeypatch):
    """Every model in the pipeline raises if it is called: argument errors must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    for module in (pipe.transformer, pipe.clip.model, pipe.t5.model, pipe.vae.decoder, pipe.vae.encoder):
        monkeypatch.setattr(module, "forward", boom)
    return pipe


GOOD = dict(prompt="a red cat", height=16, width=16, num_inference_steps=2, output_type="np", max_sequence_length=16)


def call(pipe, **changes):
    return pipe(**{**GOOD, **changes})


def test_sanity_the_guard_works(no_compute):
    """The guard itself: a good call does reach a model (and so fails with the guard's message)."""
    assert no_compute.vae_scale_factor * 2 == MULTIPLE
    with pytest.raises(AssertionError, match="before the arguments"):
        call(no_compute)


def test_good_call_runs(pipe):
    assert call(pipe, generator=torch.Generator().manual_seed(0)).images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("name", ["height", "width"])
def test_size_not_a_multiple(no_compute, name):
    bad = MULTIPLE * 4 + MULTIPLE // 2
    with pytest.raises(ValueError, match=rf"{name} must be a positive multiple of {MULTIPLE}.*{bad}"):
        call(no_compute, **{name: bad})


def test_size_not_positive(no_compute):
    with pytest.raises(ValueError, match="height"):
        call(no_compute, height=-MULTIPLE)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(no_compute, steps):
    with pytest.raises(ValueError, match=rf"num_inference_steps must be an integer >= 1, got {steps}"):
        call(no_compute, num_inference_steps=steps)


def test_empty_prompt_list(no_compute):
    with pytest.raises(ValueError, match="empty list"):
        call(no_compute, prompt=[])


def test_no_prompt(no_compute):
    with pytest.raises(ValueError, match="prompt"):
        call(no_compute, prompt=None)


def test_wrong_latents_shape(no_compute):
    tokens = (16 // MULTIPLE) ** 2
    bad = torch.randn(1, tokens + 1, 16)
    with pytest.raises(ValueError, match=rf"latents must be packed.*\[1, {tokens}, 16\].*\[1, {tokens + 1}, 16\]"):
        call(no_compute, latents=bad)
    with pytest.raises(ValueError, match="latents"):  # unpacked latents are refused too
        call(no_compute, latents=torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="latents"):  # batch mismatch
        call(no_compute, latents=torch.randn(2, tokens, 16))


def test_bad_output_type(no_compute):
    with pytest.raises(ValueError, match="output_type must be one of.*'jpeg'"):
        call(no_compute, output_type="jpeg")


def test_max_sequence_length_over_512(no_compute):
    with pytest.raises(ValueError, match="max_sequence_length.*513"):
        call(no_compute, max_sequence_length=513)


def test_wrong_length_generator_list(no_compute):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        call(no_compute, prompt=["a", "b"], generator=gens)
    with pytest.raises(ValueError, match="generators"):
        call(no_compute, num_images_per_prompt=2, generator=gens[:1])


def test_negative_prompt_list_wrong_length(no_compute):
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but there are 2 prompts"):
        call(no_compute, prompt=["a", "b"], negative_prompt=["c"], true_cfg_scale=2.0)


@pytest.mark.parametrize("prompt", [5, ["a cat", 3], ("a", None)])
def test_non_string_prompt(no_compute, prompt):
    with pytest.raises(ValueError, match="prompt must be a str or a list of str"):
        call(no_compute, prompt=prompt)


def test_bad_num_images_per_prompt(no_compute):
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        call(no_compute, num_images_per_prompt=0)


def test_prompt_2_list_wrong_length(no_compute):
    with pytest.raises(ValueError, match="prompt_2"):
        call(no_compute, prompt=["a", "b"], prompt_2=["c"])


def test_negative_prompt_2_list_wrong_length(no_compute):
    with pytest.raises(ValueError, match="negative_prompt_2"):
        call(no_compute, prompt=["a", "b"], negative_prompt=["c", "d"], negative_prompt_2=["e"], true_cfg_scale=2.0)


@pytest.mark.parametrize("sigmas", [[], [1.0, 0.0], [2.0, 0.5]])
def test_bad_sigmas(no_compute, sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        call(no_compute, sigmas=sigmas)


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def original_tensors(tiny_dev_original_files) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_dev_original_files[0]))


def write(tensors: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_original_file_loads(tiny_dev_original_files):
    """The unbroken file loads: each test below breaks one thing."""
    fluxion.load_transformer(tiny_dev_original_files[0], axes_dim=(4, 6, 6))


def test_missing_tensor(original_tensors, tmp_path):
    name = "double_blocks.1.img_attn.proj.weight"
    path = write({k: v for k, v in original_tensors.items() if k != name}, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor|no source for model tensor") as e:
        fluxion.load_transformer(path, axes_dim=(4, 6, 6))
    assert str(path) in str(e.value) and name in str(e.value)


def test_missing_tensor_prefixed(tiny_dev_dir, tmp_path):
    """With a key prefix, the message still names the file and the tensor.

    (It names the tensor without its `model.diffusion_model.` prefix: see the report; the ideal is the stored key.)
    """
    src = write_original_transformer_file(tiny_dev_dir, tmp_path / "src.safetensors", prefix="model.diffusion_model.")
    name = "model.diffusion_model.single_blocks.0.linear2.bias"
    tensors = {k: v for k, v in load_file(str(src)).items() if k != name}
    path = write(tensors, tmp_path / "broken_prefixed.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor|no source for model tensor") as e:
        fluxion.load_transformer(path, axes_dim=(4, 6, 6))
    assert str(path) in str(e.value) and name.removeprefix("model.diffusion_model.") in str(e.value)


def test_missing_tensor_diffusers_folder(tiny_dev_dir, tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(tiny_dev_dir / "transformer" / "config.json", folder / "config.json")
    tensors = load_file(str(next((tiny_dev_dir / "transformer").glob("*.safetensors"))))
    name = "transformer_blocks.0.attn.add_k_proj.weight"
    path = write({k: v for k, v in tensors.items() if k != name}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as e:
        fluxion.load_transformer(folder)
    assert str(path) in str(e.value) and name in str(e.value)


def test_unexpected_tensor(original_tensors, tmp_path):
    name = "double_blocks.0.img_attn.extra.weight"
    tensors = dict(original_tensors, **{name: torch.randn(4, 4)})
    path = write(tensors, tmp_path / "unexpected.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor") as e:
        fluxion.load_transformer(path, axes_dim=(4, 6, 6))
    assert str(path) in str(e.value) and name in str(e.value)


def test_wrong_shaped_tensor(original_tensors, tmp_path):
    name = "double_blocks.1.txt_mlp.2.weight"
    good = original_tensors[name]
    tensors = dict(original_tensors, **{name: torch.randn(good.shape[0], good.shape[1] - 1)})
    path = write(tensors, tmp_path / "wrong_shape.safetensors")
    with pytest.raises(CheckpointError, match="has shape") as e:
        fluxion.load_transformer(path, axes_dim=(4, 6, 6))
    msg = str(e.value)
    assert str(path) in msg and name in msg and str(list(good.shape)) in msg


def test_truncated_file(tiny_dev_original_files, tmp_path):
    src = tiny_dev_original_files[0]
    data = src.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        fluxion.load_transformer(path, axes_dim=(4, 6, 6))
    assert str(path) in str(e.value)
    # a file cut inside its header
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError) as e:
        fluxion.load_transformer(path)
    assert str(path) in str(e.value)


def test_corrupt_header_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.safetensors"
    g = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        fluxion.load_transformer(path)
    assert str(path) in str(e.value)


def test_corrupt_header_bad_json(tiny_dev_original_files, tmp_path):
    data = tiny_dev_original_files[0].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = bytearray(data[8 : 8 + n])
    header[: n // 2] = b"\xff" * (n // 2)
    path = tmp_path / "bad_json.safetensors"
    path.write_bytes(data[:8] + bytes(header) + data[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        fluxion.load_transformer(path)
    assert str(path) in str(e.value)


def test_corrupt_header_entry(tiny_dev_original_files, tmp_path):
    """A header whose byte range disagrees with the shape names the tensor."""
    data = tiny_dev_original_files[0].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "img_in.weight"
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] + 1]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # keep the length: same data offsets
    assert len(raw) == n
    path = tmp_path / "bad_entry.safetensors"
    path.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt") as e:
        fluxion.load_transformer(path)
    assert str(path) in str(e.value) and name in str(e.value)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "nope" / "flux1-dev.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as e:
        fluxion.load_transformer(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError) as e:
        fluxion.load_autoencoder(path)
    assert str(path) in str(e.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x02not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors") as e:
        fluxion.load_transformer(path)
    assert str(path) in str(e.value)


def test_shard_index_pointing_at_missing_shard(tiny_dev_dir, tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    tensors = load_file(str(next((tiny_dev_dir / "transformer").glob("*.safetensors"))))
    names = sorted(tensors)
    write({k: tensors[k] for k in names[::2]}, folder / "part-1.safetensors")
    weight_map = {k: "part-1.safetensors" for k in names[::2]} | {k: "part-2.safetensors" for k in names[1::2]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as e:
        fluxion.load_transformer(folder)
    assert "part-2.safetensors" in str(e.value)


def test_autoencoder_missing_tensor(tiny_dev_original_files, tmp_path):
    tensors = load_file(str(tiny_dev_original_files[1]))
    name = "decoder.mid.attn_1.proj_out.bias"
    path = write({k: v for k, v in tensors.items() if k != name}, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError) as e:
        fluxion.load_autoencoder(path, norm_groups=8)
    assert str(path) in str(e.value) and name in str(e.value)


def test_transformer_file_is_not_an_autoencoder(tiny_dev_original_files):
    with pytest.raises(CheckpointError, match="autoencoder"):
        fluxion.load_autoencoder(tiny_dev_original_files[0])


def test_from_pretrained_without_vae(tiny_dev_dir, tmp_path):
    root = tmp_path / "no_vae"
    shutil.copytree(tiny_dev_dir, root, ignore=shutil.ignore_patterns("vae"))
    assert not (root / "vae").exists()
    with pytest.raises(CheckpointError, match=r"missing vae/") as e:
        fluxion.FluxPipeline.from_pretrained(root)
    assert str(root) in str(e.value)


def test_from_pretrained_nonexistent_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        fluxion.FluxPipeline.from_pretrained(tmp_path / "missing")
