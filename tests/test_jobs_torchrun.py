"""POE_TRAIN_NPROC: `poe worker` trains an extraction job under torchrun."""

from __future__ import annotations

import json
import signal

import pytest
from service_fixtures import ADMIN, start_worker, tiny_extraction, wait_for
from typer.testing import CliRunner

from app.jobs.torchrun import extract_args
from app.schemas import ExtractionRequest
from poe_core import cli
from poe_core.recipe import ExtractionOptions

REQUEST_ONLY = {"data", "reuse", "activate"}


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("request_body", [
    tiny_extraction(),
    tiny_extraction(oracle={"arch": {"depth": 16, "kc": 2.5, "ks": 1}, "epochs": 7, "lr": 0.0123456789,
                            "with_val": True, "file": "/data/oracle.onnx", "classes": "/data/classes.txt",
                            "mean": [0.1, 0.2, 0.3], "std": [0.25, 0.5, 0.75]},
                    library={"arch": {"depth": 16, "kc": 1, "ks": 1}, "epochs": 3, "lr": 0.2, "kd": "standardized",
                             "temperature": 2.0},
                    experts={"arch": {"depth": 16, "kc": 1, "ks": 0.5}, "epochs": 4, "lr": 0.01,
                             "widths": [0.25, 0.5, 1.0]},
                    bank_views=3, batch_size=64, schedule="cosine", precision="bf16", device="cuda:1",
                    label_smoothing=0.05, temperature=3.5, alpha=0.7, seed=11,
                    data={"source": "image-folder", "path": "/data/images", "hierarchy": "/data/tasks.json",
                          "val_per_class": 7, "seed": 5, "image_size": 64, "resize": 72}),
    tiny_extraction(oracle={"arch": {"depth": 10, "kc": 1, "ks": 1, "stride": 2}},
                    library={"arch": {"family": "mobilenet_v2", "split": 3, "kc": 0.5, "ks": 1}},
                    experts={"arch": {"family": "mobilenet_v2", "split": 3, "kc": 0.5, "ks": 0.1}}),
], ids=["tiny", "every-option", "families"])
def test_poe_extract_reads_the_arguments_back_as_the_jobs_options(request_body, monkeypatch, tmp_path):
    request = ExtractionRequest.model_validate(request_body)
    seen = {}

    def stop(options, *args, **kwargs):  # `poe extract` has parsed its flags: stop before training
        seen["options"] = options
        raise _Parsed

    def load(data, data_path, hierarchy, val_per_class, seed, download, **size):
        seen["data"] = (data, data_path and str(data_path), hierarchy and str(hierarchy), val_per_class, seed)
        seen["size"] = size
        raise _Parsed

    monkeypatch.setattr(ExtractionOptions, "plan", stop)
    args = extract_args(request, tmp_path / "work", ["library", "experts"])
    result = CliRunner().invoke(cli.app, ["extract", *args])
    assert isinstance(result.exception, _Parsed), result.output
    assert seen["options"] == ExtractionOptions.model_validate(request.model_dump(exclude=REQUEST_ONLY))
    monkeypatch.undo()
    monkeypatch.setattr(cli, "_load", load)
    result = CliRunner().invoke(cli.app, ["extract", *args])
    assert isinstance(result.exception, _Parsed), result.output
    d = request.data
    assert seen["data"] == (d.source, d.path, d.hierarchy, d.val_per_class, d.seed)
    assert seen["size"] == (d.load_options() or {"size": 32, "resize": None})
    assert args[args.index("--phase") + 1] == "library" and args.count("--phase") == 2
    assert "--progress-json" in args


def test_worker_trains_a_job_in_two_torchrun_processes(fresh, tmp_path):
    settings, client, old = fresh
    settings = settings.model_copy(update={"train_nproc": 2})
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction(oracle_epochs=3)).json()
        seen = []

        def finished():
            state = client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()
            seen.append((state["status"], state["progress"], state["phase"]))
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state = wait_for(finished, timeout=240, interval=0.2, what="the torchrun job to finish")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert state["status"] == "succeeded", (state["error"], state["log"])
    assert any("under torchrun in 2 processes" in line for line in state["log"])
    assert any("oracle epoch 3/3" in line for line in state["log"])
    assert sum("finished under torchrun" in line for line in state["log"]) == 3
    assert len({progress for status, progress, _ in seen if status == "running"}) >= 3
    work = settings.work_dir / f"job-{job['id']}"
    for phase in ("oracle", "library", "experts"):
        assert json.loads((work / f"{phase}.json").read_text())["processes"] == 2
    tasks = client.get("/tasks").json()
    assert tasks["pool_version"] == state["pool_version"] > old
    assert client.post("/models", json={"tasks": ["task0", "task1"]}).status_code == 200
