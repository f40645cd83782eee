from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.deps import ServedPoolDep, SessionDep
from app.errors import NotFound
from app.schemas import Error, TaskList, TaskOut
from app.store.tables import PrimitiveTask

router = APIRouter(tags=["tasks"], responses={503: {"model": Error, "description": "No active pool"}})


def _out(task: PrimitiveTask) -> TaskOut:
    e = task.expert
    return TaskOut(name=task.name, classes=[c.name for c in task.classes], params=e.params, flops=e.flops,
                   onnx_bytes=e.onnx_bytes, val_acc=e.val_acc)


@router.get("/tasks", response_model=TaskList, summary="The active pool's primitive tasks")
def list_tasks(served: ServedPoolDep, session: SessionDep) -> TaskList:
    tasks = session.scalars(select(PrimitiveTask).where(PrimitiveTask.pool_version == served.version)
                            .order_by(PrimitiveTask.position)).all()
    library = served.pool.manifest["library"]
    return TaskList(pool_version=served.version, pool_id=served.pool_id,
                    library={k: library[k] for k in ("params", "flops", "onnx_bytes")},
                    tasks=[_out(t) for t in tasks])


@router.get("/tasks/{name}", response_model=TaskOut, summary="One primitive task of the active pool",
            responses={404: {"model": Error}})
def get_task(name: str, served: ServedPoolDep, session: SessionDep) -> TaskOut:
    task = session.scalars(select(PrimitiveTask).where(PrimitiveTask.pool_version == served.version,
                                                       PrimitiveTask.name == name)).first()
    if task is None:
        raise NotFound(f"no primitive task {name!r}; valid tasks: {', '.join(served.pool.tasks)}")
    return _out(task)
