"""The page in a real browser: Debian's headless Chromium, driven by Playwright, against a
live `poe serve` on loopback, with the synthetic pool, pools of photos (a 64x64 WRN and a
128x128 MobileNetV2) and the shipped CIFAR-100 pool.
It picks tasks, reads the accuracy, downloads the model and runs it on an image in the
page with onnxruntime-web; the page's top-1 must be onnxruntime's top-1 in Python for the
same image. It also opens /docs and /redoc with every request off loopback refused.

Needs `apt-get install chromium`, `pip install playwright` (never `playwright install`:
the system Chromium is used) and `npm ci --prefix app/web` (onnxruntime-web)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.web import ORT_DIST, STATIC
from poe_core.data import load_photo

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


@contextlib.contextmanager
def _serve(data: Path, default_pool: str | None):
    """A live `poe serve --no-worker` (one API process) on a free loopback port; default_pool
    None: the shipped one."""
    assert (ORT_DIST / "ort.wasm.min.mjs").exists(), "onnxruntime-web is missing: npm ci --prefix app/web"
    port = _free_port()
    env = dict(os.environ, POE_DATA_DIR=str(data), POE_HOST="127.0.0.1",
               POE_PORT=str(port), POE_ADMIN_TOKEN="web-test", POE_LOG_LEVEL="warning", OMP_NUM_THREADS="1")
    env.pop("POE_DATABASE_URL", None)
    env.pop("POE_DEFAULT_POOL", None)
    if default_pool:
        env["POE_DEFAULT_POOL"] = default_pool
    log = data / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--workers", "1"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"poe serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"poe serve not ready after 120 s:\n{log.read_text()}")
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
def server(tmp_path_factory, pool):
    """The synthetic pool: its 16x16 classes have no sample images."""
    with _serve(tmp_path_factory.mktemp("web-data"), str(pool.root)) as url:
        yield url


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory, wide_pool):
    """The synthetic pool with experts at two widths: a front to plot."""
    with _serve(tmp_path_factory.mktemp("web-wide"), str(wide_pool.root)) as url:
        yield url


@pytest.fixture(scope="module")
def photo_server(tmp_path_factory, photo_pool):
    """An untrained pool of photos resized and center-cropped: 64x64 from 72, 128x128 from 144."""
    with _serve(tmp_path_factory.mktemp("web-photo"), str(photo_pool[0].root)) as url:
        yield url


@pytest.fixture(scope="module")
def cifar_server(tmp_path_factory):
    """The shipped CIFAR-100 pool, whose classes the page's sample images are of."""
    with _serve(tmp_path_factory.mktemp("web-cifar"), None) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def image(tmp_path, synthetic, pool) -> Path:
    """A validation image of a class of TASKS as a 16x16 PNG: the page draws it without
    resampling, so browser and Python see the same pixels."""
    wanted = {c for t in TASKS for c in pool.taxonomy.composite_classes([t])}
    index = next(i for i, y in enumerate(synthetic.val.y.tolist()) if y in wanted)
    pixels = synthetic.val.x[index].permute(1, 2, 0).numpy()
    path = tmp_path / "image.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _python_logits(model_bytes: bytes, meta: dict, image: Path) -> np.ndarray:
    mean = np.array(meta["input"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["input"]["std"], np.float32).reshape(1, 3, 1, 1)
    x = np.asarray(Image.open(image).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(
        None, {"input": ((x - mean) / std).astype(np.float32)})[0][0]


def _python_top1(model_bytes: bytes, meta: dict, image: Path) -> tuple[str, float]:
    logits = _python_logits(model_bytes, meta, image)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return meta["labels"][int(p.argmax())], float(p.max())


def _python_accepts(logits: np.ndarray, rule: dict) -> bool:
    """The reject rule as poe_core.reject computes it."""
    top = logits.max()
    total = np.exp(logits - top).sum()
    score = 1 / total if rule["score"] == "max_softmax" else top + np.log(total)
    return bool(score >= rule["threshold"])


def _loopback_only(page) -> list[str]:
    """Refuse every request that would leave loopback; the list fills with their URLs."""
    refused: list[str] = []

    def route(r):
        if urlsplit(r.request.url).hostname in ("127.0.0.1", "localhost", "::1"):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return refused


def _open(browser, url: str, width: int, height: int):
    """The page, its task list loaded, downloads allowed; with the page errors and the
    refused requests seen, to be checked empty at the end."""
    page = browser.new_page(accept_downloads=True, viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    refused = _loopback_only(page)
    page.goto(url + "/")
    page.locator("#tasks .task").first.wait_for()
    return page, errors, refused


def _wait_for_model(page, meta: dict) -> None:
    """Until the page shows the model of all the ticked tasks, not of the first one alone
    (each tick asks for a model; a slow machine answers the first before the second tick)."""
    page.locator(f'#figures[data-tasks="{"+".join(meta["tasks"])}"][aria-busy="false"]').wait_for()


def _overflowing(page, selector: str) -> list[str]:
    """The elements matching `selector` whose content is wider than their box."""
    return page.eval_on_selector_all(
        selector, "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")


def test_page_composes_downloads_and_runs_the_model(server, browser, image, pool, tmp_path):
    page, errors, refused = _open(browser, server, 390, 844)
    for empty in ("#figures", "#result", "#samples-box"):  # nothing blank before a choice
        assert page.locator(empty).is_hidden(), empty
    for task in TASKS:
        page.locator(f'#tasks input[value="{task}"]').check()
    meta = httpx.post(f"{server}/models", json={"tasks": TASKS, "options": {"weights": "fp32"}},
                      headers={"Accept": "application/json"}).json()
    _wait_for_model(page, meta)
    accuracy = page.locator("#acc")
    assert float(accuracy.get_attribute("data-value")) == pytest.approx(pool.composite_accuracy(TASKS))
    assert accuracy.inner_text() == f"{meta['val_acc'] * 100:.2f} %"
    bars = page.locator("#class-acc li")
    if "val_acc_by_class" in meta:
        assert page.locator("#class-acc-box").is_visible()
        shown = {bar.get_attribute("data-label"): float(bar.get_attribute("data-value")) for bar in bars.all()}
        assert shown == pytest.approx(meta["val_acc_by_class"]) and len(shown) == len(meta["labels"])
    else:
        assert page.locator("#class-acc-box").is_hidden() and bars.count() == 0
    assert page.locator("#samples-box").is_hidden()  # no sample images of the synthetic classes
    assert "this model takes 16×16 images." in page.locator("#samples-note").inner_text()

    with page.expect_download() as download:
        page.locator("#download-onnx").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "poe-task0+task2.onnx"
    model_bytes = saved.read_bytes()

    page.locator("#image").set_input_files(image)
    page.locator('#top5[data-state="done"]').wait_for(timeout=30_000)
    assert page.locator("#runtime-error").inner_text() == ""
    assert page.locator("#result").is_visible() and page.locator("#truth").is_hidden()
    first = page.locator("#top5 li").first
    label, probability = _python_top1(model_bytes, meta, image)
    assert first.get_attribute("data-label") == label
    assert float(first.locator(".p").inner_text().removesuffix(" %")) == pytest.approx(probability * 100, abs=0.011)
    assert page.locator("#top5 li").count() == min(5, len(meta["labels"]))
    verdict = page.locator("#verdict")
    accepted = _python_accepts(_python_logits(model_bytes, meta, image), meta["reject"])
    assert verdict.get_attribute("data-accepted") == str(accepted).lower()
    assert verdict.inner_text().startswith("One of this model's classes" if accepted else "None of these")
    # A pool with one expert width: its front is one point, and the page says why.
    assert page.locator("#plan-box").get_attribute("data-points") == "1"
    assert "one width" in page.locator("#plan-note").inner_text()
    assert not errors and not refused


def _page_run(page, meta: dict, image: Path) -> dict:
    """Run `image` in the page on the shown model; the page's input tensor and outputs."""
    page.locator("#image").set_input_files(image)
    page.locator(f'#top5[data-state="done"][data-model="{meta["id"]}"]').wait_for(timeout=30_000)
    run = page.evaluate("async () => (await import('/app.js')).lastRun()")
    page.evaluate("document.getElementById('top5').dataset.state = 'seen'")
    assert run["model"] == meta["id"] and run["shape"] == [1, *meta["input"]["shape"][1:]]
    return run


def test_the_page_prepares_photos_as_a_photo_pool_says(photo_server, browser, photo_pool, tmp_path):
    """On the 64x64 WRN pool and the 128x128 MobileNetV2 pool, the page resizes a photo's
    shorter side to 72 (144) and center-crops 64x64 (128x128), the pool's preprocess,
    normalises it, and its onnxruntime-web outputs are onnxruntime's in Python on that
    input. A photo already 72 (144) high is only cropped: the page's input is then, to the
    last bit, Python's load_photo of it. The page's 32x32 CIFAR-100 samples are not offered,
    though the pool has a class of theirs (lion), and the page says why."""
    pool, _ = photo_pool
    size, resize = pool.image_shape[-1], pool.spec.dataset.preprocess["resize_shorter_side"]
    page, errors, refused = _open(browser, photo_server, 1280, 900)
    for task in ("feline", "bird"):
        page.locator(f'#tasks input[value="{task}"]').check()
    meta = httpx.post(f"{photo_server}/models", json={"tasks": ["feline", "bird"], "options": {"weights": "fp32"}},
                      headers={"Accept": "application/json"}).json()
    assert (meta["input"]["resize_shorter_side"], meta["input"]["center_crop"]) == (resize, size) != (32, 32)
    _wait_for_model(page, meta)
    assert "lion" in meta["labels"] and "lion" in json.loads((STATIC / "samples" / "index.json").read_text())["images"]
    assert page.locator("#samples-box").is_hidden() and page.locator("#samples .sample").count() == 0
    assert page.locator("#samples-note").inner_text() == (
        "No one-click test images for this model: the page's sample images are 32×32, from the CIFAR-100 test "
        f"split (Krizhevsky, 2009), and this model takes {size}×{size} photos (shorter side resized to {resize}, "
        f"central {size}×{size}). Try a photo of your own.")
    session = ort.InferenceSession(httpx.get(urljoin(photo_server, meta["download_url"])).content,
                                   providers=["CPUExecutionProvider"])
    # The page computes in float64 (JavaScript numbers) and stores float32.
    mean = np.array(meta["input"]["mean"], np.float64).reshape(3, 1, 1)
    std = np.array(meta["input"]["std"], np.float64).reshape(3, 1, 1)

    def prepared(pixels: np.ndarray) -> np.ndarray:
        return ((pixels / 255 - mean) / std).astype(np.float32)

    photo = sorted((pool.root.parent / "tiny-imagenet" / "val" / "images").iterdir())[0]
    pixels = np.asarray(Image.open(photo).convert("RGB"))
    height, width = pixels.shape[:2]
    assert height == resize < width
    exact = tmp_path / "exact.png"
    Image.fromarray(pixels).save(exact)
    # The same photo twice as large: the page resamples it with the browser's filter.
    large = tmp_path / "large.png"
    Image.fromarray(pixels).resize((2 * width, 2 * height), Image.BILINEAR).save(large)

    for image, exactly in ((exact, True), (large, False)):
        run = _page_run(page, meta, image)
        x = np.array(run["input"], np.float32).reshape(1, 3, size, size)
        expected = prepared(load_photo(image, size, resize))[None]
        if exactly:
            np.testing.assert_array_equal(x, expected)
        else:
            # Another filter than PIL's on these noisy pixels, but the same box: closer to
            # PIL's crop than to that crop one pixel off (about 4 and 12 levels of 255).
            shifted = prepared(load_photo(image, size, resize)[:, :, 1:])[None]
            error = np.abs((x - expected) * std).mean() * 255
            assert error < 0.5 * np.abs((x[..., :-1] - shifted) * std).mean() * 255, error
        (logits,) = session.run(None, {"input": x})
        np.testing.assert_allclose(np.array(run["outputs"], np.float32), logits[0], atol=1e-4, rtol=0)
        first = page.locator("#top5 li").first
        assert first.get_attribute("data-label") == meta["labels"][int(logits[0].argmax())]
    assert page.evaluate("[document.getElementById('preview').width, document.getElementById('preview').height]") \
        == [size, size]
    assert not errors and not refused


def test_none_of_these_below_the_threshold(server, browser):
    """The page's own verdict function: below the rule's threshold it says "none of these"."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/")
    page.locator("#tasks .task").first.wait_for()
    show = "async ([model, outputs]) => (await import('/app.js')).showVerdict(model, outputs)"
    for rule, outputs, accepted in [
        ({"score": "max_softmax", "threshold": 0.9}, [0.0, 0.1, 0.2], False),
        ({"score": "max_softmax", "threshold": 0.9}, [9.0, 0.0, 0.0], True),
        ({"score": "energy", "threshold": 5.0}, [1.0, 1.0, 1.0], False),  # logsumexp = 1 + log 3
        ({"score": "energy", "threshold": 5.0}, [6.0, 1.0, 1.0], True),
    ]:
        model = {"output": "logits", "reject": rule}
        assert page.evaluate(show, [model, outputs])["accepted"] is accepted
        verdict = page.locator("#verdict")
        assert verdict.get_attribute("data-accepted") == str(accepted).lower()
        assert verdict.inner_text().startswith("One of" if accepted else "None of these")


def test_samples_fit_only_inputs_of_their_size(server, browser):
    """The page's own rule: its 32x32 samples go, unresampled, to a 32x32 input of stored
    images or of photos resized to 32, and to no other input."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/")
    page.locator("#tasks .task").first.wait_for()
    fit = "async ([input, samples]) => (await import('/app.js')).samplesFit(input, samples)"
    for (height, width), resize, expected in [((32, 32), None, True), ((32, 32), 32, True), ((32, 32), 36, False),
                                              ((64, 64), None, False), ((64, 64), 72, False),
                                              ((16, 16), None, False), ((32, 16), None, False)]:
        input_ = {"shape": ["batch", 3, height, width], "resize_shorter_side": resize}
        assert page.evaluate(fit, [input_, {"size": [32, 32]}]) is expected, (height, width, resize)


def test_class_query_plots_its_front_and_the_slider_downloads_a_point(wide_server, browser, tmp_path):
    page, errors, refused = _open(browser, wide_server, 1280, 900)
    body = {"classes": ["class2_1", "class0_0"], "options": {"weights": "fp32"}}
    meta = httpx.post(f"{wide_server}/models", json=body, headers={"Accept": "application/json"}).json()
    page.locator("#classes").fill("class2_1, class0_0")
    page.locator(f'#figures[data-id="{meta["id"]}"][aria-busy="false"]').wait_for()
    assert page.locator("#labels").inner_text() == "class2_1, class0_0"
    plan = httpx.post(f"{wide_server}/models/plan", json=body).json()
    page.locator(f'#plan-box[data-points="{len(plan["points"])}"]').wait_for()
    assert page.locator("#plan-plot circle").count() == len(plan["points"])

    # The page's plot and slider on a front of every choice of widths of the query (real
    # models: each asked with its widths), so that the slider has points to move over.
    choices = []
    for first in (0.25, 0.5):
        for second in (0.25, 0.5):
            widths = {"task2": first, "task0": second}
            point = httpx.post(f"{wide_server}/models", json=body | {"options": {"widths": widths}},
                               headers={"Accept": "application/json"}).json()
            choices.append({"widths": widths, "params": point["params"], "bytes": point["bytes"],
                            "macs": point["flops"], "val_acc": point["val_acc"], "id": point["id"],
                            "download_url": point["download_url"]})
    choices.sort(key=lambda p: p["params"])
    drawn = page.evaluate("async (plan) => (await import('/app.js')).drawPlan(plan)",
                          {"points": choices, "unavailable": None})
    assert drawn == len(choices) == page.locator("#plan-plot circle").count()
    slider = page.locator("#plan-slider")
    slider.focus()
    page.keyboard.press("Home")
    assert page.locator("#plan-box").get_attribute("data-chosen") == "0"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.locator("#plan-box").get_attribute("data-chosen") == "2"
    assert page.locator("#plan-plot circle.chosen").get_attribute("data-index") == "2"
    assert f"{choices[2]['params']:,} params" in page.locator("#plan-point").inner_text()
    with page.expect_download() as download:
        page.locator("#plan-download").click()
    saved = tmp_path / "point.onnx"
    download.value.save_as(saved)
    assert saved.read_bytes() == httpx.get(urljoin(wide_server, choices[2]["download_url"])).content
    assert page.locator("#plan-download").get_attribute("data-id") == choices[2]["id"]
    assert not errors and not refused


def test_class_accuracy_bars_follow_the_metadata(server, browser):
    """The page's own drawing function, on a model with and without `val_acc_by_class`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/")
    page.locator("#tasks .task").first.wait_for()
    page.evaluate("document.getElementById('figures').hidden = false")
    model = {"labels": ["bridge", "large_man-made_thing", "castle"],
             "val_acc_by_class": {"castle": 0.86, "bridge": 0.0, "large_man-made_thing": 1.0}}
    draw = "async (model) => (await import('/app.js')).showClassAccuracy(model)"
    assert page.evaluate(draw, model) is True
    bars = page.locator("#class-acc li")
    assert [bar.get_attribute("data-label") for bar in bars.all()] == model["labels"]  # the output order
    assert bars.nth(2).locator(".value").inner_text() == "86.0 %"
    assert page.locator("#class-acc-box").is_visible()
    track = bars.nth(1).locator(".track").bounding_box()["width"]
    widths = [bar.locator(".bar").bounding_box()["width"] / track for bar in bars.all()]
    assert widths == pytest.approx([0.0, 1.0, 0.86], abs=0.01)
    assert page.evaluate(draw, {"labels": ["bridge"], "val_acc_by_format": {"fp32": 0.5}}) is False
    assert page.locator("#class-acc-box").is_hidden() and bars.count() == 0


@pytest.mark.parametrize("width", [1280, 390])
def test_samples_run_in_one_click_on_the_cifar_pool(cifar_server, browser, width, tmp_path):
    """Long CIFAR-100 task names stay in their cards; a shipped test image runs in one click
    and the page's top-1 is onnxruntime's in Python on the same PNG."""
    tasks = ["large_omnivores_and_herbivores", "people"]
    mobile = width < 500
    context = browser.new_context(viewport={"width": width, "height": 900}, is_mobile=mobile, has_touch=mobile)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    refused = _loopback_only(page)
    page.goto(cifar_server + "/")
    page.locator('#tasks input[value="large_man-made_outdoor_things"]').wait_for()
    assert _overflowing(page, "#tasks .task") == [] and _overflowing(page, "#tasks .name") == []
    camera = page.locator("#camera")
    assert camera.get_attribute("capture") == "environment" and camera.get_attribute("accept") == "image/*"
    assert page.locator(".camera").is_visible() == mobile  # a phone's camera; a desktop drops files
    for task in tasks:
        page.locator(f'#tasks input[value="{task}"]').check()
    meta = httpx.post(f"{cifar_server}/models", json={"tasks": tasks}, headers={"Accept": "application/json"}).json()
    _wait_for_model(page, meta)
    index = json.loads((STATIC / "samples" / "index.json").read_text())
    samples = page.locator("#samples .sample")
    samples.first.wait_for()
    assert samples.count() == sum(len(index["images"][label]) for label in meta["labels"])
    assert _overflowing(page, ".sample-class") == []
    assert page.locator("#samples-note").is_hidden()

    sample = page.locator('#samples .sample[data-label="woman"]').first
    test_index = sample.get_attribute("data-index")
    sample.click()
    page.locator('#top5[data-state="done"]').wait_for(timeout=30_000)
    assert sample.get_attribute("aria-pressed") == "true"
    png = STATIC / "samples" / f"woman-{test_index}.png"
    label, probability = _python_top1(httpx.get(urljoin(cifar_server, meta["download_url"])).content, meta, png)
    first = page.locator("#top5 li").first
    assert first.get_attribute("data-label") == label
    assert float(first.locator(".p").inner_text().removesuffix(" %")) == pytest.approx(probability * 100, abs=0.011)
    truth = page.locator("#truth")
    assert truth.inner_text().startswith(f"CIFAR-100 test image {test_index}, labelled woman")
    assert truth.get_attribute("data-correct") == str(label == "woman").lower()
    assert not errors and not refused
    context.close()


def test_api_docs_work_without_internet(server, browser):
    """/docs (Swagger UI) and /redoc list the operations with every non-loopback request refused."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    refused = _loopback_only(page)
    page.goto(server + "/docs")
    page.locator(".opblock-summary-path").first.wait_for(timeout=30_000)
    paths = set(page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)"))
    assert {"/models", "/tasks", "/admin/extractions"} <= paths, paths
    page.goto(server + "/redoc")
    page.get_by_text("/admin/extractions").first.wait_for(timeout=30_000)
    assert page.locator("[data-section-id^='tag/']").count() > 0 or page.get_by_text("POST").count() > 0
    assert not refused, refused
    assert not errors
