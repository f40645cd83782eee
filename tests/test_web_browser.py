"""The page in a real browser: Debian's headless Chromium, driven by Playwright, against a
live `poe serve` on loopback with the synthetic pool. It picks two tasks, reads the
accuracy, downloads the model and runs it on an image in the page with onnxruntime-web;
the page's top-1 must be onnxruntime's top-1 in Python for the same image.

Needs `apt-get install chromium`, `pip install playwright` (never `playwright install`:
the system Chromium is used) and `npm ci --prefix app/web` (onnxruntime-web)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.web import ORT_DIST

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TASKS = ["task0", "task2"]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is absent: pip install playwright")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, pool):
    """A live `poe serve --no-worker` with the synthetic pool as its default pool."""
    assert (ORT_DIST / "ort.wasm.min.mjs").exists(), "onnxruntime-web is missing: npm ci --prefix app/web"
    data = tmp_path_factory.mktemp("web-data")
    port = _free_port()
    env = dict(os.environ, POE_DATA_DIR=str(data), POE_DEFAULT_POOL=str(pool.root), POE_HOST="127.0.0.1",
               POE_PORT=str(port), POE_ADMIN_TOKEN="web-test", POE_LOG_LEVEL="warning", OMP_NUM_THREADS="1")
    env.pop("POE_DATABASE_URL", None)
    log = data / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"poe serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"poe serve not ready after 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def image(tmp_path, synthetic, pool) -> Path:
    """A validation image of a class of TASKS as a 32x32 PNG: the page draws it without
    resampling, so browser and Python see the same pixels."""
    wanted = {c for t in TASKS for c in pool.taxonomy.composite_classes([t])}
    index = next(i for i, y in enumerate(synthetic.val.y.tolist()) if y in wanted)
    pixels = synthetic.val.x[index].permute(1, 2, 0).numpy()
    path = tmp_path / "image.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _python_top1(model_bytes: bytes, meta: dict, image: Path) -> tuple[str, float]:
    mean = np.array(meta["input"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["input"]["std"], np.float32).reshape(1, 3, 1, 1)
    x = np.asarray(Image.open(image).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255
    logits = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(
        None, {"input": ((x - mean) / std).astype(np.float32)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return meta["labels"][int(p.argmax())], float(p.max())


def test_page_composes_downloads_and_runs_the_model(server, browser, image, pool, tmp_path):
    page = browser.new_page(accept_downloads=True, viewport={"width": 390, "height": 844})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    for task in TASKS:
        page.locator(f'#tasks input[value="{task}"]').check()
    accuracy = page.locator('#acc[data-value]')
    accuracy.wait_for()
    meta = httpx.post(f"{server}/models", json={"tasks": TASKS, "options": {"weights": "fp32"}},
                      headers={"Accept": "application/json"}).json()
    assert float(accuracy.get_attribute("data-value")) == pytest.approx(pool.composite_accuracy(TASKS))
    assert accuracy.inner_text() == f"{meta['val_acc'] * 100:.2f} %"

    with page.expect_download() as download:
        page.locator("#download-onnx").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "poe-task0+task2.onnx"
    model_bytes = saved.read_bytes()

    page.locator("#image").set_input_files(image)
    page.locator('#top5[data-state="done"]').wait_for(timeout=30_000)
    assert page.locator("#runtime-error").inner_text() == ""
    first = page.locator("#top5 li").first
    label, probability = _python_top1(model_bytes, meta, image)
    assert first.get_attribute("data-label") == label
    assert float(first.locator(".p").inner_text().removesuffix(" %")) == pytest.approx(probability * 100, abs=0.011)
    assert page.locator("#top5 li").count() == min(5, len(meta["labels"]))
    assert not errors
