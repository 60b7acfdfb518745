"""The web page at GET / in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) driven by
selenium types a prompt, submits it, sees the progress bar advance step by step and the image appear in the gallery
(equal to the offline pipeline's image for the same seed), and cancels a job with its cancel button.

The service is the real one: `create_app` on fluxion-mini, served by uvicorn on a free loopback port in a thread.
Skipped (with the reason) only when selenium or Chromium / chromedriver is not installed.
With FLUXION_SCREENSHOT=1 the page is saved to docs/images/serve_page.png.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "images" / "serve_page.png"
PROMPT = "a small red circle on a black background"
SEED, STEPS, SIZE = 1004, 12, 256  # 256 px: about 0.1 s a step on one CPU thread, so the bar has time to move


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or (os.path.exists("/usr/lib/chromium/chromedriver")
                                              and "/usr/lib/chromium/chromedriver") or None
    if not browser or not driver:
        return None
    return browser, driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mini_pipe():
    from fluxion import FluxPipeline

    pipe = FluxPipeline.from_pretrained()  # the shipped fluxion-mini, float32
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(mini_pipe, tmp_path_factory):
    """A folder with one tiny random LoRA for fluxion-mini, `style.safetensors`, for the page's LoRA picker."""
    import torch

    from fluxion.lora import add_trainable_adapter

    folder = tmp_path_factory.mktemp("browser_loras")
    params = add_trainable_adapter(mini_pipe.transformer, "mk", rank=2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for q in params:
            q.normal_(0, 0.05)  # small: the image changes but stays a picture (for the screenshot)
    mini_pipe.save_lora_weights(folder / "style.safetensors", adapter_name="mk")
    mini_pipe.delete_adapters("mk")
    return folder


@pytest.fixture(scope="module")
def server(mini_pipe, lora_dir):
    """The real service on a free loopback port (uvicorn in a thread); yields its base URL."""
    import uvicorn

    from fluxion.serve.app import create_app
    from fluxion.serve.config import ServeConfig

    port = _free_port()
    config = ServeConfig(host="127.0.0.1", port=port, lora_dir=str(lora_dir), max_batch=2, batch_window_ms=20.0,
                         preview_every=4)
    app = create_app(config, pipe=mini_pipe)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, name="uvicorn-browser-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            srv.should_exit = True
            pytest.fail("the service did not become healthy within 60 s")
        time.sleep(0.1)
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    found = _chromium()
    if found is None:
        pytest.skip("Chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _wait(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _fill(drv, element_id: str, value) -> None:
    el = drv.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def test_page_submits_shows_progress_and_the_image(server, browser, mini_pipe):
    import torch
    from PIL import Image

    drv = browser
    drv.get(server + "/")
    assert drv.title == "fluxion serve"
    _wait(lambda: "ready" in drv.find_element("id", "server-status").text, 20, "the page to see /health ready")

    _fill(drv, "prompt", PROMPT)
    _fill(drv, "size", f"{SIZE}x{SIZE}")
    _fill(drv, "steps", STEPS)
    _fill(drv, "seed", SEED)
    drv.find_element("id", "submit").click()

    card = _wait(lambda: drv.find_elements("css selector", "#jobs .job"), 20, "a job card after submitting")[0]
    job_id = card.get_attribute("data-job-id")
    assert job_id
    # The progress bar advances: remember the values the bar shows while the job runs.
    shown = set()

    def image_shown():
        bar = card.find_element("css selector", "progress")
        shown.add((float(bar.get_attribute("value")), float(bar.get_attribute("max"))))
        return drv.find_elements("css selector", f'#gallery figure.result[data-job-id="{job_id}"] img')

    imgs = _wait(image_shown, 120, "the result image in the gallery", interval=0.02)
    assert card.get_attribute("data-status") == "succeeded", card.find_element("css selector", ".state").text

    seen = [int(s) for s in card.get_attribute("data-steps-seen").split(",") if s]
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert len(set(seen)) >= 3 and max(seen) == STEPS, f"progress events the page applied: {seen}"
    bar_values = sorted(v for v, m in shown if m == STEPS)
    assert bar_values and bar_values[-1] == STEPS, f"the bar never reached {STEPS}: {sorted(shown)}"

    img = imgs[0]
    _wait(lambda: drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img), 10,
          "the image to decode")
    assert drv.execute_script("return arguments[0].naturalWidth", img) == SIZE
    assert drv.execute_script("return arguments[0].naturalHeight", img) == SIZE

    # The gallery shows the parameters, and the image is the offline pipeline's for the same seed and prompt.
    fig = drv.find_element("css selector", f'#gallery figure.result[data-job-id="{job_id}"]')
    params = {dd.get_attribute("data-param"): dd.text for dd in fig.find_elements("css selector", "dd")}
    assert params["seed"] == str(SEED) and params["size"] == f"{SIZE}x{SIZE}" and params["steps"] == str(STEPS)
    assert PROMPT in fig.text
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), np.int16)
    offline = mini_pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                        generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    offline = np.asarray(offline.convert("RGB"), np.int16)
    assert served.shape == offline.shape
    assert np.abs(served - offline).max() <= 1, "the page's image differs from the offline image (same seed)"


def test_lora_picker_sends_the_adapter_and_its_weight(server, browser):
    drv = browser
    if not drv.current_url.startswith(server):
        drv.get(server + "/")
    box = _wait(lambda: drv.find_elements("css selector", '#loras input[data-lora="style"]'), 20,
                "the LoRA picker to list `style` (from GET /v1/loras)")[0]
    box.click()
    weight = drv.find_element("css selector", '#loras input[data-lora-weight="style"]')
    weight.clear()
    weight.send_keys("0.8")
    _fill(drv, "prompt", "a yellow square on a white background")
    _fill(drv, "size", "128x128")
    _fill(drv, "steps", 8)
    _fill(drv, "seed", 11)
    before = {c.get_attribute("data-job-id") for c in drv.find_elements("css selector", "#jobs .job")}
    drv.find_element("id", "submit").click()
    card = _wait(lambda: [c for c in drv.find_elements("css selector", "#jobs .job")
                          if c.get_attribute("data-job-id") not in before], 20, "the new job card")[0]
    job_id = card.get_attribute("data-job-id")
    fig = _wait(lambda: drv.find_elements("css selector", f'#gallery figure.result[data-job-id="{job_id}"]'), 60,
                "the LoRA job's image")[0]
    assert card.get_attribute("data-status") == "succeeded"
    params = {dd.get_attribute("data-param"): dd.text for dd in fig.find_elements("css selector", "dd")}
    assert params["loras"] == "style@0.8"
    with urllib.request.urlopen(f"{server}/v1/loras", timeout=5) as r:
        assert {"name": "style", "loaded": True} in json.load(r)["data"]  # the service really loaded it
    box.click()  # untick for the next test


def test_cancel_button_cancels_the_job(server, browser):
    drv = browser
    if not drv.current_url.startswith(server):
        drv.get(server + "/")
    _fill(drv, "prompt", "a green square on a white background")
    _fill(drv, "size", "512x512")  # about 0.4 s a step: long enough to press cancel while it runs
    _fill(drv, "steps", 50)
    _fill(drv, "seed", 7)
    before = {c.get_attribute("data-job-id") for c in drv.find_elements("css selector", "#jobs .job")}
    drv.find_element("id", "submit").click()

    def new_card():
        return [c for c in drv.find_elements("css selector", "#jobs .job") if c.get_attribute("data-job-id") not in before]

    card = _wait(new_card, 20, "the new job card")[0]
    job_id = card.get_attribute("data-job-id")

    def steps_seen():
        return [int(s) for s in (card.get_attribute("data-steps-seen") or "").split(",") if s]

    # Cancel it while it runs (at step 8 or later, with a preview shown), not merely while it waits.
    _wait(lambda: card.get_attribute("data-status") == "running" and steps_seen() and max(steps_seen()) >= 8, 60,
          "the job to run 8 steps")
    if os.environ.get("FLUXION_SCREENSHOT") == "1":  # the page mid-run: progress bar, preview, gallery
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        tmp = SCREENSHOT.with_suffix(".tmp.png")
        drv.save_screenshot(str(tmp))
        os.replace(tmp, SCREENSHOT)  # never a half-written file
    card.find_element("css selector", "button.cancel").click()
    _wait(lambda: card.get_attribute("data-status") == "cancelled", 60, "the job to be cancelled")
    assert "cancelled" in card.find_element("css selector", ".state").text
    assert max(steps_seen()) < 50, "the job ran to the end instead of stopping at a step boundary"
    assert not drv.find_elements("css selector", f'#gallery figure.result[data-job-id="{job_id}"]')
    with urllib.request.urlopen(f"{server}/v1/jobs/{job_id}", timeout=5) as r:
        assert json.load(r)["status"] == "cancelled"
