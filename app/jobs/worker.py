"""`poe worker`: claims extraction jobs and runs them, one at a time.

While a job runs, a heartbeat thread stamps its row every POE_HEARTBEAT_SECONDS and
picks up cancel requests; the training progress callback raises to stop training when
the job is cancelled, when the worker is told to stop (SIGTERM/SIGINT: the job is
queued again and resumes from its checkpoint) or when the job was taken away. Each
poll also recovers jobs whose worker died (stale heartbeat).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy import select

from app.jobs import queue
from app.jobs.custom_task import KIND as ADD_TASK
from app.jobs.custom_task import run_add_task
from app.jobs.extraction import run_extraction
from app.logs import JOB_ID
from app.services import Services
from app.store.pools import import_pool
from app.store.tables import Job, PoolVersion
from poe_core.train import Progress

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """Raised from the progress callback to stop training; `status` is where the job goes."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class JobRun:
    """The reporter of one running job: persists progress and log lines (throttled),
    heartbeats from a thread, and turns cancel/stop/loss into JobInterrupted."""

    def __init__(self, worker: Worker, job: Job) -> None:
        self.worker = worker
        self.job_id = job.id
        self.db = worker.services.db
        self.name = worker.name
        self.cancelled = False
        self.lost = False
        self._last_write = 0.0
        self._done = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> JobRun:
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._beat.join()

    def _heartbeat(self) -> None:
        while not self._done.wait(self.worker.services.settings.heartbeat_seconds):
            try:
                queue.alive(self.db, self.name)
                self.cancelled = queue.heartbeat(self.db, self.job_id, self.name) or self.cancelled
            except queue.JobLost:
                self.lost = True
            except Exception:
                log.exception("job %d: heartbeat failed", self.job_id)

    def check(self) -> None:
        if self.lost:
            raise JobInterrupted("lost", "this worker no longer owns the job")
        if self.cancelled:
            raise JobInterrupted("cancelled", "cancelled on request")
        if self.worker.stopping.is_set():
            raise JobInterrupted("queued", f"worker {self.name} stopped; job queued again to resume")

    def phase(self, name: str) -> None:
        self.check()
        queue.report(self.db, self.job_id, self.name, phase=name, lines=[f"phase {name}"])

    def progress(self, percent: float, update: Progress) -> None:
        self.check()
        now = time.monotonic()
        line = None
        if update.val_acc is not None:
            line = (f"{update.phase} epoch {update.epoch}/{update.epochs}: loss {update.loss:.4f}, "
                    f"validation {update.val_acc:.2%}")
        if line or now - self._last_write >= 1.0:
            self._last_write = now
            queue.report(self.db, self.job_id, self.name, progress=percent, lines=[line] if line else [])

    def line(self, text: str) -> None:
        queue.report(self.db, self.job_id, self.name, lines=[text])


class Worker:
    def __init__(self, services: Services, parent_pid: int | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.parent_pid = parent_pid
        self.stopping = threading.Event()

    def install_signal_handlers(self) -> None:
        def stop(signum, _frame):
            log.info("worker %s: %s received, stopping", self.name, signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def run(self, *, once: bool = False) -> None:
        """Poll for jobs until stopped (or, with `once`, until the queue is empty)."""
        log.info("worker %s polling %s", self.name, self.settings.db_url.split("@")[-1])
        while not self.stopping.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.info("worker %s: parent %d is gone, stopping", self.name, self.parent_pid)
                return
            worked = self.poll()
            if once and not worked:
                return
            if not worked:
                self.stopping.wait(self.settings.worker_poll_seconds)

    def poll(self) -> bool:
        """Say this worker is alive, recover stale jobs, then run one queued job if there is one."""
        queue.alive(self.services.db, self.name)
        queue.recover_stale(self.services.db, self.settings.stale_seconds, self.settings.job_max_attempts)
        job = queue.claim(self.services.db, self.name)
        if job is None:
            return False
        token = JOB_ID.set(job.id)  # every line logged while it runs says which job
        try:
            self.run_job(job)
        finally:
            JOB_ID.reset(token)
        return True

    def run_job(self, job: Job) -> None:
        log.info("job %d: attempt %d on %s", job.id, job.attempts, self.name)
        work = self.settings.work_dir / f"job-{job.id}"
        db = self.services.db
        try:
            with JobRun(self, job) as run:
                version = self._imported(job.id)
                if version is None:
                    if job.kind == ADD_TASK:
                        bundle, work_dir = self._add_task(job, work, run)
                    else:
                        bundle = run_extraction(job.request, work, self.settings.allowed_data_roots, run,
                                                nproc=self.settings.train_nproc)
                        work_dir = str(work.resolve())
                    run.check()
                    version = import_pool(db, self.services.blobs, bundle, source=f"job {job.id}",
                                          job_id=job.id, work_dir=work_dir,
                                          activate=job.request.get("activate", True))
                    shutil.rmtree(bundle, ignore_errors=True)
            self._finish(job.id, "succeeded", pool_version=version,
                         line=f"pool version {version} imported"
                              + (" and activated" if job.request.get("activate", True) else ""))
        except JobInterrupted as e:
            log.info("job %d: %s", job.id, e)
            if e.status != "lost":
                self._finish(job.id, e.status, line=str(e))
            if e.status == "cancelled":
                shutil.rmtree(work, ignore_errors=True)
        except Exception as e:
            log.exception("job %d failed", job.id)
            self._finish(job.id, "failed", error=f"{type(e).__name__}: {e}",
                         line=traceback.format_exc(limit=5).strip().splitlines()[-1])

    def _add_task(self, job: Job, work: Path, run: JobRun) -> tuple[Path, str | None]:
        """Run a custom-task job; the new version keeps its parent's work directory (its
        oracle and library), and logit banks are looked for there and in other jobs'."""
        with self.services.db.session() as session:
            parent = session.get(PoolVersion, job.request["pool_version"]).work_dir
        others = sorted(p for p in self.settings.work_dir.glob("job-*") if p != work)
        bank_dirs = [Path(parent)] + others if parent else others
        bundle = run_add_task(job.request, work, self.services.pools, bank_dirs,
                              self.settings.allowed_data_roots, run)
        return bundle, parent

    def _imported(self, job_id: int) -> int | None:
        """The pool version an earlier attempt imported, if its worker died right after."""
        with self.services.db.session() as session:
            return session.scalar(select(PoolVersion.version).where(PoolVersion.job_id == job_id))

    def _finish(self, job_id: int, status: str, **kwargs) -> None:
        try:
            queue.finish(self.services.db, job_id, self.name, status, **kwargs)
        except queue.JobLost:
            log.warning("job %d was taken from this worker before it could be marked %s", job_id, status)

