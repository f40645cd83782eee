from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServedPoolDep
from app.errors import NotFound
from app.schemas import Error, FormatOut, InputSpec, TaskList, TaskOut
from poe_core.formats import FORMATS
from poe_core.pool import Pool

router = APIRouter(tags=["tasks"], responses={503: {"model": Error, "description": "No active pool"}})

# Served from the loaded pool: no SQL per request.


def _out(pool: Pool, name: str) -> TaskOut:
    info = pool.expert_info(name)
    stored = {"fp32": {"val_acc": info["val_acc"]}} | info.get("formats", {})
    by_format = {w: stored[w]["val_acc"] if pool.format_info(w)["available"] else None for w in FORMATS}
    return TaskOut(name=name, classes=pool.taxonomy.class_names(name), params=info["params"],
                   flops=info["flops"], onnx_bytes=info["onnx_bytes"], val_acc=info["val_acc"],
                   val_acc_by_format=by_format)


@router.get("/tasks", response_model=TaskList, summary="The active pool's primitive tasks")
async def list_tasks(served: ServedPoolDep) -> TaskList:
    pool = served.pool
    library = pool.manifest["library"]
    return TaskList(pool_version=served.version, pool_id=served.pool_id,
                    input=InputSpec.of(pool.image_shape, pool.mean, pool.std, pool.spec.dataset.preprocess),
                    library={k: library[k] for k in ("params", "flops", "onnx_bytes")},
                    formats={w: FormatOut(**{k: v for k, v in pool.format_info(w).items()
                                             if k in FormatOut.model_fields}) for w in FORMATS},
                    tasks=[_out(pool, t) for t in served.tasks if t not in served.damaged])


@router.get("/tasks/{name}", response_model=TaskOut, summary="One primitive task of the active pool",
            responses={404: {"model": Error}})
async def get_task(name: str, served: ServedPoolDep) -> TaskOut:
    if name not in served.tasks:
        raise NotFound(f"no primitive task {name!r}; valid tasks: {', '.join(served.tasks)}")
    served.require([name])
    return _out(served.pool, name)
