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


def test_manifest_records_every_phase_and_no_oracle_weights(shipped):
    training = shipped.manifest["training"]
    assert {"oracle", "library", "experts"} <= set(training)
    assert all(training[p]["seconds"] > 0 and training[p]["epochs"] > 0 for p in ("oracle", "library", "experts"))
    assert not any("oracle" in f for f in shipped.manifest["files"])


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


def test_format_2_pool_serves_classes_and_reject_but_says_why_not_mask_or_budgets(shipped):
    from poe_core.formats import Unavailable

    q = shipped.query(classes=["bicycle", "woman"])
    assert q.tasks == ("vehicles_1", "people")
    assert Assembler(shipped).assemble(q, reject=shipped.reject_rule(q)).labels == ("bicycle", "woman")
    with pytest.raises(Unavailable, match="keeps no library student head"):
        shipped.query(["people"], method="mask")
    assert "one width (ks = 0.25)" in shipped.unavailable("widths")
