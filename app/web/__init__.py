"""The browser page: static files at /, and onnxruntime-web (from npm, `npm ci --prefix
app/web`) at /vendor/ort/ so the page runs models without any CDN. Without node_modules
the vendor URLs answer 404 and the page says how to install them."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger(__name__)

WEB = Path(__file__).parent
STATIC = WEB / "static"
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
MISSING = "onnxruntime-web is not installed: run `npm ci --prefix app/web` and restart"


def mount(app: FastAPI) -> None:
    """Mount the vendor files and the page; the page last, since it takes every other path."""
    if ORT_DIST.is_dir():
        app.mount("/vendor/ort", StaticFiles(directory=ORT_DIST), name="vendor-ort")
    else:
        log.warning("%s; the page cannot run models in the browser", MISSING)

        @app.get("/vendor/ort/{path:path}", include_in_schema=False)
        def missing_vendor(path: str) -> JSONResponse:
            return JSONResponse({"detail": MISSING}, status_code=404)

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="web")
