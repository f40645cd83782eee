"""The extraction job's pool phase after a crash: what a killed attempt left is removed."""

import shutil
import subprocess
import sys
import time

from service_fixtures import Lines

from app.jobs.extraction import run_extraction
from poe_core.pool import load_pool

BUILD = """
import sys
from pathlib import Path
from poe_core.build import build_pool_from_work
from poe_core.data import make_synthetic
work = Path(sys.argv[1])
build_pool_from_work(work, work / "pool", make_synthetic())
"""


def test_a_pool_build_killed_midway_leaves_nothing_behind(work_dir, tmp_path):
    work = shutil.copytree(work_dir, tmp_path / "work")
    build = subprocess.Popen([sys.executable, "-c", BUILD, str(work)])
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob(".pool.*")) and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        build.kill()  # SIGKILL, mid-build: no cleanup code of its own runs
    finally:
        build.wait()
    leftovers = list(work.glob(".pool.*"))
    assert leftovers and not (work / "pool").exists(), "the build finished before it could be killed"

    reporter = Lines()
    bundle = run_extraction({"data": {"source": "synthetic"}}, work, [], reporter)
    assert not any(p.exists() for p in leftovers) and not list(work.glob(".pool.*"))
    pool = load_pool(bundle)  # verifies every file's sha256
    assert pool.tasks == ["task0", "task1", "task2"]
