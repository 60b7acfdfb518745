"""Guidance distillation (`fluxion distill`, method guidance) on fluxion-mini as the teacher: the student starts as
the teacher's conditional prediction, its target is the teacher's CFG combination, a few steps lower its loss, and
the export is a dev-style model that fluxion and diffusers load."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxion.train.config import DistillConfig
from fluxion.train.distill import GuidanceDistillTask, student_from_teacher
from fluxion.train.trainer import step_generator, train

MINI = Path(__file__).parents[2] / "models" / "fluxion-mini"


def config(tmp_path, **kw) -> DistillConfig:
    return DistillConfig(**{**dict(kind="distill", output=str(tmp_path / "run"), teacher=str(MINI), steps=4,
                                   batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2, sample_every=0,
                                   log_every=1, threads=1, bf16=False, max_sequence_length=20,
                                   timestep_sampling="uniform"), **kw})


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    torch.manual_seed(0)
    return GuidanceDistillTask(config(tmp_path_factory.mktemp("d")))


def test_the_student_starts_as_the_teachers_conditional_prediction(task):
    x = torch.randn(2, 64, 64)
    txt, pooled, txt_ids = task.pipe.encode_prompt(["a red circle", "two blue squares"])
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_c = task.teacher(x, task.img_ids, txt, txt_ids, sigma, pooled)
        for w in (1.0, 4.0):
            v = task.student(x, task.img_ids, txt, txt_ids, sigma, pooled, torch.full((2,), w))
            torch.testing.assert_close(v, v_c, rtol=0, atol=1e-6)
    assert task.student.config.guidance_embed and not task.teacher.config.guidance_embed
    with pytest.raises(ValueError, match="already has a guidance embedder"):
        student_from_teacher(task.student)


def test_the_target_is_the_teachers_cfg_combination_computed_separately(task):
    rows = task.batch(0, step_generator(0, 0))
    assert rows["w"].min() >= 1.0 and rows["w"].max() <= 6.0 and rows["w"].std() > 0
    x0 = torch.randn(4, 64, 64)
    x_t = (1 - rows["sigma"])[:, None, None] * x0 + rows["sigma"][:, None, None] * rows["noise"]
    txt, pooled, txt_ids = task.pipe.encode_prompt(rows["captions"])
    target = task.target(x_t, rows, txt, pooled, txt_ids)
    empty, empty_pooled, _ = task.pipe.encode_prompt("")  # the pipeline's default negative prompt
    with torch.no_grad():
        for i in range(4):  # one row at a time, the two predictions in separate calls
            v_c = task.teacher(x_t[i:i + 1], task.img_ids, txt[i:i + 1], txt_ids, rows["sigma"][i:i + 1],
                               pooled[i:i + 1])
            v_u = task.teacher(x_t[i:i + 1], task.img_ids, empty, txt_ids, rows["sigma"][i:i + 1], empty_pooled)
            # batched against separate forwards: float32 rounding, amplified by w (up to 6)
            torch.testing.assert_close(target[i:i + 1], v_u + rows["w"][i] * (v_c - v_u), rtol=0, atol=1e-4)


def test_distillation_lowers_its_loss_and_exports_a_dev_style_model(tmp_path):
    from fluxion import FluxPipeline
    from fluxion.train.state import load_checkpoint
    from fluxion.train.trainer import CHECKPOINT

    cfg = config(tmp_path, steps=12, lr=2e-4, export=str(tmp_path / "student"))
    fresh = GuidanceDistillTask(cfg)

    def fixed_loss(t) -> float:
        with torch.no_grad():
            return float(np.mean([t(t.batch(10_000 + i, step_generator(99, i)))[0].mean().item() for i in range(3)]))

    before = fixed_loss(fresh)
    train(cfg)
    fresh.load_state_dict(load_checkpoint(cfg.run_dir / CHECKPOINT)["model"], strict=False)
    after = fixed_loss(fresh)
    # measured 0.1527 -> 0.1495 (AVX-512 bf16 machine, float32): the guidance input is learned slowly (the new
    # embedder starts at zero and moves every block's modulation); larger learning rates damage the teacher's weights
    assert after < 0.99 * before, (before, after)

    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["_fluxion_defaults"]["guidance_scale"] == 3.0 and index["_fluxion_defaults"]["true_cfg_scale"] == 1.0
    pipe = FluxPipeline.from_pretrained(tmp_path / "student")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embed
    kw = dict(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    a = pipe("a red circle", **kw).images
    b = pipe("a red circle", **{**kw, "generator": torch.Generator().manual_seed(0)}, guidance_scale=6.0).images
    assert np.abs(a - b).max() > 1e-3  # the guidance input steers the student

    from diffusers import FluxPipeline as DiffusersFlux  # the export is a dev-style folder diffusers loads
    ref = DiffusersFlux.from_pretrained(tmp_path / "student")
    assert ref.transformer.config.guidance_embeds


def test_the_training_mix_reaches_the_distillation_batches(tmp_path):
    from fluxion.data.shapes import parse_caption
    counts_only = GuidanceDistillTask(config(tmp_path, kind_probs=[0.0, 1.0, 0.0]))
    _, captions = counts_only.batches(0)
    assert {parse_caption(c).kind for c in captions} == {"count"}
