"""Extraction jobs: running one in a worker (app.jobs.admission checked it first).

Reusing an oracle (and library) copies the phases from the work directory of the
extraction that made the active pool.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from app.jobs.admission import resolve_data_path
from app.jobs.torchrun import train_under_torchrun
from app.schemas import ExtractionRequest
from poe_core.data import load_splits
from poe_core.extract import PHASES, phase_done, run_phase
from poe_core.pool import build_pool_from_work
from poe_core.train import Progress

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def phase(self, name: str) -> None: ...
    def progress(self, percent: float, update: Progress) -> None: ...
    def line(self, text: str) -> None: ...
    def check(self) -> None: ...  # raises to stop the job (cancelled, worker stopping)


def _copy_phase(source: Path, work: Path, phase: str) -> None:
    for name in (f"{phase}.safetensors", f"{phase}.json"):
        target = work / name
        if not target.exists():
            try:
                os.link(source / name, target)
            except OSError:
                shutil.copyfile(source / name, target)


def run_extraction(stored: dict, work: Path, roots: Sequence[Path], reporter: Reporter, nproc: int = 1) -> Path:
    """Run (or resume) the phases of a stored request in `work`; return the pool bundle.
    With `nproc` > 1 the phases train under torchrun in that many processes."""
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
                         val_per_class=data.val_per_class, seed=data.seed, **data.load_options())
    plan = request.plan()  # the oracle's file names were resolved when the job was admitted
    trained = [p for p in PHASES if not reuse or p not in reuse["phases"]]
    todo = [p for p in trained if not phase_done(work, p)]
    if nproc > 1 and todo:
        train_under_torchrun(nproc, request, work, todo, trained, reporter)
    else:
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
    # build_pool_from_work writes into a temporary ".pool.*" sibling renamed into place:
    # one left by an attempt killed in this phase is garbage now.
    for leftover in work.glob(f".{bundle.name}.*"):
        log.info("removing %s, left by an interrupted attempt", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    build_pool_from_work(work, bundle, splits, progress=reporter.line)
    return bundle
