import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import app.web as web
from app.main import create_app


def _bare() -> FastAPI:
    app = FastAPI(title="bare", docs_url=None, redoc_url=None)
    web.mount(app)
    return app


def test_missing_npm_packages_are_a_clear_404(monkeypatch, tmp_path):
    for name in ("ORT_DIST", "SWAGGER_DIST", "REDOC_DIST"):
        monkeypatch.setattr(web, name, tmp_path / "absent")
    with TestClient(_bare()) as client:
        r = client.get("/vendor/ort/ort.wasm.min.mjs")
        assert r.status_code == 404 and "npm ci --prefix app/web" in r.json()["detail"]
        assert client.get("/").status_code == 200
        assert "npm ci --prefix app/web" in client.get("/app.js").text
        for path, package in (("/vendor/swagger-ui/swagger-ui-bundle.js", "swagger-ui-dist"),
                              ("/vendor/redoc/redoc.standalone.js", "redoc")):
            r = client.get(path)
            assert r.status_code == 404 and r.json()["detail"].startswith(f"{package} is not installed")
        for path in ("/docs", "/redoc"):
            r = client.get(path)
            assert r.status_code == 503 and "npm ci --prefix app/web" in r.text and "/openapi.json" in r.text


def test_page_links_its_favicon_and_serves_the_samples():
    with TestClient(_bare()) as client:
        page = client.get("/").text
        assert '<link rel="icon" href="/favicon.svg" type="image/svg+xml">' in page
        assert 'capture="environment"' in page
        assert client.get("/favicon.svg").headers["content-type"] == "image/svg+xml"
        index = client.get("/samples/index.json").json()
        label, ids = next(iter(index["images"].items()))
        image = client.get("/samples/" + index["file"].format(label=label, index=ids[0]))
        assert image.headers["content-type"] == "image/png"


def test_docs_need_fastapis_own_docs_off():
    with pytest.raises(ValueError, match="docs_url=None"):
        web.mount(FastAPI())


@pytest.mark.skipif(not web.ORT_DIST.is_dir(), reason="onnxruntime-web absent: npm ci --prefix app/web")
def test_page_and_vendor_files_are_served():
    with TestClient(_bare()) as client:
        assert 'src="/app.js"' in client.get("/").text
        assert client.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/vendor/ort/ort.wasm.min.mjs").headers["content-type"].startswith("text/javascript")
        assert client.get("/vendor/ort/ort-wasm-simd-threaded.wasm").headers["content-type"] == "application/wasm"


@pytest.mark.skipif(not (web.SWAGGER_DIST.is_dir() and web.REDOC_DIST.is_dir()),
                    reason="swagger-ui-dist or redoc absent: npm ci --prefix app/web")
def test_service_docs_load_only_from_the_service():
    """create_app's /docs and /redoc name no other host: every script, style and icon is ours."""
    app = create_app()
    client = TestClient(app)  # no lifespan: the docs need no services
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200
        assert "http://" not in page.text and "https://" not in page.text, page.text
    docs = client.get("/docs").text
    for url in ("/vendor/swagger-ui/swagger-ui-bundle.js", "/vendor/swagger-ui/swagger-ui.css", "/favicon.svg"):
        assert url in docs
        assert client.get(url).status_code == 200
    assert "/vendor/redoc/redoc.standalone.js" in client.get("/redoc").text
    for path in ("/docs", "/redoc"):  # what the bundles themselves ask of other hosts is refused
        assert "default-src 'self'" in client.get(path).headers["content-security-policy"]
    assert client.get("/vendor/redoc/redoc.standalone.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/docs/oauth2-redirect").status_code == 200
