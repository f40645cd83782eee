import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import app.web as web


def test_missing_onnxruntime_web_is_a_clear_404(monkeypatch, tmp_path):
    monkeypatch.setattr(web, "ORT_DIST", tmp_path / "absent")
    bare = FastAPI()
    web.mount(bare)
    with TestClient(bare) as client:
        r = client.get("/vendor/ort/ort.wasm.min.mjs")
        assert r.status_code == 404 and "npm ci --prefix app/web" in r.json()["detail"]
        assert client.get("/").status_code == 200
        assert "npm ci --prefix app/web" in client.get("/app.js").text


@pytest.mark.skipif(not web.ORT_DIST.is_dir(), reason="onnxruntime-web absent: npm ci --prefix app/web")
def test_page_and_vendor_files_are_served():
    bare = FastAPI()
    web.mount(bare)
    with TestClient(bare) as client:
        assert 'src="/app.js"' in client.get("/").text
        assert client.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/vendor/ort/ort.wasm.min.mjs").headers["content-type"].startswith("text/javascript")
        assert client.get("/vendor/ort/ort-wasm-simd-threaded.wasm").headers["content-type"] == "application/wasm"
