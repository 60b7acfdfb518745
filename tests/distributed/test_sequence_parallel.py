"""Sequence-parallel inference (`fluxion.distributed`) on 2 CPU processes over gloo equals one process.

One `torch.multiprocessing` spawn runs every check (a spawn costs seconds); the tests read its results. A tiny
random transformer (float32, 5 heads: the degree does not divide them; 7 text + 13 image tokens: odd counts).
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD = 2
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- what every rank runs


def _tiny(seed: int = 0):
    from fluxion import FluxConfig, FluxTransformer

    torch.manual_seed(seed)
    cfg = FluxConfig(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=80, num_heads=5, depth=2,
                     depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=True)
    return FluxTransformer(cfg).eval()


def _inputs(batch: int = 2, n_txt: int = 7, n_img: int = 13):
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], -1).float()
    return dict(img=torch.randn(batch, n_img, 16, generator=g), img_ids=img_ids,
                txt=torch.randn(batch, n_txt, 32, generator=g), txt_ids=torch.zeros(n_txt, 3),
                timesteps=torch.tensor([0.7, 0.3][:batch]), y=torch.randn(batch, 32, generator=g),
                guidance=torch.full((batch,), 3.5))


def _residuals(batch: int = 2, n_img: int = 13):
    from fluxion.model.transformer import BlockResiduals

    g = torch.Generator().manual_seed(2)
    return BlockResiduals([0.1 * torch.randn(batch, n_img, 80, generator=g)],
                          [0.1 * torch.randn(1, n_img, 80, generator=g)])  # batch 1: tiled over the batch


def _velocity_error(config, fallback: bool = False) -> dict:
    from fluxion.distributed import communication_bytes

    with torch.no_grad():
        ref = _tiny()(**_inputs(), residuals=_residuals())
        tf = _tiny()
        tf.enable_parallelism(config=config)
        if fallback:
            for c in tf.parallel.comms:
                c.all_to_all_works = False
        got = tf(**_inputs(), residuals=_residuals())
    sent = sum(c.bytes_received for c in tf.parallel.comms)
    expect = communication_bytes(config, 2, (7, 13), 80, 5, 4, torch.float32, out_channels=16)
    return dict(err=(got - ref).abs().max().item(), shape=tuple(got.shape), bytes=sent, expect=expect)


def _step_cache_error() -> dict:
    """The StepRunner's first-block-cache path: same velocities and the same skip decisions."""
    from fluxion import ContextParallelConfig
    from fluxion.model.step_runner import StepRunner

    out = {}
    with torch.no_grad():
        for name, tf in (("ref", _tiny()), ("par", _tiny())):
            if name == "par":
                tf.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
            runner, x, vs = StepRunner(tf, threshold=0.5), _inputs(), []
            for step, t in enumerate((0.9, 0.89, 0.88, 0.6, 0.59)):  # one recomputed, three reused
                x["timesteps"] = torch.tensor([t, t])
                vs.append(runner(step, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                 x["guidance"]))
            out[name] = (torch.stack(vs), dict(runner.stats))
    return dict(err=(out["ref"][0] - out["par"][0]).abs().max().item(), stats=(out["ref"][1], out["par"][1]))


def _refusals() -> dict:
    from fluxion import ContextParallelConfig

    out = {}
    try:
        _tiny().enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ring_degree=2))
    except ValueError as e:
        out["world"] = str(e)
    tf = _tiny()
    tf.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    try:
        with torch.no_grad():
            tf(**_inputs(), attn_mask=torch.ones(20, 20, dtype=torch.bool))
    except ValueError as e:
        out["mask"] = str(e)
    return out


def _pipelines(folder: str) -> dict:
    """FluxPipeline (batch of 2 prompts, and stacked true CFG) and FluxKontextPipeline: parallel == single."""
    import fluxion
    from fluxion import ContextParallelConfig
    from PIL import Image

    out = {}
    reference = Image.fromarray((np.arange(36 * 28 * 3).reshape(36, 28, 3) % 251).astype(np.uint8))
    calls = {
        "txt2img": ("FluxPipeline", dict(prompt=["a red cube", "a blue ball"], height=36, width=28)),
        "true_cfg": ("FluxPipeline", dict(prompt="a red cube", negative_prompt="blurry", true_cfg_scale=2.0,
                                          height=36, width=28)),
        "kontext": ("FluxKontextPipeline", dict(prompt="make it blue", image=reference, max_area=32 * 32,
                                                _auto_resize=False)),
    }
    for name, (cls, kwargs) in calls.items():
        pipe = getattr(fluxion, cls).from_pretrained(folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        latents = []
        for parallel in (False, True):
            if parallel:
                pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
            r = pipe(**kwargs, num_inference_steps=2, max_sequence_length=16, output_type="latent",
                     generator=torch.Generator().manual_seed(3))
            latents.append(torch.as_tensor(np.asarray(r.images)))
        out[name] = dict(err=(latents[0] - latents[1]).abs().max().item(), std=latents[0].std().item())
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, folder: str, only: tuple = ()) -> None:
    import torch.distributed as dist
    from fluxion import ContextParallelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    checks = {
        "ulysses": lambda: _velocity_error(ContextParallelConfig(ulysses_degree=world)),
        "ring": lambda: _velocity_error(ContextParallelConfig(ring_degree=world)),
        "ulysses_x_ring1": lambda: _velocity_error(ContextParallelConfig(ulysses_degree=world, ring_degree=1)),
        "fallback": lambda: _velocity_error(ContextParallelConfig(ulysses_degree=world), fallback=True),
        "step_cache": _step_cache_error,
        "refusals": _refusals,
        "pipelines": lambda: _pipelines(folder),
        "unified": lambda: _velocity_error(ContextParallelConfig(ulysses_degree=2, ring_degree=world // 2)),
    }
    checks = {k: v for k, v in checks.items() if k in only} if only else {k: v for k, v in checks.items()
                                                                           if k != "unified"}
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[name] = traceback.format_exc()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def results(tiny_dev_dir, tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("sp")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out), str(tiny_dev_dir)), nprocs=WORLD,
                       start_method="spawn", join=True)
    ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    return ranks


def _get(results, name):
    values = [r[name] for r in results]
    for v in values:
        if isinstance(v, str):
            pytest.fail(v)
    return values


@pytest.mark.parametrize("name", ["ulysses", "ring", "ulysses_x_ring1", "fallback"])
def test_velocity_equals_single_process(results, name):
    for v in _get(results, name):
        assert v["shape"] == (2, 13, 16)
        assert v["err"] < TOL, v


@pytest.mark.parametrize("name", ["ulysses", "ring"])
def test_communication_bytes_matches_the_collectives(results, name):
    for v in _get(results, name):
        assert v["bytes"] == v["expect"] > 0, v


def test_all_gather_fallback_moves_more(results):
    (u0, _), (f0, _) = _get(results, "ulysses"), _get(results, "fallback")
    assert f0["bytes"] > u0["bytes"]  # the forced path really ran (all_gather instead of all_to_all)


def test_step_cache_path_matches_and_decides_alike(results):
    for v in _get(results, "step_cache"):
        assert v["err"] < TOL, v
        assert v["stats"][0] == v["stats"][1]
        assert 0 < v["stats"][1]["skipped"] < 4  # both paths were exercised


def test_wrong_world_size_and_attn_mask_are_refused(results):
    for v in _get(results, "refusals"):
        assert "ring_degree (2) x ulysses_degree (2)" in v["world"] and "world size (2)" in v["world"]
        assert "attn_mask" in v["mask"]


@pytest.mark.parametrize("name", ["txt2img", "true_cfg", "kontext"])
def test_pipeline_latents_equal_single_process(results, name):
    for v in _get(results, "pipelines"):
        assert v[name]["err"] < TOL, v
        assert v[name]["std"] > 0.01


def test_unified_ulysses2_x_ring2_on_four_processes(tmp_path):
    """The 2D mesh (Ulysses inside rows of 2 ranks, Ring across the rows): 4 processes, velocity check only."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(4, _free_port(), str(tmp_path), "", ("unified",)), nprocs=4,
                       start_method="spawn", join=True)
    for r in range(4):
        v = pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())["unified"]
        if isinstance(v, str):
            pytest.fail(v)
        assert v["err"] < TOL and v["shape"] == (2, 13, 16), v
        assert v["bytes"] == v["expect"], v


def test_config_checks_without_processes():
    from fluxion import ContextParallelConfig

    ContextParallelConfig(ring_degree=2, ulysses_degree=3).check(6)
    with pytest.raises(ValueError, match=r"ring_degree \(1\) x ulysses_degree \(3\) = 3 .*world size \(2\)"):
        ContextParallelConfig(ulysses_degree=3).check(2)
    with pytest.raises(ValueError, match="rotate_method"):
        ContextParallelConfig(rotate_method="alltoall")
    with pytest.raises(ValueError, match="positive int"):
        ContextParallelConfig(ulysses_degree=0)


def test_cli_under_torchrun_rank0_writes_the_same_png(tiny_dev_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["generate", "a red cube", "--model", str(tiny_dev_dir), "--height", "36", "--width", "28",
              "--steps", "2", "--seed", "5"]
    from fluxion.cli import main

    single = tmp_path / "single.png"
    assert main([*common, "--out", str(single)]) == 0
    par = tmp_path / "par.png"
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m",
                        "fluxion.cli", *common, "--out", str(par), "--parallel", "ulysses"],
                       env=env, timeout=180, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1  # rank 0 alone
    from PIL import Image

    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (single, par))
    assert np.abs(a - b).max() <= 1


def test_cli_parallel_without_torchrun_is_refused(tiny_dev_dir, tmp_path, capsys):
    from fluxion.cli import main

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        assert main(["generate", "x", "--model", str(tiny_dev_dir), "--out", str(tmp_path / "o.png"),
                     "--parallel", "ring"]) == 2
    finally:
        os.environ.update(env)
    assert "torchrun" in capsys.readouterr().err
