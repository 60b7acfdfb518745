"""The trainer: the loss goes down, checkpoints resume exactly, a killed run resumes uncorrupted."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from fluxion.train.config import TrainConfig, load_config
from fluxion.train.trainer import CHECKPOINT, make_task, step_generator, train
from fluxion.train.state import load_checkpoint

TINY_AE = {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 4, "norm_groups": 4}


def ae_config(tmp_path, **kw) -> TrainConfig:
    base = dict(kind="autoencoder", output=str(tmp_path / "ae"), steps=8, batch_size=4, lr=2e-3, warmup_steps=1,
                checkpoint_every=4, sample_every=0, log_every=1, autoencoder=TINY_AE, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    cfg = ae_config(d, steps=2, export=str(d / "vae"))
    train(cfg)
    return d / "vae"


def flux_config(tmp_path, vae, **kw) -> TrainConfig:
    base = dict(kind="flux", output=str(tmp_path / "flux"), vae_path=str(vae), steps=6, batch_size=4, lr=1e-3,
                warmup_steps=1, checkpoint_every=3, sample_every=0, log_every=1, threads=1, max_sequence_length=8,
                transformer={"hidden_size": 32, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                             "axes_dim": [4, 6, 6]},
                t5={"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
                clip={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "projection_dim": 16})
    return TrainConfig(**{**base, **kw})


def fixed_batch_loss(cfg: TrainConfig, task) -> float:
    with torch.no_grad():
        return sum(task(task.batch(10_000 + i, step_generator(99, i)))[0].mean().item() for i in range(3)) / 3


@pytest.mark.parametrize("kind", ["autoencoder", "flux"])
def test_training_lowers_the_loss(tmp_path, tiny_vae, kind):
    cfg = ae_config(tmp_path, steps=25) if kind == "autoencoder" else flux_config(tmp_path, tiny_vae, steps=25)
    before = fixed_batch_loss(cfg, make_task(cfg))
    train(cfg)
    task = make_task(cfg)
    task.load_state_dict(load_checkpoint(cfg.run_dir / CHECKPOINT)["model"], strict=False)
    after = fixed_batch_loss(cfg, task)
    assert after < 0.9 * before, (before, after)
    assert (cfg.run_dir / "loss.png").stat().st_size > 1000


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_vae):
    full = flux_config(tmp_path / "a", tiny_vae, steps=6)
    train(full)
    part = flux_config(tmp_path / "b", tiny_vae, steps=6, export=str(tmp_path / "b-export"))
    stopped = train(part, until=3)  # `fluxion train --until 3`: a recipe's first phase
    assert stopped["step"] == 3 and not stopped["finished"] and not (tmp_path / "b-export").exists()
    assert load_checkpoint(part.run_dir / CHECKPOINT)["info"]["step"] == 3
    resumed = flux_config(tmp_path / "b", tiny_vae, steps=6, export=str(tmp_path / "b-export"))
    summary = train(resumed)
    assert summary["step"] == 6 and summary["finished"] and (tmp_path / "b-export").is_dir()
    a = load_checkpoint(full.run_dir / CHECKPOINT)
    b = load_checkpoint(resumed.run_dir / CHECKPOINT)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert [s for s, _ in a["info"]["history"]] == [s for s, _ in b["info"]["history"]]


def test_killed_run_resumes_from_an_intact_checkpoint(tmp_path):
    out = tmp_path / "ae"
    cfg_file = tmp_path / "ae.yaml"
    cfg_file.write_text(
        f"kind: autoencoder\noutput: {out}\nsteps: 400\nbatch_size: 2\ncheckpoint_every: 1\nsample_every: 0\n"
        f"threads: 1\nautoencoder: {TINY_AE}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "fluxion.cli", "train", str(cfg_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            state = load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None
            if state is not None and state["info"]["step"] >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the training subprocess wrote no checkpoint in time")
        time.sleep(0.37)  # land the kill anywhere, likely mid-step or mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_checkpoint(out / CHECKPOINT)  # must not be torn
    killed_at = state["info"]["step"]
    assert killed_at >= 3
    cfg = load_config(str(cfg_file), [f"steps={killed_at + 2}"])
    summary = train(cfg)
    assert summary["step"] == killed_at + 2
    assert load_checkpoint(out / CHECKPOINT)["info"]["step"] == killed_at + 2


def test_bad_config_is_rejected_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: autoencoder\noutput: x\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config keys.*learning_rate"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="vae_path"):
        TrainConfig(kind="flux", output="x")
    mix = tmp_path / "mix.yaml"
    mix.write_text("kind: flux\noutput: x\nvae_path: v\n")
    with pytest.raises(ValueError, match=r"kind_probs must be three shares.*summing to 1"):
        load_config(str(mix), ["kind_probs=[0.5, 0.6, 0.2]"])
    with pytest.raises(ValueError, match=r"shape_only_captions must be a chance in \[0, 1\].*got 1.5"):
        load_config(str(mix), ["shape_only_captions=1.5"])
    with pytest.raises(ValueError, match=r"off_palette_shapes must be a chance in \[0, 1\].*got -0.5"):
        load_config(str(mix), ["shape_only_captions=0.25", "off_palette_shapes=-0.5"])
    with pytest.raises(ValueError, match="off_palette_shapes .* needs shape_only_captions > 0"):
        load_config(str(mix), ["off_palette_shapes=0.5"])
    with pytest.raises(ValueError, match="until=0: the step to stop at must be a positive"):
        train(ae_config(tmp_path, steps=2), until=0)
    assert not (tmp_path / "ae").exists()


def test_the_training_mix_reaches_the_batches(tmp_path, tiny_vae):
    from fluxion.data.shapes import COLORS, parse_caption
    task = make_task(flux_config(tmp_path, tiny_vae, kind_probs=[0.0, 1.0, 0.0], caption_dropout=0.0))
    rows = task.batch(0, step_generator(0, 0))
    assert {parse_caption(c).kind for c in rows["captions"]} == {"count"}
    colourless = make_task(flux_config(tmp_path / "b", tiny_vae, kind_probs=[0.0, 1.0, 0.0], caption_dropout=0.0,
                                       shape_only_captions=1.0))
    captions = colourless.batch(0, step_generator(0, 0))["captions"]
    assert captions and not any(colour in c for c in captions for colour in COLORS), captions
    from fluxion.data.loader import BatchSource
    recoloured = flux_config(tmp_path / "c", tiny_vae, shape_only_captions=0.5, off_palette_shapes=0.75)
    assert BatchSource.for_run(recoloured).mix["off_palette"] == 0.75


def test_learning_rate_warms_up_holds_then_decays_to_zero(tmp_path):
    from fluxion.train.trainer import learning_rate
    cfg = ae_config(tmp_path, steps=100, lr=1e-3, warmup_steps=10, decay_steps=40)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 30) == learning_rate(cfg, 60) == pytest.approx(1e-3)
    assert learning_rate(cfg, 80) == pytest.approx(0.5e-3)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3 / 40)
    # Extending a run: the stable phase is unchanged by a larger `steps`, so a checkpoint taken there resumes exactly.
    longer = ae_config(tmp_path, steps=200, lr=1e-3, warmup_steps=10, decay_steps=40)
    assert [learning_rate(longer, s) for s in range(60)] == [learning_rate(cfg, s) for s in range(60)]


def test_data_workers_leave_the_run_unchanged(tmp_path, tiny_vae):
    inline = flux_config(tmp_path / "a", tiny_vae, steps=4)
    ahead = flux_config(tmp_path / "b", tiny_vae, steps=4, data_workers=2)
    train(inline)
    train(ahead)
    a = load_checkpoint(inline.run_dir / CHECKPOINT)["model"]
    b = load_checkpoint(ahead.run_dir / CHECKPOINT)["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_follows_the_cpu_run(tmp_path, tiny_vae):
    cpu = flux_config(tmp_path / "cpu", tiny_vae, steps=3, bf16=False)
    gpu = flux_config(tmp_path / "gpu", tiny_vae, steps=3, bf16=False, device="cuda", data_workers=2)
    a, b = train(cpu), train(gpu)
    assert abs(a["loss"] - b["loss"]) < 2e-2 * abs(a["loss"])  # TF32 convolutions on the GPU


def test_decoder_only_training_keeps_the_encoder_and_its_latent_space(tmp_path, tiny_vae):
    from fluxion.checkpoints import load_autoencoder
    cfg = ae_config(tmp_path, steps=4, vae_init=str(tiny_vae), decoder_only=True, export=str(tmp_path / "out"),
                    autoencoder={})  # the architecture comes from vae_init
    train(cfg)
    before, after = load_autoencoder(tiny_vae), load_autoencoder(tmp_path / "out")
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("encoder."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    assert (after.config.scale_factor, after.config.shift_factor) == (before.config.scale_factor,
                                                                      before.config.shift_factor)
    with pytest.raises(ValueError, match="vae_init"):
        ae_config(tmp_path, decoder_only=True)


class _Planted:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    cfg = ae_config(tmp_path, steps=2)
    marker = tmp_path / "ran"
    cfg.run_dir.mkdir(parents=True)
    torch.save({"step": 1, "payload": _Planted(marker)}, cfg.run_dir / CHECKPOINT)
    with pytest.raises(ValueError, match="not a fluxion checkpoint") as err:  # a pickle: never unpickled
        train(cfg)
    assert str(cfg.run_dir / CHECKPOINT) in str(err.value)
    assert not marker.exists()
    # the same file unpickled in full would have run the code: the test's plant is real
    copy = tmp_path / "planted.pt"
    copy.write_bytes((cfg.run_dir / CHECKPOINT).read_bytes())
    torch.load(copy, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("checkpoint_every", 0), ("lr", float("nan")),
                                         ("steps", -1), ("log_every", 0), ("grad_clip", 0), ("batch_size", 2.5)])
def test_bad_numbers_are_named_when_the_config_is_read(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        ae_config(tmp_path, **{field: value})


def test_resume_with_another_architecture_is_refused_before_touching_the_folder(tmp_path):
    cfg = ae_config(tmp_path, steps=2, checkpoint_every=1)
    train(cfg)
    saved = (cfg.run_dir / "config.json").read_text()
    wider = ae_config(tmp_path, steps=3, autoencoder={**TINY_AE, "ch": 16})
    with pytest.raises(ValueError, match="cannot resume: autoencoder was"):
        train(wider)
    assert (cfg.run_dir / "config.json").read_text() == saved
    train(ae_config(tmp_path, steps=3, checkpoint_every=1))  # the same architecture resumes
    assert load_checkpoint(cfg.run_dir / CHECKPOINT)["info"]["step"] == 3
