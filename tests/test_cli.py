"""The `fluxion` command: generate writes a PNG with its parameters; info describes checkpoints; errors are clear."""
import json

import numpy as np
from PIL import Image

from fluxion.cli import main
from fluxion.png import read_parameters


def test_generate_writes_png_with_parameters(tiny_dev_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    args = ["generate", "a red circle", "--model", str(tiny_dev_dir), "--steps", "2", "--guidance", "2.5",
            "--seed", "7", "--height", "32", "--width", "48", "--max-sequence-length", "16", "--out", str(out)]
    assert main(args) == 0
    im = Image.open(out)
    assert im.size == (48, 32)
    assert np.asarray(im).std() > 0
    params = read_parameters(out)
    assert params["prompt"] == "a red circle"
    assert params["seed"] == 7 and params["num_inference_steps"] == 2 and params["guidance_scale"] == 2.5
    assert (params["height"], params["width"]) == (32, 48)
    # same seed, same image
    out2 = tmp_path / "img2.png"
    assert main(args[:-1] + [str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out2)), np.asarray(im))
    assert "wrote" in capsys.readouterr().out


def test_generate_rejects_bad_size_with_a_clear_error(tiny_dev_dir, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tiny_dev_dir), "--height", "30", "--out", str(tmp_path / "a.png")])
    assert code == 2
    assert "height must be a positive multiple of" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_info_describes_a_diffusers_folder_and_an_original_file(tiny_dev_dir, tiny_dev_original_files, capsys):
    assert main(["info", str(tiny_dev_dir / "transformer"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["part"] == "transformer" and info["format"].startswith("diffusers")
    assert info["config"]["depth"] == 2 and info["config"]["guidance_embed"] is True
    assert main(["info", str(tiny_dev_original_files[0])]) == 0
    text = capsys.readouterr().out
    assert "original layout" in text and "dev-style" in text and "parameters:" in text


def test_info_on_a_missing_path_fails_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_generate_with_step_cache_records_it(tiny_dev_dir, tmp_path):
    out = tmp_path / "cached.png"
    args = ["generate", "a red circle", "--model", str(tiny_dev_dir), "--steps", "6", "--height", "32", "--width", "32",
            "--max-sequence-length", "16", "--cache", "fbcache", "--cache-threshold", "0.9", "--out", str(out)]
    assert main(args) == 0
    assert read_parameters(out)["cache"] == "fbcache:0.9"
    assert main(args[:-6] + ["--out", str(tmp_path / "plain.png")]) == 0
    assert read_parameters(tmp_path / "plain.png")["cache"] is None


def test_bench_prints_fluxions_own_table(tiny_schnell_dir, capsys):
    assert main(["bench", "--model", str(tiny_schnell_dir), "--repeats", "1", "--threads", "1", "--size", "32"]) == 0
    out = capsys.readouterr().out
    for row in ("| batch 1 |", "| batch 16 |", "| per step |", "fbcache 0.2", "peak RSS"):
        assert row in out


def test_bench_vs_diffusers_runs_the_repo_script(monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["bench", "--vs-diffusers", "--threads", "2", "--repeats", "3"]) == 0
    (cmd,) = calls
    assert cmd[1].endswith("bench/speed.py") and cmd[2:] == ["--threads", "2", "--repeats", "3"]


def test_info_system_says_what_computes_in_which_dtype_and_why(capsys, monkeypatch):
    monkeypatch.setenv("FLUXION_COMPUTE_DTYPE", "float32")
    assert main(["info", "--system"]) == 0
    out = capsys.readouterr().out
    assert "CPU capability" in out and "GFLOP/s" in out
    assert "bfloat16 weights stay bfloat16 in memory and compute in float32: chosen by $FLUXION_COMPUTE_DTYPE" in out


def test_generate_compute_dtype_is_recorded(tiny_dev_dir, tmp_path):
    out = tmp_path / "c.png"
    assert main(["generate", "a red circle", "--model", str(tiny_dev_dir), "--steps", "1", "--height", "32",
                 "--width", "32", "--dtype", "bf16", "--compute-dtype", "float32", "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["dtype"] == "bf16" and params["compute_dtype"] == "float32"


def test_outputs_and_inputs_are_checked_before_any_work(tiny_dev_dir, tmp_path, capsys):
    """One line naming the thing (no traceback), and nothing made first."""
    base = ["generate", "a red circle", "--model", str(tiny_dev_dir), "--steps", "1", "--height", "32", "--width", "32"]
    cases = [
        (base + ["--out", str(tmp_path)], "is a folder"),
        (base + ["--out", str(tmp_path / "missing" / "a.png")], "does not exist"),
        (base + ["--out", str(tmp_path / "a.jpg")], "must name a .png file"),
        (base + ["--seed", str(2**64), "--out", str(tmp_path / "b.png")], "--seed must be in"),
        (["quantize", str(tiny_dev_dir / "transformer"), str(tmp_path / "nope" / "t.gguf")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_unreadable_configs_and_captions_are_named(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("kind: autoencoder\noutput: [unclosed\n")
    assert main(["train", str(bad_yaml)]) == 2
    assert f"{bad_yaml}: not valid YAML" in capsys.readouterr().err
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "a.txt").write_bytes("un café".encode("latin-1"))
    assert main(["train-lora", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "a.txt: not UTF-8 text" in capsys.readouterr().err


def test_bad_model_index_and_string_dtypes(tiny_dev_dir, tmp_path):
    import shutil

    import pytest
    import torch

    from fluxion import FluxPipeline
    from fluxion.checkpoints import CheckpointError

    pipe = FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype="bfloat16")  # a dtype's name, as some scripts pass
    assert pipe.transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype must be"):
        FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype="int8")
    broken = tmp_path / "pipe"
    shutil.copytree(tiny_dev_dir, broken)
    (broken / "model_index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="model_index.json"):
        FluxPipeline.from_pretrained(broken)
