"""Shared fixtures: one tiny synthetic extraction and pool per test session."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from photo_folders import untrained_photo_pool

from poe_core.data import Splits, make_synthetic
from poe_core.extract import ExtractionPlan, run_phase
from poe_core.nets import WRNSpec
from poe_core.pool import Pool, build_pool_from_work
from poe_core.train import TrainConfig

# Tiny test networks gain nothing from a second thread, and lose much when the other
# core is busy (OpenMP threads wait for each other).
torch.set_num_threads(1)


def tiny_plan(epochs: int = 2, **overrides) -> ExtractionPlan:
    cfg = dict(epochs=epochs, batch_size=16, precision="fp32", lr=0.05) | overrides
    return ExtractionPlan(
        oracle_spec=WRNSpec(10, 1, 1), library_spec=WRNSpec(10, 0.5, 0.5),
        expert_spec=WRNSpec(10, 0.5, 0.25),
        oracle_cfg=TrainConfig(**cfg), library_cfg=TrainConfig(**cfg), expert_cfg=TrainConfig(**cfg),
    )


@pytest.fixture(scope="session")
def synthetic() -> Splits:
    return make_synthetic()


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory, synthetic) -> Path:
    work = tmp_path_factory.mktemp("work")
    plan = tiny_plan(epochs=3)
    for phase in ("oracle", "library", "experts"):
        run_phase(phase, work, synthetic, plan)
    return work


@pytest.fixture(scope="session")
def pool(tmp_path_factory, work_dir, synthetic) -> Pool:
    return build_pool_from_work(work_dir, tmp_path_factory.mktemp("pools") / "synthetic", synthetic)


WIDTHS = (0.25, 0.5)


@pytest.fixture(scope="session")
def wide_pool(tmp_path_factory, work_dir, synthetic) -> Pool:
    """The session's oracle and library, experts trained jointly at two widths."""
    work = shutil.copytree(work_dir, tmp_path_factory.mktemp("wide") / "work")
    for name in ("experts.json", "experts.safetensors"):
        (work / name).unlink()
    run_phase("experts", work, synthetic, dataclasses.replace(tiny_plan(epochs=2), expert_widths=WIDTHS))
    return build_pool_from_work(work, work.parent / "pool", synthetic)


@pytest.fixture(scope="session")
def photo_pool_64(tmp_path_factory) -> tuple[Pool, Splits]:
    """An untrained 64x64 pool (WRN, conv1 stride 2) over photos resized to 72 and
    center-cropped, and its splits (tests/photo_folders.py)."""
    return untrained_photo_pool(tmp_path_factory.mktemp("photo-pool-64"))


@pytest.fixture(scope="session")
def photo_pool_128(tmp_path_factory) -> tuple[Pool, Splits]:
    """An untrained 128x128 MobileNetV2 pool over photos resized to 144 and center-cropped."""
    return untrained_photo_pool(tmp_path_factory.mktemp("photo-pool-128"), 128, 144, "mobilenet_v2")


@pytest.fixture(scope="session", params=["photo_pool_64", "photo_pool_128"])
def photo_pool(request) -> tuple[Pool, Splits]:
    """Each untrained photo pool in turn: the WRN at 64x64, the MobileNetV2 at 128x128."""
    return request.getfixturevalue(request.param)


# The service's fixtures (store, API client, worker processes) and the S3 server live in
# modules of their own.
pytest_plugins = ["service_fixtures", "s3_server"]
