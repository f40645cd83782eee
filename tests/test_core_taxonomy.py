import json

import pytest

from poe_core.taxonomy import TaskError, Taxonomy, cifar100


def test_cifar100_has_twenty_superclasses_of_five_classes():
    tax = cifar100()
    assert len(tax.classes) == 100
    assert len(tax.tasks) == 20
    assert all(len(members) == 5 for members in tax.tasks.values())
    assert tax.class_names("people") == ["baby", "boy", "girl", "man", "woman"]
    assert set(tax.class_names("vehicles_1")) == {"bicycle", "bus", "motorcycle", "pickup_truck", "train"}


def test_composite_classes_follow_request_order():
    tax = cifar100()
    assert tax.composite_classes(["vehicles_1", "people"])[:5] == list(tax.tasks["vehicles_1"])
    assert tax.composite_classes(["vehicles_1", "people"])[5:] == list(tax.tasks["people"])


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([], "empty"),
        (["people", "robots"], "unknown primitive task(s): 'robots'; valid tasks: aquatic_mammals"),
        (["people", "people"], "more than once: people"),
        ("people", "not one string"),
    ],
)
def test_validation_errors_are_precise(tasks, message):
    with pytest.raises(TaskError, match=None) as err:
        cifar100().validate(tasks)
    assert message in str(err.value)


def test_custom_hierarchy_from_json(tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"pets": ["cat", "dog"], "cars": ["sedan", "truck", "van"]}))
    tax = Taxonomy.from_json(path)
    assert tax.classes == ("cat", "dog", "sedan", "truck", "van")
    assert tax.tasks == {"pets": (0, 1), "cars": (2, 3, 4)}


def test_tasks_may_share_classes_but_a_composite_task_may_not():
    tax = Taxonomy(("a", "b", "c"), {"x": (0, 1), "y": (1,), "z": (2,)})
    assert tax.owners(1) == ["x", "y"] and tax.owner(1) == "x"
    tax.check_disjoint(["x", "z"])
    with pytest.raises(TaskError, match="'x' and 'y' share class 'b'"):
        tax.check_disjoint(["x", "y"])
    with pytest.raises(ValueError, match="twice"):
        Taxonomy(("a", "b"), {"x": (0, 1, 1)})


def test_bad_hierarchy_json_is_a_clear_error(tmp_path):
    path = tmp_path / "h.json"
    path.write_text('{"pets": "cat"}')
    with pytest.raises(ValueError, match="expected an object"):
        Taxonomy.from_json(path)


def test_class_indices_in_the_order_given_and_their_owners():
    tax = cifar100()
    assert tax.class_indices(["woman", "bicycle"]) == [98, 8]
    assert [tax.owner(c) for c in tax.class_indices(["woman", "bicycle"])] == ["people", "vehicles_1"]
    with pytest.raises(TaskError, match="unknown class.*'zebra'"):
        tax.class_indices(["woman", "zebra"])
    assert tax.subset(["people"]).owner(8) is None
