"""Run training jobs on every process of a torchrun launch (a helper of test_distributed_training.py).

`torchrun --nproc-per-node N tests/train/distributed_runs.py JOBS.json`: each job is {"kind": "train" | "lora",
"config": {...}}, run in order. On every rank but 0, writing into a job's output folder raises (os.replace and
open for writing are guarded), so a run that finishes proves that only rank 0 wrote there.
"""
import builtins
import io
import json
import os
import sys
from pathlib import Path


def guard_writes(folders: list[Path]) -> None:
    roots = [str(f.resolve()) for f in folders]

    def inside(path) -> bool:
        try:
            p = str(Path(os.fspath(path)).resolve())
        except TypeError:  # a file descriptor
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    real_open, real_replace = builtins.open, os.replace

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            raise PermissionError(f"rank {os.environ['RANK']} wrote {file}")
        return real_open(file, mode, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if inside(dst):
            raise PermissionError(f"rank {os.environ['RANK']} replaced {dst}")
        return real_replace(src, dst, *args, **kwargs)

    builtins.open = io.open = open_
    os.replace = replace


def main() -> None:
    import torch

    jobs = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    if os.environ.get("RANK", "0") != "0":
        guard_writes([Path(j["config"]["output"]) for j in jobs])
    for job in jobs:
        if job["kind"] == "lora":
            from fluxion.train.lora import LoraTrainConfig, train_lora

            train_lora(LoraTrainConfig(**job["config"]))
        else:
            from fluxion.train.config import TrainConfig
            from fluxion.train.trainer import train

            train(TrainConfig(**job["config"]))
        print(f"rank {os.environ.get('RANK', '0')} finished {job['config']['output']}", flush=True)


if __name__ == "__main__":
    main()
