"""An extraction job's training phases under torchrun, when POE_TRAIN_NPROC > 1 (a
worker on a host with several GPUs: one process per GPU; see poe_core.distributed).

The worker spawns `poe extract` with the job's options under torchrun, in the job's work
directory, and reads its `--progress-json` lines for the job's progress; it stops it
(SIGTERM, which torchrun passes on to its processes) when the job is cancelled, taken
away or the worker is told to stop, and the job then resumes from the checkpoints, in
any number of processes. torchrun's own output and the ranks' logs go to
`torchrun.log` in the work directory. The pool is built by the worker as without torchrun.
"""

from __future__ import annotations

import ctypes
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from app.schemas import ExtractionRequest
from poe_core.distributed import torchrun_command
from poe_core.extract import phase_info
from poe_core.recipe import Progress

log = logging.getLogger(__name__)

STOP_SECONDS = 60  # after SIGTERM, before SIGKILL: a rank may be writing a checkpoint
_PROGRESS_FIELDS = {f.name for f in fields(Progress)}


def extract_args(request: ExtractionRequest, work: Path, phases: Sequence[str]) -> list[str]:
    """The `poe extract` arguments that train `phases` of this request in `work`, as the
    worker would in its own process (tests/test_jobs_torchrun.py checks that `poe
    extract` reads them back as the request's options)."""
    data, o, lib, exp = request.data, request.oracle, request.library, request.experts
    args = ["--work", str(work), "--data", data.source, "--val-per-class", str(data.val_per_class),
            "--split-seed", str(data.seed), "--progress-json"]
    if data.path is not None:
        args += ["--data-path", data.path]
    if data.hierarchy is not None:
        args += ["--hierarchy", data.hierarchy]
    sizes = data.load_options()
    if sizes:
        args += ["--image-size", str(sizes["size"])] + (["--resize", str(sizes["resize"])] if sizes["resize"] else [])
    for phase in phases:
        args += ["--phase", phase]
    args += ["--oracle-arch", o.arch.text(), "--oracle-epochs", str(o.epochs), "--oracle-lr", repr(o.lr),
             "--oracle-with-val" if o.with_val else "--no-oracle-with-val"]
    if o.file is not None:
        args += ["--oracle", o.file]
    if o.classes is not None:
        args += ["--oracle-classes", o.classes]
    for flag, triple in (("--oracle-mean", o.mean), ("--oracle-std", o.std)):
        if triple is not None:
            args += [flag, ",".join(map(repr, triple))]
    args += ["--library-arch", lib.arch.text(), "--library-epochs", str(lib.epochs), "--library-lr", repr(lib.lr),
             "--library-kd", lib.kd, *(["--library-temperature", repr(lib.temperature)] if lib.temperature else []),
             "--expert-arch", exp.arch.text(), "--expert-epochs", str(exp.epochs), "--expert-lr", repr(exp.lr)]
    if exp.widths is not None:
        args += ["--expert-widths", ",".join(map(repr, exp.widths))]
    for task in request.tasks or []:
        args += ["--task", task]
    return args + ["--bank-views", str(request.bank_views), "--batch-size", str(request.batch_size),
                   "--schedule", request.schedule, "--precision", request.precision, "--device", request.device,
                   "--label-smoothing", repr(request.label_smoothing), "--temperature", repr(request.temperature),
                   "--alpha", repr(request.alpha), "--seed", str(request.seed)]


def _die_with_worker() -> None:
    """In the child, before exec: SIGTERM when the worker dies, however it dies, so no
    torchrun outlives it and races the job's next attempt for the work directory."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _progress(line: str) -> Progress | None:
    try:
        report = json.loads(line)
        return Progress(**{k: v for k, v in report.items() if k in _PROGRESS_FIELDS})
    except (ValueError, TypeError):
        return None


def train_under_torchrun(nproc: int, request: ExtractionRequest, work: Path, phases: Sequence[str],
                         trained: Sequence[str], reporter) -> None:
    """Train `phases` (those of `trained` left to do) in `nproc` processes; report their
    progress, on the scale of all the `trained` phases, as run_extraction does."""
    argv = torchrun_command(nproc, extract_args(request, work, phases))
    reporter.line(f"training {', '.join(phases)} under torchrun in {nproc} processes")
    with open(work / "torchrun.log", "ab") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=out, text=True,
                                preexec_fn=_die_with_worker if sys.platform == "linux" else None)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for text in proc.stdout:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, name="torchrun-progress", daemon=True).start()
    current = None
    try:
        while True:
            try:
                text = lines.get(timeout=1.0)
            except queue.Empty:
                reporter.check()  # cancelled, stopping or lost while no progress comes (data loading, the bank)
                continue
            if text is None:
                break
            update = _progress(text)
            if update is None:
                continue
            # Reports of work inside a phase (filling the logit bank: "bank") count for that phase.
            if update.phase in trained and update.phase != current:
                _finished(work, current, reporter)
                current = update.phase
                reporter.phase(current)
            if current is not None:
                reporter.progress(95 * (trained.index(current) + update.fraction) / len(trained), update)
    except BaseException:
        _stop(proc)
        raise
    code = proc.wait()
    if code != 0:
        tail = (work / "torchrun.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"torchrun exited with code {code}: {tail[0]} (see torchrun.log in the job's "
                           "work directory)")
    _finished(work, current, reporter)


def _finished(work: Path, phase: str | None, reporter) -> None:
    if phase is None:
        return
    info = phase_info(work, phase)
    accs = list(info["val_acc"].values())
    reporter.line(f"{phase}: finished under torchrun, validation accuracy {sum(accs) / len(accs):.2%} "
                  f"({info['seconds']:.0f} s)")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("torchrun %d did not stop within %d s of SIGTERM; killing it", proc.pid, STOP_SECONDS)
        proc.kill()
        proc.wait()
