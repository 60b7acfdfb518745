"""POST /v1/images/edits on the real server (uvicorn on a free loopback port) with fluxion-mini.

Tolerance: an edit runs alone in its pipeline call, so its image is bit-identical (tolerance 0) to the offline
`FluxImg2ImgPipeline.from_pipe(pipe)` / `FluxInpaintPipeline.from_pipe(pipe)` image for the same seed, prompt,
size, steps and strength (the uploaded image read as `fluxion.images.to_rgb` reads it); image k of n takes
seed + k and lies within 2/255 per pixel of its own offline run (batched float32 rounding).
"""
from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402

from fluxion.images import to_rgb  # noqa: E402
from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402

SIZE = 64
STEPS = 4
BATCH_TOL = 2  # of 255, for image k > 0 of an n-image edit


class Server:
    def __init__(self, app):
        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
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


@pytest.fixture(scope="module")
def pipe():
    from fluxion import FluxPipeline

    p = FluxPipeline.from_pretrained()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def client(pipe):
    config = ServeConfig(max_queue=4, max_batch=4, batch_window_ms=50, max_pixels=128 * 128, max_steps=12,
                         max_n=3, max_body_bytes=64 * 1024, preview_every=0)
    with Server(create_app(config, pipe)) as s:
        with httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=120) as c:
            yield c


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _init_image() -> Image.Image:
    """An RGBA picture (the service reads any PIL mode as `to_rgb` does)."""
    rng = np.random.default_rng(0)
    arr = np.zeros((SIZE, SIZE, 4), np.uint8)
    arr[..., 0] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(255, 0, SIZE, dtype=np.uint8)[:, None]
    arr[..., 2] = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    arr[..., 3] = 200
    return Image.fromarray(arr, "RGBA")


def _mask() -> Image.Image:
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:, SIZE // 2:] = 255  # white = repaint the right half
    return Image.fromarray(arr, "L")


def _files(image=None, mask=None):
    files = {"image": ("image.png", _png(image or _init_image()), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask if isinstance(mask, bytes) else _png(mask), "image/png")
    return files


def _form(**kw):
    return {"prompt": "a red circle", "size": f"{SIZE}x{SIZE}", "steps": str(STEPS), **{k: str(v) for k, v in
                                                                                      kw.items()}}


def _decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB")).astype(int)


def _offline(pipe, cls, seed, strength, mask=None, **kw) -> np.ndarray:
    edit = cls.from_pipe(pipe)
    extra = {"mask_image": mask} if mask is not None else {}
    out = edit("a red circle", image=to_rgb(_init_image()), height=SIZE, width=SIZE, num_inference_steps=STEPS,
               strength=strength, generator=torch.Generator("cpu").manual_seed(seed), **extra, **kw)
    return np.asarray(out.images[0]).astype(int)


def _error(r, status, code, field="__any__"):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == code, e
    assert set(e) == {"code", "message", "field"} and e["message"]
    if field != "__any__":
        assert e["field"] == field, e
    return e


def test_img2img_edit_equals_offline(client, pipe):
    from fluxion import FluxImg2ImgPipeline

    r = client.post("/v1/images/edits", files=_files(), data=_form(seed=11, strength=0.75))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data"} and len(body["data"]) == 1 and body["data"][0]["seed"] == 11
    served = _decoded(body["data"][0])
    offline = _offline(pipe, FluxImg2ImgPipeline, 11, 0.75)
    assert served.shape == (SIZE, SIZE, 3)
    assert np.abs(served - offline).max() == 0
    # the strength matters: a weaker edit stays nearer the init image
    r2 = client.post("/v1/images/edits", files=_files(), data=_form(seed=11, strength=0.25))
    assert r2.status_code == 200, r2.text
    init = np.asarray(to_rgb(_init_image())).astype(int)
    assert np.abs(_decoded(r2.json()["data"][0]) - init).mean() < np.abs(served - init).mean()
    info = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).text
    assert info.get("fluxion:pipeline") == "FluxImg2ImgPipeline" and info.get("fluxion:strength") == "0.75"


def test_inpaint_edit_equals_offline_and_n_images_take_seed_plus_k(client, pipe):
    from fluxion import FluxInpaintPipeline

    r = client.post("/v1/images/edits", files=_files(mask=_mask()),
                    data=_form(seed=5, strength=1.0, n=2, output_format="png"))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6]
    for k, item in enumerate(data):
        served = _decoded(item)
        offline = _offline(pipe, FluxInpaintPipeline, 5 + k, 1.0, mask=_mask())
        assert np.abs(served - offline).max() <= BATCH_TOL, k
    # the unmasked (black) half stays the init image's, near enough (VAE round trip)
    alone = client.post("/v1/images/edits", files=_files(mask=_mask()), data=_form(seed=5, strength=1.0))
    assert alone.status_code == 200, alone.text
    served = _decoded(alone.json()["data"][0])
    assert np.abs(served - _offline(pipe, FluxInpaintPipeline, 5, 1.0, mask=_mask())).max() == 0


def test_edits_never_share_a_batch_and_generations_still_work(client, pipe):
    results = {}

    def edit(i):
        results[i] = client.post("/v1/images/edits", files=_files(), data=_form(seed=20 + i, strength=0.5))

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    g = client.post("/v1/images/generations", json={"prompt": "x", "size": f"{SIZE}x{SIZE}", "steps": STEPS,
                                                     "seed": 1})
    for t in threads:
        t.join(120)
    assert g.status_code == 200, g.text
    from fluxion import FluxImg2ImgPipeline

    for i in range(2):
        assert results[i].status_code == 200, results[i].text
        served = _decoded(results[i].json()["data"][0])
        assert np.abs(served - _offline(pipe, FluxImg2ImgPipeline, 20 + i, 0.5)).max() == 0


@pytest.mark.parametrize("files, data, status, code, field", [
    ({"image": ("a.png", b"not an image", "image/png")}, _form(), 400, "invalid_request", "image"),
    ({}, _form(), 400, "invalid_request", "image"),
    ("mask-corrupt", _form(), 400, "invalid_request", "mask"),
    ("mask-size", _form(), 400, "invalid_request", "mask"),
    ("ok", _form(strength=0), 400, "invalid_request", "strength"),
    ("ok", _form(strength=1.5), 400, "invalid_request", "strength"),
    ("ok", _form(strength="nan"), 400, "invalid_request", "strength"),
    ("ok", _form(strength="abc"), 400, "invalid_request", "strength"),
    ("ok", {"size": "64x64"}, 400, "invalid_request", "prompt"),
    ("ok", _form(n=9), 400, "policy_violation", "n"),
    ("ok", _form(n="two"), 400, "invalid_request", "n"),
    ("ok", _form(size="64"), 400, "invalid_request", "size"),
    ("ok", _form(steps=99), 400, "policy_violation", "steps"),
    ("ok", _form(response_format="url"), 400, "invalid_request", "response_format"),
    ("ok", _form(loras="{not json"), 400, "invalid_request", "loras"),
    ("ok", _form(loras='[{"name": "style", "weight": 1}]'), 404, "lora_not_found", "loras.0.name"),
    ("ok", _form(colour="red"), 400, "invalid_request", "colour"),
])
def test_bad_edits_are_400s_naming_the_field(client, files, data, status, code, field):
    if files == "mask-corrupt":
        files = _files(mask=b"\x89PNG broken")
    elif files == "mask-size":
        files = _files(mask=Image.new("L", (SIZE, SIZE // 2), 255))
    elif files == "ok":
        files = _files()
    _error(client.post("/v1/images/edits", files=files or None, data=data), status, code, field)


def test_edit_body_limit_and_json_body(client):
    big = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    r = client.post("/v1/images/edits", files=_files(image=Image.fromarray(big)), data=_form())
    _error(r, 413, "body_too_large")
    _error(client.post("/v1/images/edits", json={"prompt": "x"}), 400, "invalid_request", "image")
