"""The one trainer on several processes (torchrun, gloo, 2 CPU processes) equals the trainer on one.

One torchrun launch runs every multi-process job (a launch costs seconds); the tests compare its checkpoints
with single-process runs made here. float32 throughout: the processes sum their gradients in another order than
one process does, so weights agree to rounding, not bit for bit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxion.train.config import TrainConfig
from fluxion.train.lora import LoraTrainConfig, train_lora
from fluxion.train.state import load_checkpoint
from fluxion.train.trainer import CHECKPOINT, train

HERE = Path(__file__).parent
TINY_AE = {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 4, "norm_groups": 4}
# Weights after 3 AdamW steps agree to float32 rounding of the gradient sums (worst differences in the asserts).
STEPS, LR = 3, 1e-3


def flux_config(out: Path, vae: Path, **kw) -> dict:
    return {**dict(kind="flux", output=str(out), vae_path=str(vae), steps=STEPS, batch_size=4, lr=LR,
                   warmup_steps=1, checkpoint_every=1, sample_every=0, log_every=1, threads=1, bf16=False,
                   max_sequence_length=8, caption_dropout=0.25,
                   transformer={"hidden_size": 32, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                                "axes_dim": [4, 6, 6]},
                   t5={"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
                   clip={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "projection_dim": 16}), **kw}


def lora_config(out: Path, model: Path, data: Path, **kw) -> dict:
    return {**dict(model=str(model), data=str(data), output=str(out), instance_prompt="a sks", steps=STEPS,
                   batch_size=1, grad_accum=4, lr=1e-2, resolution=32, validation_every=0, checkpoint_every=1,
                   caption_dropout=0.25, random_flip=True), **kw}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dev_dir):
    """Single-process runs here, multi-process runs in one torchrun launch; returns their folders."""
    root = tmp_path_factory.mktemp("dist")
    vae = root / "vae"
    train(TrainConfig(kind="autoencoder", output=str(root / "ae"), steps=2, batch_size=4, warmup_steps=1,
                      sample_every=0, autoencoder=TINY_AE, threads=1, export=str(vae)))
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"img{i}.png")
    d = {name: root / name for name in ("one", "two", "one_then_two", "two_then_one", "lora_one", "lora_two")}
    # one process, here
    train(TrainConfig(**flux_config(d["one"], vae)))
    train(TrainConfig(**flux_config(d["one_then_two"], vae, steps=2)))
    train_lora(LoraTrainConfig(**lora_config(d["lora_one"], tiny_dev_dir, data)))
    # two processes, one launch
    jobs = [{"kind": "train", "config": flux_config(d["two"], vae)},
            {"kind": "train", "config": flux_config(d["one_then_two"], vae)},  # resumes the 1-process checkpoint
            {"kind": "train", "config": flux_config(d["two_then_one"], vae, steps=2)},
            {"kind": "lora", "config": lora_config(d["lora_two"], tiny_dev_dir, data)}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(HERE / "distributed_runs.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # back to one process: resume the 2-process checkpoint
    train(TrainConfig(**flux_config(d["two_then_one"], vae)))
    return d, proc.stdout


def assert_same_weights(a: Path, b: Path) -> float:
    sa, sb = load_checkpoint(a / CHECKPOINT), load_checkpoint(b / CHECKPOINT)
    assert sa["info"]["step"] == sb["info"]["step"] == STEPS
    assert sa["model"].keys() == sb["model"].keys()
    worst = 0.0
    for name, x in sa["model"].items():
        worst = max(worst, (x - sb["model"][name]).abs().max().item())
    assert worst < 1e-5, (a.name, b.name, worst)  # measured: 2.5e-7 (flux), 8.3e-7 (LoRA)
    for (s1, l1), (s2, l2) in zip(sa["info"]["history"], sb["info"]["history"]):  # the global batch's loss
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    return worst


def test_two_processes_train_the_weights_of_one(runs):
    d, stdout = runs
    assert load_checkpoint(d["two"] / CHECKPOINT)["info"]["processes"] == 2
    assert_same_weights(d["one"], d["two"])
    # and the weights moved: equality is not of two untouched models
    first = load_checkpoint(d["one"] / CHECKPOINT)["model"]
    assert any(t.abs().sum() > 0 for n, t in first.items() if "final_layer.linear" in n)


def test_resume_across_process_counts(runs):
    d, _ = runs
    assert_same_weights(d["one"], d["one_then_two"])  # 1 process, then 2
    assert_same_weights(d["one"], d["two_then_one"])  # 2 processes, then 1


def test_lora_on_two_processes_equals_one(runs):
    d, _ = runs
    assert_same_weights(d["lora_one"], d["lora_two"])
    assert (d["lora_two"] / "pytorch_lora_weights.safetensors").is_file()


def test_only_rank_zero_writes(runs):
    d, stdout = runs  # rank 1 ran with every write into the run folders raising, and finished every job
    for name in ("two", "one_then_two", "two_then_one", "lora_two"):
        assert f"rank 1 finished {d[name]}" in stdout and f"rank 0 finished {d[name]}" in stdout
    assert stdout.count("resumed") == 1  # the 1 -> 2 resume, printed once (rank 0)


def test_a_batch_that_does_not_split_is_refused(tmp_path):
    from fluxion.train.trainer import LoopSettings, fit

    class NoTask(torch.nn.Module):
        pass

    settings = LoopSettings(output=str(tmp_path), steps=1, batch_size=3, micro_batch=3, lr=1e-3)
    from unittest import mock

    with mock.patch("accelerate.Accelerator.num_processes", new_callable=mock.PropertyMock, return_value=2), \
            pytest.raises(ValueError, match="batch_size 3 does not split over 2 processes"):
        fit(lambda device: NoTask(), settings, {}, ())
