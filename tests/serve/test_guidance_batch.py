"""Mixed-guidance batching (#17): requests differing only in guidance_scale / true_cfg_scale run in ONE batch
(`pipe.guidance_per_sample`), and each image stays within BATCH_TOL of its own offline run."""
from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import fastapi.testclient  # noqa: E402
from PIL import Image  # noqa: E402

import fluxion  # noqa: E402
from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from .jobs_wait import FINAL, wait_job  # noqa: E402

STEPS = 4
BATCH_TOL = 2  # of 255, as tests/serve/test_service.py


def _wait(client, job_id, statuses=FINAL, timeout=120):
    return wait_job(client, job_id, statuses, timeout)


def _image(job) -> np.ndarray:
    b64 = job["result"]["data"][0]["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def _serve_mixed(pipe, size, requests):
    """Submit `requests` (dicts of body fields) behind a running job of another size; return (jobs, batch sizes)."""
    app = create_app(ServeConfig(batch_window_ms=300, max_batch=4), pipe)
    worker_hook = pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.05))
    try:
        with fastapi.testclient.TestClient(app) as c:
            t = time.time()
            while c.get("/health").json().get("status") != "ok":
                assert time.time() - t < 60
                time.sleep(0.05)
            other = 2 * size if size <= 32 else size // 2
            blocker = c.post("/v1/jobs", json={"prompt": "x", "size": f"{other}x{other}", "steps": STEPS, "seed": 0})
            _wait(c, blocker.json()["id"], ("running", "succeeded"))
            ids = [c.post("/v1/jobs", json={"size": f"{size}x{size}", "steps": STEPS, **r}).json()["id"]
                   for r in requests]
            jobs = [_wait(c, i) for i in ids]
            store = app.state.store
            sizes = [[d["batch_size"] for n, d in store.jobs[i].events if n == "running"] for i in ids]
    finally:
        worker_hook.remove()
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    return jobs, sizes


def _offline(pipe, size, prompt, seed, **kw) -> np.ndarray:
    out = pipe(prompt, height=size, width=size, num_inference_steps=STEPS,
               generator=torch.Generator("cpu").manual_seed(seed), **kw)
    return np.asarray(out.images[0]).astype(int)


def test_true_cfg_values_share_a_batch_on_fluxion_mini():
    pipe = fluxion.FluxPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    reqs = [dict(prompt="a red circle", seed=41, true_cfg_scale=2.0, guidance_scale=1.0),
            dict(prompt="a blue square", seed=42, true_cfg_scale=5.0, negative_prompt="green"),
            dict(prompt="a yellow star", seed=43, true_cfg_scale=0.5)]  # CFG flag on, but no CFG pass: keeps v
    jobs, sizes = _serve_mixed(pipe, 64, reqs)
    assert sizes == [[3]] * 3
    for r, j in zip(reqs, jobs):
        kw = {k: r[k] for k in ("true_cfg_scale", "guidance_scale", "negative_prompt") if k in r}
        assert np.abs(_image(j) - _offline(pipe, 64, r["prompt"], r["seed"], **kw)).max() <= BATCH_TOL
    # the per-image value mattered
    assert np.abs(_image(jobs[0]) - _offline(pipe, 64, "a red circle", 41, true_cfg_scale=5.0)).max() > 3


def test_distilled_guidance_values_share_a_batch(tiny_dev_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embed
    reqs = [dict(prompt="a red cat", seed=5, guidance_scale=1.5, true_cfg_scale=1.0),
            dict(prompt="a blue dog", seed=6, guidance_scale=6.0, true_cfg_scale=1.0)]
    cfg_reqs = [dict(prompt="a red cat", seed=7, guidance_scale=2.0, true_cfg_scale=2.0, negative_prompt="grey"),
                dict(prompt="a blue dog", seed=8, guidance_scale=5.0, true_cfg_scale=4.0, negative_prompt="dull")]
    for batch in (reqs, cfg_reqs):
        jobs, sizes = _serve_mixed(pipe, 32, batch)
        assert sizes == [[2]] * 2
        for r, j in zip(batch, jobs):
            kw = {k: r[k] for k in ("true_cfg_scale", "guidance_scale", "negative_prompt") if k in r}
            assert np.abs(_image(j) - _offline(pipe, 32, r["prompt"], r["seed"], **kw)).max() <= BATCH_TOL
