"""POST /models and GET /models/{id}[/download]: composite models, assembled per query
from the active pool (see app.serving.models: nothing is stored per query).

POST /models is the hot path, written lean on purpose: no dependencies to resolve, no
thread hop, no SQL. A request body seen recently is looked up with the query it parsed
to; a new one is parsed and validated with pydantic here (so the body is documented in
OpenAPI, but FastAPI does not parse it twice). FastLane, an ASGI middleware, takes POST
/models past FastAPI's routing altogether; whatever it cannot answer with a model goes
the ordinary way, where the same handler raises the same error for its handler to answer.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from app.deps import ServicesDep
from app.errors import InvalidTasks, NotFound
from app.schemas import Error, InputSpec, ModelOut, ModelRequest
from app.serving import MEMO_BODY_BYTES
from app.serving.models import ONNX, ServedModel, parse_model_id, query_of
from app.serving.models import Query as ModelQuery
from app.serving.registry import ServedPool
from app.store.pools import PoolNotFound
from poe_core.taxonomy import TaskError

router = APIRouter(tags=["models"])

ONNX_RESPONSE = {"description": "The ONNX model file", "content": {ONNX: {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs put in place of their $refs."""
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _inlined(ModelRequest.model_json_schema())}}}}


def wants_json(accept: str | None) -> bool:
    """True when the Accept header prefers application/json over the ONNX file."""
    if not accept:
        return False
    quality = {}
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            quality[media.lower()] = float(q)
        except ValueError:
            quality[media.lower()] = 0.0
    json_q = quality.get("application/json", 0.0)
    if ONNX in quality:
        return json_q > quality[ONNX]
    # Named beats a wildcard: "application/json, */*" asks for JSON.
    return json_q > 0 and json_q >= quality.get("application/*", quality.get("*/*", 0.0))


def model_out(model: ServedModel, base_url: str) -> ModelOut:
    info = model.info
    url = f"{base_url}/models/{info.id}/download" + ("" if info.format == "onnx" else f"?format={info.format}")
    return ModelOut(
        id=info.id, pool_version=info.pool_version, pool_id=info.pool_id, tasks=list(info.tasks),
        labels=list(info.labels), output=info.output, weights=info.weights, format=info.format,
        params=info.params, flops=info.flops, bytes=info.size, sha256=info.sha256, val_acc=info.val_acc,
        val_acc_by_format=info.val_acc_by_format, val_acc_by_class=info.val_acc_by_class,
        input=InputSpec(shape=["batch", *info.image_shape], **info.normalization), created_at=info.created_at,
        download_url=url,
    )


def _metadata(request: Request, model: ServedModel) -> JSONResponse:
    # Relative unless POE_PUBLIC_URL says otherwise: never built from the Host header.
    base = (request.app.state.settings.public_url or "").rstrip("/")
    return JSONResponse(model_out(model, base).model_dump(mode="json"))


def _parse(served: ServedPool, body: bytes) -> tuple[ModelQuery, str]:
    """The query and file format of a POST /models body, validated against the pool."""
    try:
        request = ModelRequest.model_validate_json(body)
    except ValidationError as e:
        # Without the input, which may be bytes that are not text; context as text.
        errors = json.loads(json.dumps(e.errors(include_url=False, include_input=False), default=str))
        raise RequestValidationError([e | {"loc": ["body", *e["loc"]]} for e in errors]) from None
    try:
        tasks = served.pool.taxonomy.validate(request.tasks)
    except TaskError as e:
        raise InvalidTasks(str(e), served.tasks) from None
    options = request.options
    return ModelQuery.of(tasks, options.softmax, options.weight_format), options.format


async def _model(request: Request, served: ServedPool, query: ModelQuery, file_format: str) -> ServedModel:
    serving = request.app.state.services.serving
    served.require(query.tasks)
    served.pool.require_format(query.weights)
    model = serving.models.get(served, query)
    serving.counts.count(served.version, query.tasks)
    return await serving.ort.get(model) if file_format == "ort" else model


@router.post(
    "/models", summary="Assemble the model of a composite task", response_model=ModelOut,
    openapi_extra=REQUEST_BODY,
    responses={200: {"description": "The ONNX file; with `Accept: application/json`, its metadata",
                     "content": {ONNX: ONNX_RESPONSE["content"][ONNX]}},
               413: {"model": Error},
               422: {"description": "Not JSON, unknown, repeated or no tasks, wrong types, or a weight format "
                                    "the pool refuses (`detail` says why)"},
               503: {"model": Error, "description": "No active pool, a damaged part of it, or busy converting"}},
)
async def create_model(request: Request) -> Response:
    # app.state, not Depends: this is the hot path (see the module's docstring).
    serving = request.app.state.services.serving
    pools = serving.pools
    served = pools.active_if_fresh() or await run_in_threadpool(pools.active)
    body = await request.body()
    key = (served.version, body)
    parsed = serving.queries.get(key)
    if parsed is None:
        parsed = _parse(served, body)
        if len(body) <= MEMO_BODY_BYTES:
            serving.queries[key] = parsed
    model = await _model(request, served, *parsed)
    if wants_json(request.headers.get("accept")):
        return _metadata(request, model)
    return Response(model.data, media_type=ONNX, headers=model.headers)


async def _resolve(services, model_id: str) -> tuple[ServedPool, ModelQuery]:
    """The pool version and query a model id names, or NotFound."""
    missing = NotFound(f"no model {model_id!r}; POST /models to assemble one")
    parsed = parse_model_id(model_id)
    if parsed is None:
        raise missing
    pools = services.serving.pools
    try:
        served = pools.loaded(parsed[0]) or await run_in_threadpool(pools.get, parsed[0])
    except PoolNotFound:
        raise missing from None
    query = query_of(served, model_id)
    if query is None or not served.pool.format_info(query.weights)["available"]:
        raise missing
    return served, query


@router.get("/models/{model_id}", response_model=ModelOut, summary="Metadata of a model",
            responses={404: {"model": Error}, 503: {"model": Error}})
async def get_model(model_id: str, request: Request, services: ServicesDep) -> Response:
    served, query = await _resolve(services, model_id)
    return _metadata(request, await _model(request, served, query, "onnx"))


def _matches(if_none_match: str | None, sha256: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")]
    return "*" in tags or sha256 in tags


@router.get("/models/{model_id}/download", name="download_model", summary="The ONNX (or ORT) file of a model",
            response_class=Response,
            responses={200: ONNX_RESPONSE, 304: {"description": "Not modified (If-None-Match)"},
                       404: {"model": Error}, 503: {"model": Error}})
async def download_model(model_id: str, request: Request, services: ServicesDep,
                         if_none_match: Annotated[str | None, Header()] = None,
                         format: Annotated[Literal["onnx", "ort"], Query()] = "onnx") -> Response:
    served, query = await _resolve(services, model_id)
    model = await _model(request, served, query, format)
    if _matches(if_none_match, model.sha256):
        return Response(status_code=304, headers=model.headers)
    return Response(model.data, media_type=ONNX, headers=model.headers)


class FastLane:
    """POST /models straight to its handler, skipping FastAPI's routing, dependency
    solving and per-request bookkeeping: about half the cost of a cached answer."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/models":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            response = await create_model(request)
        except ClientDisconnect:
            return
        except HTTPException as e:  # raised while reading the body (too large): it cannot be replayed
            response = JSONResponse({"detail": e.detail}, e.status_code, headers=e.headers)
        except Exception:
            body = await request.body()  # read already: handed on as it was received
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)
        await response(scope, receive, send)
