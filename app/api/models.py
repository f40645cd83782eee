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
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.deps import ServicesDep
from app.errors import InvalidTasks, NotFound
from app.metrics import NATIVE_ANSWERS, TALLY
from app.schemas import Error, InputSpec, MaskOut, ModelOut, ModelRequest, PlanOut, PlanPoint, RejectOut
from app.serving import MEMO_BODY_BYTES
from app.serving.models import ONNX, ServedModel, model_id, parse_model_id, query_of, resolve
from app.serving.models import Query as ModelQuery
from app.serving.registry import ServedPool
from app.store.pools import PoolNotFound
from poe_core.budget import Budget, BudgetError, plan
from poe_core.formats import Unavailable
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


def _download_url(base_url: str, ident: str, file_format: str = "onnx") -> str:
    return f"{base_url}/models/{ident}/download" + ("" if file_format == "onnx" else f"?format={file_format}")


def model_out(model: ServedModel, base_url: str) -> ModelOut:
    info = model.info
    return ModelOut(
        id=info.id, pool_version=info.pool_version, pool_id=info.pool_id, tasks=list(info.tasks),
        labels=list(info.labels), output=info.output, weights=info.weights, format=info.format,
        method=info.method, widths=info.widths,
        params=info.params, flops=info.flops, bytes=info.size, sha256=info.sha256, val_acc=info.val_acc,
        val_acc_by_format=info.val_acc_by_format, val_acc_by_class=info.val_acc_by_class,
        reject=RejectOut(**info.reject.to_dict()), reject_output=info.reject_output,
        mask=None if info.mask is None else MaskOut(**info.mask),
        input=InputSpec.of(info.image_shape, info.normalization["mean"], info.normalization["std"], info.preprocess),
        created_at=info.created_at,
        download_url=_download_url(base_url, info.id, info.format),
    )


def _base_url(request: Request) -> str:
    # Relative unless POE_PUBLIC_URL says otherwise: never built from the Host header.
    return (request.app.state.settings.public_url or "").rstrip("/")


def _metadata(request: Request, model: ServedModel) -> JSONResponse:
    return JSONResponse(model_out(model, _base_url(request)).model_dump(mode="json"))


def _request(body: bytes) -> ModelRequest:
    try:
        return ModelRequest.model_validate_json(body)
    except ValidationError as e:
        # Without the input, which may be bytes that are not text; context as text.
        errors = json.loads(json.dumps(e.errors(include_url=False, include_input=False), default=str))
        raise RequestValidationError([e | {"loc": ["body", *e["loc"]]} for e in errors]) from None


def _query(served: ServedPool, request: ModelRequest, budget: bool = True) -> ModelQuery:
    """The query of a validated body against the pool (`budget` False: leave the widths at
    their defaults, as a plan does)."""
    options = request.options
    limits = options.budget if budget else None
    try:
        return resolve(served, request.tasks or (), request.classes or (), softmax=options.softmax,
                       weights=options.weight_format, method=options.method, widths=options.widths,
                       budget=None if limits is None else Budget(**limits.model_dump()),
                       reject_output=options.reject_output)
    except TaskError as e:
        raise InvalidTasks(str(e), served.tasks) from None


def _parse(served: ServedPool, body: bytes) -> tuple[ModelQuery, str, str]:
    """The query, file format and model id of a POST /models body, validated against the pool."""
    request = _request(body)
    query = _query(served, request)
    return query, request.options.format, model_id(served, query)


def _onnx(serving, served: ServedPool, query: ModelQuery, ident: str | None = None) -> ServedModel:
    served.require(query.tasks)
    served.pool.require_format(query.weights)
    model = serving.models.get(served, query, ident)
    serving.counts.count(served.version, query.tasks)
    return model


async def _model(serving, served: ServedPool, query: ModelQuery, file_format: str,
                 ident: str | None = None) -> ServedModel:
    model = _onnx(serving, served, query, ident)
    return await serving.ort.get(model) if file_format == "ort" else model


def _parsed(serving, served: ServedPool, body: bytes) -> tuple[ModelQuery, str, str]:
    """_parse, looked up first among the bodies seen recently (with the query they parsed to)."""
    key = (served.version, body)
    parsed = serving.queries.get(key)
    if parsed is None:
        parsed = _parse(served, body)
        if len(body) <= MEMO_BODY_BYTES:
            serving.queries[key] = parsed
    return parsed


async def _posted(serving, body: bytes) -> ServedModel:
    """The model a POST /models body asks for, from the active pool."""
    pools = serving.pools
    served = pools.active_if_fresh() or await run_in_threadpool(pools.active)
    query, file_format, ident = _parsed(serving, served, body)
    return await _model(serving, served, query, file_format, ident)


def posted_file(serving, body: bytes) -> ServedModel | None:
    """_posted without waiting for anything: the ONNX file, or None when the answer would
    have to wait (the active version not known fresh, an ORT conversion). Raises as
    _posted does."""
    served = serving.pools.active_if_fresh()
    if served is None:
        return None
    query, file_format, ident = _parsed(serving, served, body)
    return _onnx(serving, served, query, ident) if file_format == "onnx" else None


@router.post(
    "/models", summary="Assemble the model of a composite task", response_model=ModelOut,
    openapi_extra=REQUEST_BODY,
    responses={200: {"description": "The ONNX file; with `Accept: application/json`, its metadata",
                     "content": {ONNX: ONNX_RESPONSE["content"][ONNX]}},
               413: {"model": Error},
               422: {"description": "Not JSON, unknown, repeated or no tasks or classes, wrong types, "
                                    "contradicting options, a budget nothing fits, or a capability the pool "
                                    "does not offer (`detail` says why)"},
               503: {"model": Error, "description": "No active pool, a damaged part of it, or busy converting"}},
)
async def create_model(request: Request) -> Response:
    # app.state, not Depends (see the module's docstring); FastLane answers most requests
    # before they get here.
    model = await _posted(request.app.state.services.serving, await request.body())
    if wants_json(request.headers.get("accept")):
        return _metadata(request, model)
    return ModelFile(model)


class ModelFile(Response):
    """A model file answer with the headers its ServedModel encoded once."""

    def __init__(self, model: ServedModel) -> None:
        self.status_code, self.body, self.background = 200, model.data, None
        self.raw_headers = list(model.raw_headers)


async def _resolve(services, ident: str) -> tuple[ServedPool, ModelQuery]:
    """The pool version and query a model id names, or NotFound."""
    missing = NotFound(f"no model {ident!r}; POST /models to assemble one")
    parsed = parse_model_id(ident)
    if parsed is None:
        raise missing
    pools = services.serving.pools
    try:
        served = pools.loaded(parsed.version) or await run_in_threadpool(pools.get, parsed.version)
    except PoolNotFound:
        raise missing from None
    query = query_of(served, ident)
    if query is None:
        raise missing
    return served, query


@router.get("/models/{model_id}", response_model=ModelOut, summary="Metadata of a model",
            responses={404: {"model": Error}, 503: {"model": Error}})
async def get_model(model_id: str, request: Request, services: ServicesDep) -> Response:
    served, query = await _resolve(services, model_id)
    return _metadata(request, await _model(services.serving, served, query, "onnx"))


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get("/models/{model_id}/download", name="download_model", summary="The ONNX (or ORT) file of a model",
            response_class=Response,
            responses={200: ONNX_RESPONSE, 304: {"description": "Not modified (If-None-Match)"},
                       404: {"model": Error}, 503: {"model": Error}})
async def download_model(model_id: str, request: Request, services: ServicesDep,
                         if_none_match: Annotated[str | None, Header()] = None,
                         format: Annotated[Literal["onnx", "ort"], Query()] = "onnx") -> Response:
    served, query = await _resolve(services, model_id)
    model = await _model(services.serving, served, query, format)
    if _matches(if_none_match, model.etag):
        return Response(status_code=304, headers=model.headers)
    return Response(model.data, media_type=ONNX, headers=model.headers)


def plan_of(served: ServedPool, request: ModelRequest, size: str, base_url: str) -> PlanOut:
    """The accuracy-vs-size Pareto front of a request's query over the expert widths, within
    its budget if it gives one (poe_core.budget.plan); one point when the pool holds one
    width. Nothing is assembled but one model, for the bytes of every choice."""
    query = _query(served, request, budget=False)
    if request.options.widths:
        raise InvalidTasks("a plan chooses the widths: send the query without widths", served.tasks)
    m, weights = query.model, query.weights
    if m.method == "mask":
        raise InvalidTasks("a plan chooses expert widths; the mask method has no experts", served.tasks)
    served.require(m.tasks)
    pool = served.pool
    reason = pool.unavailable("widths")
    limits = request.options.budget
    if reason is None:
        budget = None if limits is None else Budget(**limits.model_dump())
        try:
            front = plan(served.assembler, m, weights, size, budget)
        except (Unavailable, BudgetError):
            raise
        except ValueError as e:  # too many candidates to enumerate
            raise InvalidTasks(str(e), served.tasks) from None
        points = [(p.query, p.params, p.bytes, p.macs, p.val_acc) for p in front]
    elif limits is not None:
        raise Unavailable(f"a budget chooses expert widths: {reason}")
    else:
        points = [(m, pool.params(m), served.assembler.sizes(m, [m.widths], weights)[0], pool.flops(m),
                   pool.accuracy(m, weights))]
    out = []
    for choice, params, nbytes, macs, acc in points:
        ident = model_id(served, replace(query, model=choice))
        out.append(PlanPoint(widths=dict(zip(choice.tasks, choice.widths, strict=True)), params=params,
                             bytes=nbytes, macs=macs, val_acc=acc, id=ident,
                             download_url=_download_url(base_url, ident, request.options.format)))
    labels = [pool.taxonomy.classes[c] for c in m.classes]
    return PlanOut(pool_version=served.version, pool_id=served.pool_id, tasks=list(m.tasks), labels=labels,
                   size=size, points=out, unavailable=reason)


@router.post(
    "/models/plan", summary="The accuracy-vs-size front of a composite task over its expert widths",
    response_model=PlanOut, openapi_extra=REQUEST_BODY,
    responses={422: {"description": "As POST /models: bad names or options, a budget nothing fits, the mask "
                                    "method (no widths to choose) (`detail` says why)"},
               503: {"model": Error, "description": "No active pool, or a damaged part of it"}},
)
async def plan_models(request: Request, size: Annotated[Literal["params", "bytes", "macs"], Query()] = "params"
                      ) -> JSONResponse:
    serving = request.app.state.services.serving
    pools = serving.pools
    served = pools.active_if_fresh() or await run_in_threadpool(pools.active)
    body = await request.body()
    base = _base_url(request)
    key = (served.version, size, base, body)
    answer = serving.plans.get(key)
    if answer is None:
        answer = await run_in_threadpool(plan_of, served, _request(body), size, base)
        answer = answer.model_dump(mode="json")
        if len(body) <= MEMO_BODY_BYTES:
            serving.plans[key] = answer
    return JSONResponse(answer)


def _wants_file(headers) -> bool:
    """Whether a POST /models asks for the file (not for JSON metadata): its Accept header."""
    accept = b""
    for name, value in headers:
        if name == b"accept":
            accept = value
    return not accept or not wants_json(accept.decode("latin-1"))


class FastLane:
    """POST /models answered with its file at the ASGI level, before FastAPI's middleware
    stack, routing, dependency solving and Starlette's request and response objects:
    well over half the cost of a cached answer. Only a body of a stated length within the
    limit takes the lane, and only for a file answer; a chunked or oversized body, a
    request for JSON metadata, and every request the lane cannot answer with a model (its
    body replayed) go the ordinary way, through the body limit and the error handlers,
    where create_model raises the same error for its handler to answer.

    `file` is the same lane without ASGI, for app.http's protocol (app.main wires it
    through app.telemetry): it answers from the HTTP parser's callback, or says that the
    request must go the ordinary way. A plain query it answers natively first
    (app.serving.native), with the same bytes and headers."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/models":
            return await self.app(scope, receive, send)
        length = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _wants_file(scope["headers"]):
            try:
                model = await _posted(scope["app"].state.services.serving, body)
            except Exception:
                model = None
            if model is not None:
                await send({"type": "http.response.start", "status": 200, "headers": model.raw_headers})
                await send({"type": "http.response.body", "body": model.data})
                return
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    def file(app, headers, body: bytes) -> tuple[int, bytes, tuple[bytes, ...]] | None:
        """The status, header lines and body chunks of the file a POST /models asks for,
        from `app`'s serving runtime; None when the request must go the ordinary way (JSON
        asked for, an answer that would wait, an error to be answered by its handler)."""
        if not _wants_file(headers):
            return None
        serving = app.state.services.serving
        served = serving.pools.active_if_fresh()
        table = None if served is None else served.native
        if table is not None:  # a plain query: its file joined in C (app.serving.native)
            answer = table.answer(body)
            if answer is not None:
                tasks, head, chunks = answer
                serving.counts.count(served.version, tasks)
                TALLY.inc(NATIVE_ANSWERS)
                return 200, head, chunks
        try:
            model = posted_file(serving, body)
        except Exception:
            return None
        return None if model is None else (200, model.head, model.chunks)
