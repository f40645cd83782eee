"""The extraction recipe: one source of defaults, one mapping from options to a plan."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from poe_core.bank import ViewRecipe
from poe_core.recipe import ExtractionOptions, ExtractionPlan


def test_default_options_are_the_default_plan():
    assert ExtractionOptions().plan() == ExtractionPlan()


def test_options_map_every_field_into_the_plan():
    options = ExtractionOptions.model_validate({
        "oracle": {"file": "models/theirs.onnx", "classes": "models/classes.txt", "mean": [0.5, 0.5, 0.5],
                   "std": [0.25, 0.25, 0.25]},
        "library": {"epochs": 40, "lr": 0.2, "kd": "standardized", "temperature": 2},
        "experts": {"arch": {"depth": 16, "kc": 1, "ks": 0.5}, "widths": [0.25, 0.5, 1], "epochs": 30},
        "tasks": ["people", "trees"], "bank_views": 4, "precision": "fp32", "seed": 3,
    })
    plan = options.plan(resolve=lambda name: Path("/data") / name)
    assert plan.oracle.path == Path("/data/models/theirs.onnx") and plan.oracle.kind == "onnx"
    assert plan.oracle.classes == Path("/data/models/classes.txt") and plan.oracle.std == (0.25, 0.25, 0.25)
    assert (plan.library_cfg.epochs, plan.library_cfg.lr, plan.library_cfg.kd) == (40, 0.2, "standardized")
    assert (plan.library_cfg.temperature, plan.expert_cfg.temperature) == (2, 4)  # CKD keeps the shared one
    assert plan.expert_spec.ks == 0.5 and plan.widths == [0.25, 0.5, 1.0] and plan.expert_cfg.epochs == 30
    assert plan.bank == ViewRecipe(4, seed=3) and plan.tasks == ["people", "trees"]
    assert {plan.oracle_cfg.precision, plan.library_cfg.precision, plan.expert_cfg.precision} == {"fp32"}
    assert ExtractionOptions(bank_views=0).plan().bank is None


@pytest.mark.parametrize("body, message", [
    ({"oracle": {"arch": {"depth": 15, "kc": 1, "ks": 1}}}, "6n\\+4"),
    ({"oracle": {"classes": "c.txt"}}, "give its file too"),
    ({"oracle": {"file": "o.onnx", "std": [1, 0, 1]}}, "above 0"),
    ({"oracle": {"file": "o.onnx"}, "bank_views": 0}, "logit bank"),
    ({"oracle": {"file": "bad\x00.onnx"}}, "pattern"),
    ({"library": {"kd": "dkd"}}, "kd"),
    ({"library": {"temperature": 0}}, "greater than 0"),
    ({"experts": {"widths": []}}, "at least 1"),
    ({"precision": "int4"}, "precision"),
    ({"bank_views": 65}, "less than or equal"),
    ({"epochs": 3}, "Extra inputs"),
])
def test_bad_options_are_refused_with_the_reason(body, message):
    with pytest.raises(ValidationError, match=message):
        ExtractionOptions.model_validate(body)
