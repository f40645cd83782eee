from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.deps import ServedPoolDep, SessionDep
from app.errors import NotFound
from app.schemas import Error, FormatOut, TaskList, TaskOut
from app.store.tables import PrimitiveTask
from poe_core.formats import FORMATS
from poe_core.pool import Pool

router = APIRouter(tags=["tasks"], responses={503: {"model": Error, "description": "No active pool"}})


def _out(task: PrimitiveTask, pool: Pool) -> TaskOut:
    e = task.expert
    stored = {"fp32": {"val_acc": e.val_acc}} | pool.expert_info(task.name).get("formats", {})
    by_format = {w: stored[w]["val_acc"] if pool.format_info(w)["available"] else None for w in FORMATS}
    return TaskOut(name=task.name, classes=[c.name for c in task.classes], params=e.params, flops=e.flops,
                   onnx_bytes=e.onnx_bytes, val_acc=e.val_acc, val_acc_by_format=by_format)


@router.get("/tasks", response_model=TaskList, summary="The active pool's primitive tasks")
def list_tasks(served: ServedPoolDep, session: SessionDep) -> TaskList:
    tasks = session.scalars(select(PrimitiveTask).where(PrimitiveTask.pool_version == served.version)
                            .order_by(PrimitiveTask.position)).all()
    library = served.pool.manifest["library"]
    return TaskList(pool_version=served.version, pool_id=served.pool_id,
                    library={k: library[k] for k in ("params", "flops", "onnx_bytes")},
                    formats={w: FormatOut(**{k: v for k, v in served.pool.format_info(w).items()
                                             if k in FormatOut.model_fields}) for w in FORMATS},
                    tasks=[_out(t, served.pool) for t in tasks])


@router.get("/tasks/{name}", response_model=TaskOut, summary="One primitive task of the active pool",
            responses={404: {"model": Error}})
def get_task(name: str, served: ServedPoolDep, session: SessionDep) -> TaskOut:
    task = session.scalars(select(PrimitiveTask).where(PrimitiveTask.pool_version == served.version,
                                                       PrimitiveTask.name == name)).first()
    if task is None:
        raise NotFound(f"no primitive task {name!r}; valid tasks: {', '.join(served.pool.tasks)}")
    return _out(task, served.pool)
