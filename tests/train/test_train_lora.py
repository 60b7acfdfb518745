"""`fluxion train-lora`: trains only the adapter, writes a diffusers-layout file, resumes, rejects bad data."""
import numpy as np
import pytest
import torch
from PIL import Image

from fluxion import FluxPipeline
from fluxion.cli import main
from fluxion.train.lora import LoraTrainConfig, read_dataset, train_lora


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a photo of sks")
    return folder


def test_dataset_reading_and_errors(image_folder, tmp_path):
    pairs = read_dataset(image_folder, "a sks")
    assert [c for _, c in pairs] == ["a photo of sks", "a sks", "a sks"]
    with pytest.raises(ValueError, match="no caption"):
        read_dataset(image_folder, None)
    with pytest.raises(ValueError, match="no images"):
        read_dataset(tmp_path, None)
    with pytest.raises(ValueError, match="no such folder"):
        read_dataset(tmp_path / "missing", "x")


def test_train_lora_writes_a_loadable_adapter_and_resumes(tiny_dev_dir, image_folder, tmp_path):
    out = tmp_path / "lora"
    cfg = LoraTrainConfig(model=str(tiny_dev_dir), data=str(image_folder), output=str(out), instance_prompt="a sks",
                          steps=2, grad_accum=2, lr=1e-2, resolution=32, validation_every=0, checkpoint_every=1)
    train_lora(cfg)
    file = out / "pytorch_lora_weights.safetensors"
    assert file.is_file()
    first = torch.load(out / "lora_checkpoint.pt", weights_only=False)
    assert first["step"] == 2
    # resume to 4 steps: starts at 2
    cfg.steps = 4
    train_lora(cfg)
    assert torch.load(out / "lora_checkpoint.pt", weights_only=False)["step"] == 4

    pipe = FluxPipeline.from_pretrained(tiny_dev_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    base = pipe("a sks", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    tuned = pipe("a sks", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(tuned - base).max() > 1e-4  # the adapter learned something (B moved from zero)


def test_cli_rejects_missing_data_before_loading(tmp_path, capsys):
    code = main(["train-lora", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err
