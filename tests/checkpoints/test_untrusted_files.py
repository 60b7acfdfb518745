"""Damaged or crafted checkpoint files are refused by name: fluxion's own safetensors header parser is as strict as
the `safetensors` library (the oracle here), integer data never loads as float weights, and a folder whose
tensors disagree with its config.json never loads as another model."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxion.checkpoints.safetensors_file import CheckpointError, SafetensorsFile


def _write(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def parts(tmp_path):
    """(header, data) of a valid two-tensor file written by the library."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "ok.safetensors"
    save_file({"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}, str(src))
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


@pytest.mark.parametrize("case", ["negative", "overlap", "gap", "trailing", "reversed_range"])
def test_bad_offsets_are_refused_like_the_library_refuses_them(parts, tmp_path, case):
    header, data = parts
    first, second = ("a", "b") if header["a"]["data_offsets"][0] == 0 else ("b", "a")  # whichever starts at 0
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in ("a", "b")}
    if case == "negative":
        header[second]["data_offsets"] = [-4, size[second] - 4]
    elif case == "overlap":  # the second tensor starts inside the first
        header[second]["data_offsets"] = [size[first] - 4, size[first] - 4 + size[second]]
        data = data[:-4]
    elif case == "gap":  # 8 unexplained bytes between the two
        header[second]["data_offsets"] = [size[first] + 8, size[first] + 8 + size[second]]
        data = data[: size[first]] + bytes(8) + data[size[first]:]
    elif case == "trailing":
        data = data + bytes(16)
    else:
        header[second]["data_offsets"] = [size[first] + size[second], size[first]]
    bad = tmp_path / f"{case}.safetensors"
    _write(bad, header, data)
    with pytest.raises(Exception):
        load_file(str(bad))  # the library refuses it: so must we
    with pytest.raises(CheckpointError, match=str(bad)):
        SafetensorsFile(bad)


def test_a_valid_file_still_loads_exactly(parts, tmp_path):
    header, data = parts
    good = tmp_path / "good.safetensors"
    _write(good, header, data)
    f = SafetensorsFile(good)
    want = load_file(str(good))
    for name in ("a", "b"):
        torch.testing.assert_close(f.get(name), want[name], rtol=0, atol=0)


def test_integer_data_never_loads_as_float_weights(parts, tmp_path):
    """F32 relabelled I32 has the same size, so offsets cannot catch it; asking for float weights from it must."""
    header, data = parts
    header["a"]["dtype"] = "I32"
    relabelled = tmp_path / "relabelled.safetensors"
    _write(relabelled, header, data)
    f = SafetensorsFile(relabelled)
    assert f.get("a").dtype == torch.int32  # read as stored, on request
    with pytest.raises(CheckpointError, match="'a' is stored as torch.int32, not a floating-point type"):
        f.get("a", torch.float32)
    f.get("b", torch.bfloat16)  # the float tensor beside it is fine


def test_a_relabelled_transformer_file_is_refused_by_tensor_name(tiny_dev_original_files, tmp_path):
    from fluxion import load_transformer

    src = tiny_dev_original_files[0]
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 2)
    header[name]["dtype"] = "I32"  # same size: the offsets still tile the file
    bad = tmp_path / "relabelled.safetensors"
    _write(bad, header, blob[8 + n :])
    with pytest.raises(CheckpointError, match=f"{name!r} is stored as torch.int32"):
        load_transformer(bad)


@pytest.mark.parametrize("drop", ["last double block", "a middle single block"])
def test_a_folder_missing_a_block_does_not_load_as_a_smaller_model(tiny_dev_dir, tmp_path, drop):
    import shutil

    from fluxion import load_transformer
    from fluxion.checkpoints.safetensors_file import save_safetensors

    folder = tmp_path / "transformer"
    shutil.copytree(tiny_dev_dir / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(str(files[0]))
    if drop == "last double block":
        prefix = f"transformer_blocks.{config['num_layers'] - 1}."
    else:
        assert config["num_single_layers"] >= 2
        prefix = "single_transformer_blocks.0."
    save_safetensors({k: v for k, v in tensors.items() if not k.startswith(prefix)}, files[0])
    with pytest.raises(CheckpointError, match=prefix.replace(".", r"\.")):
        load_transformer(folder)


def test_an_autoencoder_folder_missing_a_level_is_refused(tiny_dev_dir, tmp_path):
    import shutil

    from fluxion import load_autoencoder
    from fluxion.checkpoints.safetensors_file import save_safetensors

    folder = tmp_path / "vae"
    shutil.copytree(tiny_dev_dir / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    last = len(config["block_out_channels"]) - 1
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(str(file))
    save_safetensors({k: v for k, v in tensors.items() if not k.startswith(f"encoder.down_blocks.{last}.")}, file)
    with pytest.raises(CheckpointError, match="block_out_channels"):
        load_autoencoder(folder)
