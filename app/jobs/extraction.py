"""Extraction jobs: checking a request against this deployment, and running one.

A job's data set must lie under one of POE_DATA_ROOTS (symbolic links resolved), so an
admin request cannot make the worker read arbitrary files. Reusing an oracle (and
library) needs the work directory of the extraction that made the active pool: pools
imported from bundles carry no oracle.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session

from app.schemas import ExtractionRequest, PhaseOptions
from app.store.pools import active_version
from app.store.tables import PoolVersion
from poe_core.data import load_splits, make_synthetic
from poe_core.extract import PHASES, ExtractionPlan, phase_done, run_phase
from poe_core.nets import WRNSpec
from poe_core.pool import build_pool_from_work
from poe_core.taxonomy import Taxonomy, cifar100
from poe_core.train import Progress, TrainConfig

log = logging.getLogger(__name__)

REUSED_PHASES = {"none": (), "oracle": ("oracle",), "library": ("oracle", "library")}


class ExtractionRejected(ValueError):
    """A request this deployment cannot run; the message is meant for the admin."""


class ReuseUnavailable(Exception):
    """The active pool has no oracle/library to reuse."""


def resolve_data_path(path: str, roots: Sequence[Path], what: str = "data path") -> Path:
    """`path` (absolute, or relative to a data root) resolved inside an allowed root."""
    given = Path(path)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            continue
        if resolved.exists():
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise ExtractionRejected(f"{what} {path!r} is not an existing file or directory under the allowed "
                             f"data roots ({allowed}); set POE_DATA_ROOTS to allow more")


def _taxonomy(data: dict) -> Taxonomy:
    if data["source"] == "synthetic":
        return make_synthetic(seed=data["seed"]).taxonomy
    if data["source"] == "image-folder":
        return Taxonomy.from_json(data["hierarchy"])
    return cifar100()


def prepare(session: Session, request: ExtractionRequest, roots: Sequence[Path]) -> dict:
    """Check a request and return what the job row stores: the request with resolved
    paths and, when reusing, where the reused phases come from."""
    body = request.model_dump()
    data = body["data"]
    if data["source"] == "synthetic":
        data["path"] = data["hierarchy"] = None
    else:
        if not data["path"]:
            raise ExtractionRejected(f"data source {data['source']} needs a path")
        data["path"] = str(resolve_data_path(data["path"], roots))
        if data["source"] == "image-folder":
            if not data["hierarchy"]:
                raise ExtractionRejected("image-folder needs a hierarchy JSON (task name -> class names)")
            data["hierarchy"] = str(resolve_data_path(data["hierarchy"], roots, "hierarchy"))
    try:
        taxonomy = _taxonomy(data)
        if request.tasks is not None:
            body["tasks"] = taxonomy.validate(request.tasks)
    except ValueError as e:  # a bad hierarchy file, unknown or repeated tasks
        raise ExtractionRejected(str(e)) from None
    reused = REUSED_PHASES[request.reuse]
    if reused:
        body["reuse_from"] = _reuse_source(session, reused, taxonomy)
    return body


def _reuse_source(session: Session, phases: Sequence[str], taxonomy: Taxonomy) -> dict:
    version = active_version(session)
    if version is None:
        raise ReuseUnavailable("there is no active pool to reuse an oracle from; use reuse=none")
    pool = session.get(PoolVersion, version)
    work = Path(pool.work_dir) if pool.work_dir else None
    missing = [p for p in phases if work is None or not phase_done(work, p)]
    if missing:
        origin = "was imported from a bundle, which carries no oracle" if work is None else \
            f"has lost its work directory {work}"
        raise ReuseUnavailable(f"the active pool (version {version}) {origin}: its "
                               f"{' and '.join(missing)} cannot be reused; use reuse=none")
    if list(pool.manifest["taxonomy"]["classes"]) != list(taxonomy.classes):
        raise ReuseUnavailable(f"the active pool (version {version}) was trained on other classes "
                               "than this data set's; use reuse=none")
    return {"pool_version": version, "work_dir": str(work), "phases": list(phases)}


class Reporter(Protocol):
    def phase(self, name: str) -> None: ...
    def progress(self, percent: float, update: Progress) -> None: ...
    def line(self, text: str) -> None: ...


def _config(request: ExtractionRequest, options: PhaseOptions, **extra) -> TrainConfig:
    return TrainConfig(epochs=options.epochs, lr=options.lr, batch_size=request.batch_size,
                       temperature=request.temperature, alpha=request.alpha, seed=request.seed,
                       device=request.device, precision=request.precision, **extra)


def plan_of(request: ExtractionRequest) -> ExtractionPlan:
    def spec(options: PhaseOptions) -> WRNSpec:
        return WRNSpec(options.arch.depth, options.arch.kc, options.arch.ks)

    return ExtractionPlan(
        spec(request.oracle), spec(request.library), spec(request.experts),
        _config(request, request.oracle, label_smoothing=request.label_smoothing),
        _config(request, request.library), _config(request, request.experts), request.tasks,
    )


def _copy_phase(source: Path, work: Path, phase: str) -> None:
    for name in (f"{phase}.safetensors", f"{phase}.json"):
        target = work / name
        if not target.exists():
            try:
                os.link(source / name, target)
            except OSError:
                shutil.copyfile(source / name, target)


def run_extraction(stored: dict, work: Path, roots: Sequence[Path], reporter: Reporter) -> Path:
    """Run (or resume) the phases of a stored request in `work`; return the pool bundle."""
    request = ExtractionRequest.model_validate({k: v for k, v in stored.items() if k != "reuse_from"})
    data = request.data
    for path, what in ((data.path, "data path"), (data.hierarchy, "hierarchy")):
        if path is not None:
            resolve_data_path(path, roots, what)
    work.mkdir(parents=True, exist_ok=True)
    reuse = stored.get("reuse_from")
    if reuse:
        for phase in reuse["phases"]:
            _copy_phase(Path(reuse["work_dir"]), work, phase)
        reporter.line(f"reusing {', '.join(reuse['phases'])} of pool version {reuse['pool_version']}")
    reporter.line(f"loading data set {data.source}" + (f" from {data.path}" if data.path else ""))
    splits = load_splits(data.source, data.path, hierarchy=data.hierarchy,
                         val_per_class=data.val_per_class, seed=data.seed)
    plan = plan_of(request)
    trained = [p for p in PHASES if not reuse or p not in reuse["phases"]]
    for i, phase in enumerate(trained):
        reporter.phase(phase)
        if phase_done(work, phase):
            continue
        info = run_phase(phase, work, splits, plan,
                         lambda p, i=i: reporter.progress(95 * (i + p.fraction) / len(trained), p))
        accs = list(info["val_acc"].values())
        reporter.line(f"{phase}: finished, validation accuracy {sum(accs) / len(accs):.2%} "
                      f"({info['seconds']:.0f} s)")
    reporter.phase("pool")
    bundle = work / "pool"
    build_pool_from_work(work, bundle, splits, progress=reporter.line)
    return bundle
