from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.deps import ServicesDep
from app.errors import InvalidTasks, NotFound
from app.schemas import Error, InputSpec, ModelOut, ModelRequest
from app.store.assembled import CachedModel, ModelInfo
from app.store.pools import ServedPool
from poe_core.taxonomy import TaskError

router = APIRouter(tags=["models"])

ONNX = "application/octet-stream"
ONNX_RESPONSE = {"description": "The ONNX model file", "content": {ONNX: {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}


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
    onnx = quality.get(ONNX, quality.get("application/*", quality.get("*/*", 0.0)))
    return quality.get("application/json", 0.0) > onnx


def model_out(info: ModelInfo, request: Request) -> ModelOut:
    return ModelOut(
        id=info.id, pool_version=info.pool_version, pool_id=info.pool_id, tasks=list(info.tasks),
        labels=list(info.labels), output=info.output, weights=info.weights, params=info.params,
        flops=info.flops, bytes=info.size, sha256=info.sha256, val_acc=info.val_acc,
        input=InputSpec(shape=["batch", *info.image_shape], **info.normalization),
        created_at=info.created_at, download_url=str(request.url_for("download_model", model_id=info.id)),
    )


def file_name(info: ModelInfo) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", "+".join(info.tasks))
    if len(stem) > 80:
        stem = f"{len(info.tasks)}-tasks-{info.id[:8]}"
    suffix = ("-softmax" if info.output == "probabilities" else "") + ("-fp16" if info.weights == "fp16" else "")
    return f"poe-{stem}{suffix}.onnx"


def headers(info: ModelInfo) -> dict[str, str]:
    return {
        "ETag": f'"{info.sha256}"',
        "Cache-Control": "public, max-age=31536000, immutable",
        "X-Model-Id": info.id,
        "Content-Disposition": f'attachment; filename="{file_name(info)}"',
    }


def onnx_response(model: CachedModel) -> Response:
    return Response(model.data, media_type=ONNX, headers=headers(model.info))


def _validated(served: ServedPool, tasks: list[str]) -> list[str]:
    try:
        return served.pool.taxonomy.validate(tasks)
    except TaskError as e:
        raise InvalidTasks(str(e), served.pool.tasks) from None


@router.post(
    "/models", summary="Assemble (or fetch) the model of a composite task",
    response_model=ModelOut,
    responses={200: {"description": "The ONNX file; with `Accept: application/json`, its metadata",
                     "content": {ONNX: ONNX_RESPONSE["content"][ONNX]}},
               413: {"model": Error}, 422: {"description": "Unknown, repeated or no tasks; wrong types"},
               503: {"model": Error, "description": "No active pool"}},
)
async def create_model(body: ModelRequest, request: Request, services: ServicesDep,
                       accept: Annotated[str | None, Header()] = None):
    served = services.pools.active_if_fresh() or await run_in_threadpool(services.pools.active)
    tasks = _validated(served, body.tasks)
    weights = "fp16" if body.options.fp16 else "fp32"
    model = services.models.peek(served, tasks, body.options.softmax, weights)
    if model is None:
        model = await run_in_threadpool(services.models.get_or_create, served, tasks,
                                        body.options.softmax, weights)
    if wants_json(accept):
        return model_out(model.info, request)
    return onnx_response(model)


def _described(services, model_id: str) -> ModelInfo:
    info = services.models.describe(model_id)
    if info is None:
        raise NotFound(f"no model {model_id!r}; POST /models to assemble one")
    return info


@router.get("/models/{model_id}", response_model=ModelOut, summary="Metadata of an assembled model",
            responses={404: {"model": Error}})
def get_model(model_id: str, request: Request, services: ServicesDep) -> ModelOut:
    return model_out(_described(services, model_id), request)


def _matches(if_none_match: str | None, sha256: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")]
    return "*" in tags or sha256 in tags


@router.get("/models/{model_id}/download", name="download_model", summary="The ONNX file of a model",
            response_class=Response,
            responses={200: ONNX_RESPONSE, 304: {"description": "Not modified (If-None-Match)"},
                       404: {"model": Error}, 503: {"model": Error}})
def download_model(model_id: str, services: ServicesDep,
                   if_none_match: Annotated[str | None, Header()] = None) -> Response:
    info = _described(services, model_id)
    if _matches(if_none_match, info.sha256):
        return Response(status_code=304, headers=headers(info))
    return onnx_response(services.models.fetch(info))
