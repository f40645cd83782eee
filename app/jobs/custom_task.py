"""Custom primitive tasks: `POST /admin/tasks` checks a request against the active pool
(admission, in the API process) and a worker runs it (poe_core.extend.add_task).

The data set is the one the active pool was built on: the request's `data`, or the
data of the job that made the pool. Either lies under POE_DATA_ROOTS. The new pool
version reuses the work directory of its parent (oracle and library for later
extractions, logit banks for later tasks).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from app.jobs.admission import ExtractionRejected, _taxonomy, resolve_data_path
from app.schemas import TaskRequest
from app.serving.registry import PoolRegistry
from app.store.tables import Job, PoolVersion
from poe_core.extend import ExtensionError, check_task
from poe_core.pool import Pool

KIND = "add-task"


def prepare_task(session: Session, request: TaskRequest, registry: PoolRegistry,
                 roots: Sequence[Path]) -> dict:
    """Check a request against the active pool and return what the job row stores:
    the request with the data set resolved and the pool version to extend. Raises
    ExtractionRejected (422) saying what is wrong."""
    version = registry.active_version()
    if version is None:
        raise ExtractionRejected("there is no active pool to add a task to")
    served = registry.get(version)
    if request.name in served.tasks:
        raise ExtractionRejected(f"the active pool (version {version}) already has a primitive task "
                                 f"{request.name!r}; choose another name")
    try:
        check_task(served.pool, request.name, request.classes)
    except ExtensionError as e:
        raise ExtractionRejected(f"the active pool (version {version}): {e}") from None
    body = request.model_dump()
    body["data"] = _data(session, version, body["data"], served.pool.spec.dataset.name, roots)
    if body["data"]["source"] == "image-folder":
        _at_the_pools_size(body["data"], served.pool, version)
    try:
        classes = list(_taxonomy(body["data"]).classes)
    except (ValueError, OSError) as e:
        raise ExtractionRejected(f"data: {e}") from None
    if classes != list(served.pool.taxonomy.classes):
        raise ExtractionRejected(f"data: this data set's classes are not those of the active pool "
                                 f"(version {version}, built on {served.pool.spec.dataset.name})")
    body["pool_version"] = version
    return body


def _data(session: Session, version: int, data: dict | None, dataset: str, roots: Sequence[Path]) -> dict:
    """The request's data source with its paths resolved under the data roots, or that of
    the job which made pool `version`."""
    if data is None:
        pool = session.get(PoolVersion, version)
        job = session.get(Job, pool.job_id) if pool.job_id is not None else None
        if job is None or "data" not in job.request:
            raise ExtractionRejected(f"the active pool (version {version}, data set {dataset!r}) was not built "
                                     "by a job of this service, so its data set is unknown here: give `data`")
        data = dict(job.request["data"])
    if data["source"] == "synthetic":
        data["path"] = data["hierarchy"] = None
        return data
    data["path"] = str(resolve_data_path(data["path"], roots))
    data["hierarchy"] = (str(resolve_data_path(data["hierarchy"], roots, "hierarchy"))
                         if data["source"] == "image-folder" else None)
    return data


def _at_the_pools_size(data: dict, pool: Pool, version: int) -> None:
    """Photos load at the pool's input size (resize and crop); a request naming another is refused."""
    pool_size = pool.image_shape[1]
    pool_resize = (pool.spec.dataset.preprocess or {}).get("resize_shorter_side") or pool_size
    size = data.get("image_size") or pool_size
    resize = data.get("resize") or (pool_resize if size == pool_size else size)
    if (size, resize) != (pool_size, pool_resize):
        raise ExtractionRejected(f"data: image_size {size} and resize {resize} are not the active pool's "
                                 f"(version {version}: image_size {pool_size}, resize {pool_resize}); "
                                 "leave them out to load the photos as the pool was built")
    data["image_size"], data["resize"] = size, resize


def run_add_task(stored: dict, work: Path, registry: PoolRegistry, bank_dirs: Sequence[Path],
                 roots: Sequence[Path], reporter) -> Path:
    """Train the task's expert in `work` and return the extended pool bundle."""
    from poe_core.data import load_splits
    from poe_core.extend import add_task, default_config
    from poe_core.pool import load_pool
    from poe_core.recipe import TrainConfig

    request = TaskRequest.model_validate({k: v for k, v in stored.items() if k != "pool_version"})
    data = request.data
    for path, what in ((data.path, "data path"), (data.hierarchy, "hierarchy")):
        if path is not None:
            resolve_data_path(path, roots, what)
    served = registry.get(stored["pool_version"])
    if served.damaged:
        raise ExtensionError(f"pool version {served.version} has damaged experts "
                             f"({', '.join(served.damaged)}); import its bundle again first")
    pool = load_pool(served.pool.root)  # its own copy: training moves the library's tensors
    reporter.line(f"adding task {request.name} ({len(request.classes)} classes) to pool version "
                  f"{served.version} ({pool.pool_id})")
    reporter.phase("data")
    splits = load_splits(data.source, data.path, hierarchy=data.hierarchy, val_per_class=data.val_per_class,
                         seed=data.seed, **data.load_options())
    cfg = default_config(pool)
    overrides = {k: getattr(request, k) for k in ("epochs", "lr", "batch_size") if getattr(request, k) is not None}
    cfg = TrainConfig(**(cfg.to_dict() | overrides | {"seed": request.seed, "precision": request.precision,
                                                       "device": request.device}))

    def progress(update) -> None:
        reporter.phase(update.phase)
        share = (0, 40) if update.phase == "bank" else (40, 95)
        reporter.progress(share[0] + (share[1] - share[0]) * update.fraction, update)

    bundle = work / "pool"
    for leftover in work.glob(f".{bundle.name}.*"):  # left by an attempt killed while writing it
        shutil.rmtree(leftover, ignore_errors=True)
    add_task(pool, bundle, splits, request.name, request.classes, work=work, cfg=cfg, views=request.bank_views,
             others_per_class=request.bank_others_per_class,
             bank_dirs=bank_dirs, progress=progress, say=reporter.line)
    reporter.phase("pool")
    return bundle
