from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.deps import ServicesDep
from app.errors import InvalidTasks, NotFound
from app.schemas import Error, InputSpec, ModelOut, ModelRequest
from app.store.assembled import CachedModel, ModelInfo
from app.store.pools import ServedPool
from poe_core.formats import FORMATS, to_ort
from poe_core.pool import Pool
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
    json_q = quality.get("application/json", 0.0)
    if ONNX in quality:
        return json_q > quality[ONNX]
    # Named beats a wildcard: "application/json, */*" asks for JSON.
    return json_q > 0 and json_q >= quality.get("application/*", quality.get("*/*", 0.0))


class OrtFiles:
    """ORT-format conversions of assembled ONNX files, keyed by the ONNX file's sha256
    (so shared safely by every pool version): onnxruntime converts a model in tens of
    milliseconds, once per process, and the last `size` results stay in memory."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._files: OrderedDict[str, CachedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: CachedModel) -> CachedModel:
        with self._lock:
            found = self._files.get(model.info.sha256)
            if found is not None:
                self._files.move_to_end(model.info.sha256)
                return found
        data = to_ort(model.data)
        converted = CachedModel(replace(model.info, sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
                                data)
        with self._lock:
            self._files[model.info.sha256] = converted
            while len(self._files) > self.size:
                self._files.popitem(last=False)
        return converted


ORT_FILES = OrtFiles()


def accuracy_by_format(pool: Pool, tasks) -> dict[str, float | None]:
    return {w: pool.composite_accuracy(tasks, w) if pool.format_info(w)["available"] else None
            for w in FORMATS}


def model_out(info: ModelInfo, request: Request, pool: Pool, file_format: str = "onnx") -> ModelOut:
    url = request.url_for("download_model", model_id=info.id)
    return ModelOut(
        id=info.id, pool_version=info.pool_version, pool_id=info.pool_id, tasks=list(info.tasks),
        labels=list(info.labels), output=info.output, weights=info.weights, format=file_format,
        params=info.params, flops=info.flops, bytes=info.size, sha256=info.sha256, val_acc=info.val_acc,
        val_acc_by_format=accuracy_by_format(pool, info.tasks),
        input=InputSpec(shape=["batch", *info.image_shape], **info.normalization), created_at=info.created_at,
        download_url=str(url if file_format == "onnx" else url.include_query_params(format=file_format)),
    )


def file_name(info: ModelInfo, file_format: str = "onnx") -> str:
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", "+".join(info.tasks))
    if len(stem) > 80:
        stem = f"{len(info.tasks)}-tasks-{info.id[:8]}"
    suffix = ("-softmax" if info.output == "probabilities" else "") + (
        "" if info.weights == "fp32" else f"-{info.weights}")
    return f"poe-{stem}{suffix}.{file_format}"


def headers(info: ModelInfo, file_format: str = "onnx") -> dict[str, str]:
    return {
        "ETag": f'"{info.sha256}"',
        "Cache-Control": "public, max-age=31536000, immutable",
        "X-Model-Id": info.id,
        "Content-Disposition": f'attachment; filename="{file_name(info, file_format)}"',
    }


def onnx_response(model: CachedModel, file_format: str = "onnx") -> Response:
    return Response(model.data, media_type=ONNX, headers=headers(model.info, file_format))


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
               413: {"model": Error},
               422: {"description": "Unknown, repeated or no tasks; wrong types; a weight format the "
                                    "pool refuses (`detail` says why)"},
               503: {"model": Error, "description": "No active pool"}},
)
async def create_model(body: ModelRequest, request: Request, services: ServicesDep,
                       accept: Annotated[str | None, Header()] = None):
    served = services.pools.active_if_fresh() or await run_in_threadpool(services.pools.active)
    tasks = _validated(served, body.tasks)
    weights = body.options.weight_format
    served.pool.require_format(weights)
    model = services.models.peek(served, tasks, body.options.softmax, weights)
    if model is None:
        model = await run_in_threadpool(services.models.get_or_create, served, tasks,
                                        body.options.softmax, weights)
    file_format = body.options.format
    if file_format == "ort":
        model = await run_in_threadpool(ORT_FILES.get, model)
    if wants_json(accept):
        return model_out(model.info, request, served.pool, file_format)
    return onnx_response(model, file_format)


def _described(services, model_id: str) -> ModelInfo:
    info = services.models.describe(model_id)
    if info is None:
        raise NotFound(f"no model {model_id!r}; POST /models to assemble one")
    return info


@router.get("/models/{model_id}", response_model=ModelOut, summary="Metadata of an assembled model",
            responses={404: {"model": Error}})
def get_model(model_id: str, request: Request, services: ServicesDep) -> ModelOut:
    info = _described(services, model_id)
    return model_out(info, request, services.pools.get(info.pool_version).pool)


def _matches(if_none_match: str | None, sha256: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")]
    return "*" in tags or sha256 in tags


@router.get("/models/{model_id}/download", name="download_model", summary="The ONNX (or ORT) file of a model",
            response_class=Response,
            responses={200: ONNX_RESPONSE, 304: {"description": "Not modified (If-None-Match)"},
                       404: {"model": Error}, 503: {"model": Error}})
def download_model(model_id: str, services: ServicesDep,
                   if_none_match: Annotated[str | None, Header()] = None,
                   format: Annotated[Literal["onnx", "ort"], Query()] = "onnx") -> Response:
    info = _described(services, model_id)
    model = None
    if format == "ort":  # its ETag is the converted file's sha256, known once converted
        model = ORT_FILES.get(services.models.fetch(info))
        info = model.info
    if _matches(if_none_match, info.sha256):
        return Response(status_code=304, headers=headers(info, format))
    return onnx_response(model or services.models.fetch(info), format)
