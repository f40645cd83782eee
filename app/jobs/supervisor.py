"""Keeps one child process (the `poe worker` of `poe serve`) running: a child that dies,
however it dies, is started again within seconds; one that keeps dying at once is
started again less often (1, 2, 4, 8 s apart), never more than 8 s later."""

from __future__ import annotations

import logging
import subprocess
import threading
import time

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
HEALTHY_SECONDS = 30.0  # a child that ran this long had no start-up problem: backoff resets


class Supervisor:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.child: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        self.child = subprocess.Popen(self.argv)
        self._thread.start()

    def _watch(self) -> None:
        backoff = 1.0
        started = time.monotonic()
        while not self._stop.wait(CHECK_SECONDS):
            code = self.child.poll()
            if code is None:
                continue
            backoff = 1.0 if time.monotonic() - started > HEALTHY_SECONDS else min(backoff * 2, MAX_BACKOFF_SECONDS)
            wait = 0.0 if self.restarts == 0 else backoff
            log.error("worker process %d exited with code %d; starting a new one in %.0f s",
                      self.child.pid, code, wait)
            if self._stop.wait(wait):
                return
            self.child = subprocess.Popen(self.argv)
            self.restarts += 1
            started = time.monotonic()

    def stop(self, timeout: float = 30) -> None:
        """Stop watching, then stop the child (SIGTERM, SIGKILL after `timeout`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout)
            except subprocess.TimeoutExpired:
                self.child.kill()
