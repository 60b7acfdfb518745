"""`fluxion serve --workers N`: N replica processes behind the one queue (fluxion-mini, workers=2).

Unbatched (max_batch=1) images are the offline `pipe(prompt, generator=Generator("cpu").manual_seed(seed))`
images bit for bit; each replica runs with 1 torch thread, as this process does under OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import base64
import io
import os
import signal
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import fastapi.testclient  # noqa: E402
from PIL import Image  # noqa: E402

from fluxion.cli import main as cli_main  # noqa: E402
from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from .jobs_wait import wait_job  # noqa: E402
from .replica_hooks import slow  # noqa: E402

SIZE = 64
STEPS = 4
LONG = 40  # steps of a job that runs long enough (0.03 s sleep per forward) to be acted on while running


def _wait_health(c, ok, timeout=90) -> dict:
    t = time.time()
    while True:
        r = c.get("/health")
        if ok(r):
            return r.json()
        assert time.time() - t < timeout, r.json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    loras = tmp_path_factory.mktemp("worker_loras")
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    config = ServeConfig(workers=2, replica_threads=1, max_batch=1, batch_window_ms=0, max_steps=LONG,
                         preview_every=4, lora_dir=str(loras))
    app = create_app(config, replica_init=slow)
    with fastapi.testclient.TestClient(app) as c:
        first = c.get("/health")  # the replicas take seconds to load
        assert first.status_code == 503 and "replicas ready" in first.json()["message"], first.json()
        _wait_health(c, lambda r: r.status_code == 200)
        yield c


@pytest.fixture(scope="module")
def pipe():
    from fluxion import FluxPipeline

    p = FluxPipeline.from_pretrained()
    p.set_progress_bar_config(disable=True)
    return p


def _submit(c, steps=STEPS, **kw) -> str:
    r = c.post("/v1/jobs", json={"prompt": "a red circle", "size": f"{SIZE}x{SIZE}", "steps": steps, **kw})
    assert r.status_code == 202, r.json()
    return r.json()["id"]


def _running(c, job_id) -> dict:
    """Wait until the job has made a step in its replica."""
    t = time.time()
    while True:
        j = c.get(f"/v1/jobs/{job_id}").json()
        if j["status"] == "running" and j["progress"]["step"] >= 1:
            return j
        assert j["status"] in ("queued", "running") and time.time() - t < 60, j
        time.sleep(0.01)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def test_health_models_and_metrics_report_the_replicas(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["workers"] == 2
    pids = [r["pid"] for r in h["replicas"]]
    assert [r["index"] for r in h["replicas"]] == [0, 1] and len(set(pids)) == 2 and os.getpid() not in pids
    assert client.get("/v1/models").json()["data"][0]["workers"] == 2
    text = client.get("/metrics").text
    assert "fluxion_workers 2.0" in text
    assert 'fluxion_worker_busy{worker="0"}' in text and 'fluxion_worker_busy{worker="1"}' in text


def test_two_concurrent_jobs_run_in_two_replicas_and_equal_the_offline_images(client, pipe):
    seeds = (11, 12)
    ids = [_submit(client, steps=12, seed=s, prompt=f"shape {s}") for s in seeds]  # 12 steps: both start at once
    jobs = [wait_job(client, i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    pids = {j["worker"]["pid"] for j in jobs}
    assert len(pids) == 2 and os.getpid() not in pids, [j["worker"] for j in jobs]
    for s, j in zip(seeds, jobs):
        out = pipe(f"shape {s}", height=SIZE, width=SIZE, num_inference_steps=12,
                   generator=torch.Generator("cpu").manual_seed(s))
        assert np.array_equal(_pixels(j["result"]["data"][0]["b64_json"]), np.asarray(out.images[0]).astype(int))
    events = [name for name, _ in client.app.state.store.get(ids[0]).events]  # what SSE readers get
    assert events.count("preview") == 2 and events.count("progress") >= 12 and events[-1] == "result", events
    assert "fluxion_step_seconds_count" in client.get("/metrics").text  # the replicas' metrics reach /metrics
    # the synchronous endpoint goes through the replicas too
    r = client.post("/v1/images/generations", json={"prompt": "shape 11", "size": f"{SIZE}x{SIZE}", "steps": 12,
                                                    "seed": 11})
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"] == jobs[0]["result"]["data"][0]["b64_json"]


def test_cancel_a_job_running_in_a_replica(client):
    job_id = _submit(client, steps=LONG)
    _running(client, job_id)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    j = wait_job(client, job_id)
    assert j["status"] == "cancelled" and 1 <= j["progress"]["step"] < LONG, j
    ok = wait_job(client, _submit(client))  # the replica goes on
    assert ok["status"] == "succeeded"


def test_an_error_in_a_replica_fails_the_job_with_its_code(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": f"{SIZE}x{SIZE}",
                                                    "steps": STEPS, "loras": [{"name": "broken"}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "lora_failed", r.json()
    assert "broken" in r.json()["error"]["message"]
    assert wait_job(client, _submit(client))["status"] == "succeeded"


def test_a_killed_replica_fails_its_job_and_is_restarted(client):
    before = {r["index"]: r["pid"] for r in client.get("/health").json()["replicas"]}
    job_id = _submit(client, steps=LONG)
    victim = _running(client, job_id)["worker"]
    os.kill(victim["pid"], signal.SIGKILL)
    j = wait_job(client, job_id)
    assert j["status"] == "failed" and j["error"]["code"] == "worker_crashed", j
    msg = j["error"]["message"]
    assert f"replica {victim['index']}" in msg and str(victim["pid"]) in msg and "SIGKILL" in msg, msg
    # the service keeps serving: the other replica at once, the killed one once restarted
    assert wait_job(client, _submit(client))["status"] == "succeeded"
    h = _wait_health(client, lambda r: all(x["state"] != "restarting" for x in r.json()["replicas"]) and
                     r.json()["replicas"][victim["index"]]["pid"] != victim["pid"])
    again = h["replicas"][victim["index"]]
    assert again["state"] in ("ready", "busy") and again["restarts"] == 1 and again["pid"] != before[victim["index"]]
    ids = [_submit(client, steps=12, seed=s) for s in (1, 2)]
    done = [wait_job(client, i) for i in ids]
    assert all(d["status"] == "succeeded" for d in done), done
    text = client.get("/metrics").text
    assert f'fluxion_replica_restarts_total{{worker="{victim["index"]}"}} 1.0' in text
    assert 'fluxion_errors_total{code="worker_crashed"} 1.0' in text


def test_workers_must_be_a_positive_integer(capsys):
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(SystemExit) as e:
            cli_main(["serve", "--workers", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "argument --workers: must be an integer >= 1" in err and bad in err, err
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            ServeConfig(workers=bad)
    with pytest.raises(ValueError, match="replica_threads must be an integer >= 1"):
        ServeConfig(workers=2, replica_threads=0)
    with pytest.raises(ValueError, match="each replica process loads the model itself"):
        create_app(ServeConfig(workers=2), pipe=object())


def test_threads_per_replica_split_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert ServeConfig(workers=2).threads_per_replica() == max(1, cores // 2)
    assert ServeConfig(workers=cores * 4).threads_per_replica() == 1
    assert ServeConfig(workers=2, replica_threads=3).threads_per_replica() == 3


def test_an_inpainting_edit_runs_in_a_replica_and_equals_offline(client, pipe):
    from fluxion.images import to_rgb
    from fluxion.pipelines.inpaint import FluxInpaintPipeline

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    mask = Image.fromarray(mask, "L")

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    r = client.post("/v1/images/edits", files={"image": ("i.png", png(image), "image/png"),
                                               "mask": ("m.png", png(mask), "image/png")},
                    data={"prompt": "a red circle", "size": f"{SIZE}x{SIZE}", "steps": "8", "seed": "5",
                          "strength": "0.75"})
    assert r.status_code == 200, r.text
    out = FluxInpaintPipeline.from_pipe(pipe)("a red circle", image=to_rgb(image), mask_image=to_rgb(mask),
                                              height=SIZE, width=SIZE, num_inference_steps=8, strength=0.75,
                                              generator=torch.Generator("cpu").manual_seed(5))
    assert np.array_equal(_pixels(r.json()["data"][0]["b64_json"]), np.asarray(out.images[0]).astype(int))
