"""The CIFAR-100 pool shipped inside the package: intact, paper-sized, trained."""

from importlib.resources import files
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from poe_core.assemble import Assembler
from poe_core.pool import load_pool
from poe_core.taxonomy import CIFAR100_SUPERCLASSES

SHIPPED = Path(str(files("poe_core") / "pools" / "cifar100"))
pytestmark = pytest.mark.skipif(not SHIPPED.is_dir(), reason="this checkout ships no CIFAR-100 pool")


@pytest.fixture(scope="module")
def shipped():
    return load_pool(SHIPPED)  # verifies the sha256 of every file


def test_every_superclass_has_an_expert(shipped):
    assert shipped.tasks == list(CIFAR100_SUPERCLASSES)
    assert all(len(shipped.taxonomy.tasks[t]) == 5 for t in shipped.tasks)


def test_sizes_are_the_papers(shipped):
    assert round(shipped.composite_params(["people"]) / 1e6, 2) == 0.06
    assert round(shipped.composite_params(shipped.tasks[:5]) / 1e6, 2) == 0.10


def test_manifest_records_every_phase_and_keeps_the_oracle_out_of_every_delivered_model(shipped):
    training = shipped.manifest["training"]
    assert {"oracle", "library", "experts"} <= set(training)
    assert all(training[p]["seconds"] > 0 and training[p]["epochs"] > 0 for p in ("oracle", "library", "experts"))
    kept = shipped.spec.oracle
    assert kept is not None and kept.weights in shipped.manifest["files"]
    # What the service assembles from: the library, the experts, the student head; never the oracle.
    assert not any("oracle" in part for part in Assembler(shipped).fragments("fp32"))


def test_the_kept_oracle_loads_and_is_the_papers_kind(shipped):
    from poe_core.extend import kept_oracle

    oracle = kept_oracle(shipped, torch.device("cpu"))
    assert oracle.module is not None and (oracle.mean, oracle.std) == (tuple(shipped.mean), tuple(shipped.std))
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    assert oracle.logits(x).shape == (2, 100)
    assert sum(p.numel() for p in oracle.module.parameters()) > 10 * shipped.composite_params(shipped.tasks[:1])


def test_assembled_model_equals_pytorch_and_is_trained(shipped):
    tasks = ["people", "vehicles_1"]
    model = Assembler(shipped).assemble(tasks)
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(model.data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = shipped.branched_model(tasks)(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-4
    # Chance is 10% on 10 classes; a trained pool is far above it.
    assert shipped.composite_accuracy(tasks) > 0.6


def test_shipped_pool_serves_classes_reject_mask_and_budgets(shipped):
    from poe_core.budget import Budget, BudgetError, fit_budget

    asm = Assembler(shipped)
    q = shipped.query(classes=["bicycle", "woman"])
    assert q.tasks == ("vehicles_1", "people")
    assert asm.assemble(q, reject=shipped.reject_rule(q)).labels == ("bicycle", "woman")
    assert shipped.unavailable("mask") is None and shipped.unavailable("widths") is None
    assert len(shipped.widths) >= 2
    mask = shipped.query(["people", "vehicles_1"], method="mask")
    x = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(asm.assemble(mask).data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert got.shape == (4, 10)
    # The mask baseline is the whole student: more parameters than two paper-sized experts.
    assert shipped.params(mask) > shipped.params(shipped.query(["people", "vehicles_1"]))
    q = shipped.query(["people", "vehicles_1", "trees"])
    smallest = shipped.params(q)  # the default width is the smallest
    assert fit_budget(asm, q, Budget(max_params=smallest)).query.widths == (shipped.widths[0],) * 3
    with pytest.raises(BudgetError, match="smallest possible"):
        fit_budget(asm, q, Budget(max_params=smallest - 1))
