"""`fluxion serve`: the real server (uvicorn on a free loopback port, in a background thread) on fluxion-mini.

Tolerance: an image served alone is bit-identical to the offline `pipe(prompt, generator=Generator("cpu")
.manual_seed(seed))` image; an image served inside a batch differs from it by at most 2/255 per pixel (float32
rounding of batched matrix products).
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402

from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from .jobs_wait import FINAL, wait_job  # noqa: E402

KEY = "test-key"
SIZE = 64
STEPS = 4
BATCH_TOL = 2  # of 255


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t = time.time()
        while not self.server.started:
            assert time.time() - t < 30, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def pipe():
    from fluxion import FluxPipeline

    p = FluxPipeline.from_pretrained()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory):
    """A folder with a tiny random LoRA for fluxion-mini (style.safetensors), and a symlink pointing out of it."""
    from fluxion.lora import add_trainable_adapter

    root = tmp_path_factory.mktemp("serve_loras")
    folder = root / "loras"
    folder.mkdir()
    for name, seed in (("style", 3), ("ink", 4)):
        params = add_trainable_adapter(pipe.transformer, "mk", rank=2, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for q in params:
                q.normal_(0, 0.3)
        pipe.save_lora_weights(folder / f"{name}.safetensors", adapter_name="mk")
        pipe.delete_adapters("mk")
    outside = root / "outside"
    outside.mkdir()
    (outside / "evil.safetensors").write_bytes((folder / "style.safetensors").read_bytes())
    os.symlink(outside / "evil.safetensors", folder / "evil.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(pipe, lora_dir):
    config = ServeConfig(lora_dir=str(lora_dir), api_key=KEY, max_queue=3, max_batch=4, batch_window_ms=300,
                         max_pixels=128 * 128, max_steps=12, max_n=3, max_body_bytes=32 * 1024, preview_every=2)
    with Server(create_app(config, pipe)) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _offline(pipe, prompt, seed, size=SIZE, steps=STEPS, **kw) -> np.ndarray:
    out = pipe(prompt, height=size, width=size, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(seed), **kw)
    return np.asarray(out.images[0]).astype(int)


def _body(prompt="a red circle", **kw):
    return {"prompt": prompt, "size": f"{SIZE}x{SIZE}", "steps": STEPS, **kw}


def _wait(client, job_id, statuses=FINAL, timeout=60):
    return wait_job(client, job_id, statuses, timeout)


class Slow:
    """Make each transformer forward sleep, so a test can act while a job runs."""

    def __init__(self, pipe, seconds=0.15):
        self.pipe, self.seconds = pipe, seconds

    def __enter__(self):
        self.handle = self.pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(self.seconds))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _error(r, status, code, field="__any__"):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == code, e
    assert set(e) == {"code", "message", "field"} and e["message"]
    if field != "__any__":
        assert e["field"] == field, e
    return e


# ------------------------------------------------------------ happy paths


def test_health_models_loras_metrics_index(client, server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "fluxion-mini"
    assert m["data"][0]["defaults"]["size"] == "128x128" and m["data"][0]["limits"]["max_n"] == 3
    names = [x["name"] for x in client.get("/v1/loras").json()["data"]]
    assert "style" in names and "evil" not in names  # the symlink pointing out of the folder is not listed
    assert client.get("/").status_code == 200
    text = client.get("/metrics").text
    for name in ("fluxion_queue_depth", "fluxion_batch_size", "fluxion_step_seconds", "fluxion_request_seconds",
                 "fluxion_errors", "fluxion_queue_rejections"):
        assert name in text


def test_generation_alone_equals_offline_exactly(client, pipe):
    r = client.post("/v1/images/generations", json=_body(seed=11))
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["created"], int) and len(out["data"]) == 1 and out["data"][0]["seed"] == 11
    im = _decode(out["data"][0]["b64_json"])
    assert im.format == "PNG" and im.size == (SIZE, SIZE)
    params = json.loads(im.text["parameters"])
    assert params["seed"] == 11 and params["prompt"] == "a red circle" and params["num_inference_steps"] == STEPS
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")).astype(int), _offline(pipe, "a red circle", 11))


def test_generation_without_seed_returns_the_drawn_seed(client, pipe):
    out = client.post("/v1/images/generations", json=_body(output_format="jpeg")).json()
    seed = out["data"][0]["seed"]
    assert isinstance(seed, int)
    assert _decode(out["data"][0]["b64_json"]).format == "JPEG"
    webp = client.post("/v1/images/generations", json=_body(seed=seed, output_format="webp")).json()
    assert _decode(webp["data"][0]["b64_json"]).format == "WEBP"


def test_n_images_take_seed_plus_k_batched_within_tolerance(client, pipe):
    out = client.post("/v1/images/generations", json=_body("a blue square", n=3, seed=100)).json()
    assert [d["seed"] for d in out["data"]] == [100, 101, 102]
    for k, d in enumerate(out["data"]):
        got = np.asarray(_decode(d["b64_json"]).convert("RGB")).astype(int)
        assert np.abs(got - _offline(pipe, "a blue square", 100 + k)).max() <= BATCH_TOL


def _block(client, steps=4):
    """Submit a job of another size and wait until it runs: the jobs queued behind it batch deterministically."""
    blocker = client.post("/v1/jobs", json={**_body(seed=0, steps=steps), "size": "32x32"}).json()["id"]
    _wait(client, blocker, ("running", "succeeded"))
    return blocker


def test_concurrent_jobs_batch_together_and_match_offline(client, pipe):
    prompts = ["a red circle", "a green triangle", "a yellow star"]
    with Slow(pipe, 0.05):
        _block(client)
        ids = [client.post("/v1/jobs", json=_body(p, seed=20 + i)).json()["id"] for i, p in enumerate(prompts)]
        jobs = [_wait(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    sizes = set()
    for i, (p, j) in enumerate(zip(prompts, jobs)):
        got = np.asarray(_decode(j["result"]["data"][0]["b64_json"]).convert("RGB")).astype(int)
        assert np.abs(got - _offline(pipe, p, 20 + i)).max() <= BATCH_TOL
    # they ran as one pipeline call: each saw a `running` event with batch_size 3
    for i in ids:
        events = _sse(client, i)
        sizes |= {d["batch_size"] for name, d in events if name == "running"}
    assert sizes == {3}


def _sse(client, job_id) -> list[tuple[str, dict]]:
    out = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def test_job_lifecycle_and_events(client):
    r = client.post("/v1/jobs", json=_body(seed=5))
    assert r.status_code == 202
    j = r.json()
    assert set(j) >= {"id", "status", "queue_position", "poll_url"} and j["status"] in ("queued", "running")
    assert j["poll_url"] == f"/v1/jobs/{j['id']}"
    events = _sse(client, j["id"])
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[-1] == "result" and "running" in names
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == list(range(0, STEPS + 1))
    assert all(d["steps"] == STEPS for n, d in events if n == "progress")
    previews = [d for n, d in events if n == "preview"]
    assert [p["step"] for p in previews] == [2] and _decode(previews[0]["b64_png"]).format == "PNG"
    result = events[-1][1]
    assert result["id"] == j["id"] and result["data"][0]["seed"] == 5
    done = client.get(j["poll_url"]).json()
    assert done["status"] == "succeeded" and done["progress"] == {"step": STEPS, "steps": STEPS}
    assert done["queue_position"] is None and done["result"]["data"] == result["data"]
    _error(client.delete(j["poll_url"]), 409, "job_finished")


def test_lora_request_equals_offline_with_the_adapter(client, pipe, lora_dir):
    body = _body(seed=9, loras=[{"name": "style", "weight": 0.8}])
    got = np.asarray(_decode(client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
                     .convert("RGB")).astype(int)
    plain = np.asarray(_decode(client.post("/v1/images/generations", json=_body(seed=9)).json()["data"][0]
                               ["b64_json"]).convert("RGB")).astype(int)
    assert np.abs(got - plain).max() > 3  # the adapter changes the image, and is off again for the next request
    pipe.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="ref")
    try:
        pipe.set_adapters(["ref"], [0.8])
        pipe.enable_lora()
        ref = _offline(pipe, "a red circle", 9)
    finally:
        pipe.delete_adapters("ref")
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(plain, _offline(pipe, "a red circle", 9))
    assert {"name": "style", "loaded": True} in client.get("/v1/loras").json()["data"]


# ------------------------------------------------------------ cancel, queue


def test_cancel_running_job_while_its_batch_mate_succeeds(client, pipe):
    with Slow(pipe):
        _block(client)
        a = client.post("/v1/jobs", json=_body("a red circle", seed=1, steps=10)).json()["id"]
        b = client.post("/v1/jobs", json=_body("a blue square", seed=2, steps=10)).json()["id"]
        t = time.time()
        while client.get(f"/v1/jobs/{a}").json()["progress"]["step"] < 1:
            assert time.time() - t < 30
            time.sleep(0.02)
        r = client.delete(f"/v1/jobs/{a}")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        ja = _wait(client, a)
        assert ja["status"] == "cancelled" and "result" not in ja
        assert ja["progress"]["step"] < 10  # stopped at a step boundary, before the end
        jb = _wait(client, b)
    assert jb["status"] == "succeeded"
    assert any(d.get("batch_size") == 2 for n, d in _sse(client, b) if n == "running")  # they were batch-mates
    assert _sse(client, a)[-1][0] == "cancelled"
    got = np.asarray(_decode(jb["result"]["data"][0]["b64_json"]).convert("RGB")).astype(int)
    assert np.abs(got - _offline(pipe, "a blue square", 2, steps=10)).max() <= BATCH_TOL


def test_queue_full_is_429_and_queued_jobs_cancel_at_once(client, pipe):
    with Slow(pipe, 0.1):
        running = client.post("/v1/jobs", json=_body(seed=1, steps=10)).json()["id"]
        _wait(client, running, ("running",))
        queued = [client.post("/v1/jobs", json={**_body(seed=1), "size": s}).json()
                  for s in ("16x16", "32x32", "48x48")]  # different sizes: they cannot join the running batch
        assert [q["queue_position"] for q in queued] == [0, 1, 2]
        r = client.post("/v1/jobs", json=_body(seed=1))
        _error(r, 429, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        _error(client.post("/v1/images/generations", json=_body(seed=1)), 429, "queue_full")
        c = client.delete(f"/v1/jobs/{queued[0]['id']}").json()
        assert c["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{queued[1]['id']}").json()["queue_position"] == 0
        for q in queued[1:]:
            client.delete(f"/v1/jobs/{q['id']}")
        client.delete(f"/v1/jobs/{running}")
        assert _wait(client, running)["status"] == "cancelled"
    assert "fluxion_queue_rejections_total 2.0" in client.get("/metrics").text


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("body,status,code,field", [
    ({"size": "big"}, 400, "invalid_request", "size"),
    ({"size": "65x64"}, 400, "invalid_request", "size"),
    ({"size": "256x256"}, 400, "policy_violation", "size"),
    ({"steps": 13}, 400, "policy_violation", "steps"),
    ({"n": 4}, 400, "policy_violation", "n"),
    ({"n": "many"}, 400, "invalid_request", "n"),
    ({"prompt": ""}, 400, "invalid_request", "prompt"),
    ({"response_format": "url"}, 400, "invalid_request", "response_format"),
    ({"output_format": "gif"}, 400, "invalid_request", "output_format"),
    ({"bogus": 1}, 400, "invalid_request", "bogus"),
    ({"guidance_scale": -1}, 400, "invalid_request", "guidance_scale"),
    ({"loras": [{"name": "nope"}]}, 404, "lora_not_found", "loras.0.name"),
    ({"loras": [{"name": "style"}, {"name": "style"}]}, 400, "invalid_request", "loras"),
])
def test_request_errors_name_the_field(client, body, status, code, field):
    for path in ("/v1/images/generations", "/v1/jobs"):
        _error(client.post(path, json={**_body(), **body}), status, code, field)


@pytest.mark.parametrize("name", ["../style", "/etc/passwd", "sub/style", "..", "evil", "style.safetensors/..",
                                  "..\\style", "a\x00b"])
def test_lora_names_never_leave_the_folder(client, name):
    e = _error(client.post("/v1/jobs", json=_body(loras=[{"name": name}])), 404, "lora_not_found", "loras.0.name")
    assert repr(name) in e["message"]


def test_unknown_lora_message_names_it(client):
    e = _error(client.post("/v1/images/generations", json=_body(loras=[{"name": "watercolor"}])), 404,
               "lora_not_found")
    assert "'watercolor'" in e["message"]


def test_auth_body_limit_edits_unknown_and_expired_jobs(client, server):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        _error(anon.get("/v1/models"), 401, "unauthorized")
        _error(anon.post("/v1/jobs", json=_body()), 401, "unauthorized")
        _error(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert anon.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        assert anon.get("/health").status_code == 200
    _error(client.post("/v1/images/generations", json=_body(prompt="x" * 40_000)), 413, "body_too_large")

    def chunks():  # no Content-Length: the body streams (chunked) and is counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}'

    _error(client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}),
           413, "body_too_large")
    _error(client.post("/v1/images/edits", files={"image": ("a.png", b"123")}), 400, "invalid_request", "image")
    _error(client.get("/v1/jobs/nope"), 404, "job_not_found")
    _error(client.delete("/v1/jobs/nope"), 404, "job_not_found")
    _error(client.get("/v1/jobs/nope/events"), 404, "job_not_found")
    _error(client.get("/v1/nothing"), 404, "not_found")
    j = client.post("/v1/jobs", json=_body(seed=3)).json()
    _wait(client, j["id"])
    store = server.app.state.store
    store.jobs[j["id"]].finished_at -= 10_000  # past the TTL
    _error(client.get(j["poll_url"]), 410, "job_expired")
    _error(client.get(j["poll_url"] + "/events"), 410, "job_expired")


def test_health_is_503_until_the_model_loads(tmp_path):
    import fastapi.testclient

    config = ServeConfig(model=str(tmp_path / "missing"))
    with fastapi.testclient.TestClient(create_app(config)) as c:
        t = time.time()
        while c.get("/health").json()["status"] == "loading":
            assert time.time() - t < 30
            time.sleep(0.05)
        r = c.get("/health")
        assert r.status_code == 503 and "no such model folder" in r.json()["message"]
        _error(c.post("/v1/jobs", json=_body()), 503, "not_ready")


def test_config_and_cli_refuse_an_open_host_without_a_key(capsys):
    from fluxion.cli import main

    with pytest.raises(ValueError, match="--api-key"):
        ServeConfig(host="0.0.0.0")
    ServeConfig(host="0.0.0.0", api_key="k")
    ServeConfig(host="0.0.0.0", insecure=True)
    ServeConfig(host="::1")
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_a_broken_lora_fails_its_request_alone(client, lora_dir):
    (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    try:
        e = _error(client.post("/v1/images/generations", json=_body(seed=1, loras=[{"name": "broken"}])), 422,
                   "lora_failed", "loras")
        assert "broken" in e["message"]
        j = client.post("/v1/jobs", json=_body(seed=1, loras=[{"name": "broken"}])).json()
        assert _wait(client, j["id"])["error"]["code"] == "lora_failed"
        _block(client)  # a good job and a broken one queued together: one batch, which fails and re-runs alone
        good = client.post("/v1/jobs", json=_body(seed=2, loras=[{"name": "style"}])).json()["id"]
        bad = client.post("/v1/jobs", json=_body(seed=3, loras=[{"name": "broken"}])).json()["id"]
        assert _wait(client, good)["status"] == "succeeded"
        assert _wait(client, bad)["error"]["code"] == "lora_failed"
    finally:
        (lora_dir / "broken.safetensors").unlink()
    assert client.post("/v1/images/generations", json=_body(seed=1)).status_code == 200  # still serving


def test_synchronous_request_times_out_with_504_and_its_job_is_cancelled(pipe):
    import fastapi.testclient

    app = create_app(ServeConfig(request_timeout_s=0.3, batch_window_ms=0), pipe)
    with Slow(pipe, 0.1), fastapi.testclient.TestClient(app) as c:
        _error(c.post("/v1/images/generations", json=_body(steps=10)), 504, "timeout")
        job = next(iter(app.state.store.jobs.values()))
        assert job.cancel_requested
        assert job.done.wait(30) and job.status == "cancelled"


def test_lora_lru_keeps_at_most_capacity_adapters_loaded(tmp_path):
    from fluxion.serve.loras import LoraLibrary

    for n in ("a", "b", "c"):
        (tmp_path / f"{n}.safetensors").write_bytes(b"x")

    class FakePipe:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append((name, a))

    lib, fake = LoraLibrary(tmp_path, capacity=2), FakePipe()
    lib.activate(fake, (("a", 1.0),))
    lib.activate(fake, (("b", 0.5),))
    lib.activate(fake, (("a", 1.0),))  # a is now the most recent
    lib.activate(fake, (("c", 1.0),))  # evicts b, the least recently used
    assert list(lib.loaded) == ["a", "c"]
    assert ("delete_adapters", ("serve:b",)) in fake.calls
    assert [c for c in fake.calls if c[0] == "load_lora_weights"].__len__() == 3
    lib.activate(fake, ())
    assert fake.calls[-1] == ("disable_lora", ())


def test_shutdown_cancels_queued_and_running_work(pipe):
    import fastapi.testclient

    app = create_app(ServeConfig(batch_window_ms=0), pipe)
    with Slow(pipe, 0.1), fastapi.testclient.TestClient(app) as c:
        running = c.post("/v1/jobs", json=_body(steps=10)).json()["id"]
        _wait(c, running, ("running",))
        queued = c.post("/v1/jobs", json={**_body(steps=10), "size": "32x32"}).json()["id"]
    jobs = app.state.store.jobs
    assert jobs[running].status == "cancelled" and jobs[queued].status == "cancelled"
    assert not app.state.serve["worker"].thread.is_alive()


@pytest.mark.parametrize("mixed", [True, False])
def test_mixed_adapter_batch_gives_each_sample_its_own_run(client, server, pipe, lora_dir, mixed):
    """Adapter style at 0.8, no adapter, adapter ink at 0.5: with mixed-adapter batching one batch of 3, each
    image within BATCH_TOL of its own separate offline run; without it (per_sample_lora off) three batches."""
    worker = server.app.state.serve["worker"]
    assert worker.per_sample_lora
    worker.per_sample_lora = mixed
    try:
        with Slow(pipe, 0.05):
            _block(client)
            x = client.post("/v1/jobs", json=_body("a red circle", seed=31, loras=[{"name": "style", "weight": 0.8}]))
            y = client.post("/v1/jobs", json=_body("a red circle", seed=32))
            z = client.post("/v1/jobs", json=_body("a blue square", seed=33, loras=[{"name": "ink", "weight": 0.5}]))
            ids = [r.json()["id"] for r in (x, y, z)]
            got = [_wait(client, i) for i in ids]
    finally:
        worker.per_sample_lora = True
    sizes = [[d["batch_size"] for n, d in _sse(client, i) if n == "running"] for i in ids]
    assert sizes == ([[3]] * 3 if mixed else [[1]] * 3)
    img = [np.asarray(_decode(g["result"]["data"][0]["b64_json"]).convert("RGB")).astype(int) for g in got]
    refs = []
    for (prompt, seed, lora, w) in (("a red circle", 31, "style", 0.8), ("a red circle", 32, None, 0),
                                    ("a blue square", 33, "ink", 0.5)):
        if lora is None:
            refs.append(_offline(pipe, prompt, seed))
            continue
        pipe.load_lora_weights(str(lora_dir / f"{lora}.safetensors"), adapter_name="ref")
        try:
            pipe.set_adapters(["ref"], [w])
            pipe.enable_lora()
            refs.append(_offline(pipe, prompt, seed))
        finally:
            pipe.delete_adapters("ref")
    for a, b in zip(img, refs):
        assert np.abs(a - b).max() <= BATCH_TOL
    assert np.abs(img[0] - _offline(pipe, "a red circle", 31)).max() > 3  # the adapter mattered
