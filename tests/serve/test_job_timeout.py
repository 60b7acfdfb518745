"""A job that runs past request_timeout_s fails with code "timeout" at a step boundary; the service goes on."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import fastapi.testclient  # noqa: E402

import fluxion  # noqa: E402
from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from .jobs_wait import FINAL, wait_job  # noqa: E402


def _wait(client, job_id, statuses=FINAL, timeout=120):
    return wait_job(client, job_id, statuses, timeout)


def test_a_job_past_its_timeout_fails_alone():
    pipe = fluxion.FluxPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    slow = pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.05))
    try:
        app = create_app(ServeConfig(request_timeout_s=0.5, max_steps=50), pipe)
        with fastapi.testclient.TestClient(app) as c:
            t = time.time()
            while c.get("/health").json().get("status") != "ok":
                assert time.time() - t < 60
                time.sleep(0.05)
            long = _wait(c, c.post("/v1/jobs", json={"prompt": "a red circle", "size": "64x64", "steps": 40}).json()["id"])
            assert long["status"] == "failed" and long["error"]["code"] == "timeout"
            assert long["progress"]["step"] < 40
            slow.remove()
            ok = _wait(c, c.post("/v1/jobs", json={"prompt": "a red circle", "size": "64x64", "steps": 2}).json()["id"])
            assert ok["status"] == "succeeded"
            assert 'fluxion_errors_total{code="timeout"} 1.0' in c.get("/metrics").text
    finally:
        slow.remove()
