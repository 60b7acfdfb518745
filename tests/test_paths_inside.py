"""Files named inside other files (shard indexes, metadata.jsonl) resolve inside their folder, or fail by name."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fluxion.checkpoints import CheckpointError
from fluxion.checkpoints.loading import TensorStore
from fluxion.files import inside
from fluxion.train.lora import read_dataset


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/hostname", "a/../../x", ".."])
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path, name, "the index")


def test_names_inside_the_folder_and_symlinks_in_it_are_kept(tmp_path):
    assert inside(tmp_path, "sub/./a.bin", "x") == tmp_path / "sub" / "a.bin"
    assert inside(tmp_path, "sub/../a.bin", "x") == tmp_path / "a.bin"


def _shards(folder, target_name):
    folder.mkdir()
    outside = folder.parent / "outside.safetensors"
    save_file({"w": torch.randn(2, 2, generator=torch.Generator().manual_seed(0))}, str(outside))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target_name}}))
    return outside


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_shard_index_cannot_load_weights_from_outside_its_folder(tmp_path, how):
    outside = tmp_path / "outside.safetensors"
    _shards(tmp_path / "model", "../outside.safetensors" if how == "relative" else str(outside))
    with pytest.raises(CheckpointError, match="outside"):
        TensorStore.open(tmp_path / "model")


def test_a_symlinked_shard_inside_the_folder_loads(tmp_path):
    """The Hugging Face cache links snapshot files to blobs elsewhere: a link inside the folder is fine."""
    outside = _shards(tmp_path / "model", "shard.safetensors")
    (tmp_path / "model" / "shard.safetensors").symlink_to(outside)
    assert TensorStore.open(tmp_path / "model").keys() == ["w"]


@pytest.mark.parametrize("name", ["../x.png", "/etc/hostname"])
def test_metadata_jsonl_cannot_name_images_outside_the_data_folder(tmp_path, name):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "x.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a red square"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1 names .* outside"):
        read_dataset(data, None)
