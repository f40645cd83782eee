"""The browser page and the API docs, with no CDN: static files at /, and from npm
(`npm ci --prefix app/web`) onnxruntime-web at /vendor/ort/ so the page runs models,
Swagger UI at /vendor/swagger-ui/ and ReDoc at /vendor/redoc/ for /docs and /redoc.
Without node_modules the vendor URLs answer 404 and the page and docs say how to install them.

The app must be created with `docs_url=None, redoc_url=None`, so that FastAPI's own
CDN-loading docs pages do not take /docs and /redoc before these."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Mount

log = logging.getLogger(__name__)

WEB = Path(__file__).parent
STATIC = WEB / "static"
NODE_MODULES = WEB / "node_modules"
ORT_DIST = NODE_MODULES / "onnxruntime-web" / "dist"
SWAGGER_DIST = NODE_MODULES / "swagger-ui-dist"
REDOC_DIST = NODE_MODULES / "redoc" / "bundles"
INSTALL = "run `npm ci --prefix app/web` and restart"

# The docs pages may load from this origin only: ReDoc's bundle asks cdn.redoc.ly for its
# logo (and hides it when refused), and no request of the docs should leave the machine.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:")

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
FAVICON_URL = "/favicon.svg"


def _vendor(app: FastAPI, prefix: str, directory: Path, package: str, needed: str, without: str) -> bool:
    """Serve `directory` at `prefix`, or a 404 naming the npm package when it is absent."""
    if (directory / needed).is_file():
        app.mount(prefix, StaticFiles(directory=directory), name=f"vendor-{package}")
        return True
    message = f"{package} is not installed: {INSTALL}"
    log.warning("%s; %s", message, without)

    @app.get(prefix + "/{path:path}", include_in_schema=False)
    def missing_vendor(path: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=404)

    return False


def _missing_docs(package: str, openapi_url: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><title>API documentation</title><p>{package} is not installed on this server: "
        f"<code>npm ci --prefix app/web</code>, then restart. The OpenAPI schema is at "
        f'<a href="{openapi_url}">{openapi_url}</a>.</p>', status_code=503)


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def mount_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, their scripts served by the app itself."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None, redoc_url=None: app.web serves the docs")
    openapi_url = app.openapi_url
    title = app.title
    swagger = _vendor(app, "/vendor/swagger-ui", SWAGGER_DIST, "swagger-ui-dist", "swagger-ui-bundle.js",
                      f"{DOCS_URL} cannot show the API")
    redoc = _vendor(app, "/vendor/redoc", REDOC_DIST, "redoc", "redoc.standalone.js",
                    f"{REDOC_URL} cannot show the API")
    oauth2_redirect_url = DOCS_URL + "/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        if not swagger:
            return _missing_docs("swagger-ui-dist", openapi_url)
        return _local_only(get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title} - Swagger UI", oauth2_redirect_url=oauth2_redirect_url,
            swagger_js_url="/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/vendor/swagger-ui/swagger-ui.css", swagger_favicon_url=FAVICON_URL,
            # the online validator would send the schema's URL to a third party
            swagger_ui_parameters={"validatorUrl": None}))

    @app.get(oauth2_redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc_ui() -> HTMLResponse:
        if not redoc:
            return _missing_docs("redoc", openapi_url)
        return _local_only(get_redoc_html(
            openapi_url=openapi_url, title=f"{title} - ReDoc", redoc_js_url="/vendor/redoc/redoc.standalone.js",
            redoc_favicon_url=FAVICON_URL, with_google_fonts=False))


def mount(app: FastAPI) -> None:
    """Mount the docs, the vendor files and the page; the page last, since it takes every other path."""
    mount_docs(app)
    _vendor(app, "/vendor/ort", ORT_DIST, "onnxruntime-web", "ort.wasm.min.mjs",
            "the page cannot run models in the browser")
    app.router.routes.append(PageMount("/", StaticFiles(directory=STATIC, html=True), name="web"))


class PageMount(Mount):
    """The page's mount at /, for GET and HEAD only: any other method on any path goes on
    to the API's routes, so `OPTIONS /models` is the API's 405 (with its Allow header),
    not the static files'."""

    def matches(self, scope):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            return Match.NONE, {}
        return super().matches(scope)
