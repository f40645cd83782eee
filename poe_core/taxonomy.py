"""Classes and primitive tasks, and the validation of composite tasks.

A primitive task H_i is a named group of classes; a composite task Q is a list of
primitive tasks. CIFAR-100's 20 superclasses are the built-in primitive tasks; an
ImageFolder's come from a hierarchy JSON, of class names or of WordNet ids (the
Tiny-ImageNet layout, `folder_taxonomy`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CIFAR100_CLASSES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed',
    'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle',
    'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock', 'cloud',
    'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur',
    'dolphin', 'elephant', 'flatfish', 'forest', 'fox', 'girl',
    'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower',
    'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree',
    'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange',
    'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree',
    'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit',
    'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea',
    'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail',
    'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper',
    'table', 'tank', 'telephone', 'television', 'tiger', 'tractor',
    'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale',
    'willow_tree', 'wolf', 'woman', 'worm',
)

CIFAR100_SUPERCLASSES = (
    'aquatic_mammals', 'fish', 'flowers',
    'food_containers', 'fruit_and_vegetables', 'household_electrical_devices',
    'household_furniture', 'insects', 'large_carnivores',
    'large_man-made_outdoor_things', 'large_natural_outdoor_scenes', 'large_omnivores_and_herbivores',
    'medium_mammals', 'non-insect_invertebrates', 'people',
    'reptiles', 'small_mammals', 'trees',
    'vehicles_1', 'vehicles_2',
)

# CIFAR100_SUPERCLASSES index of every class in CIFAR100_CLASSES (the coarse labels).
CIFAR100_FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)


class TaskError(ValueError):
    """A composite task that cannot be served; the message is meant for the user."""


@dataclass(frozen=True)
class Taxonomy:
    """Ordered class names and the primitive tasks over them.

    `tasks` maps a task name to the indices (into `classes`) of its classes, in the
    order the task's expert emits its logits.
    """

    classes: tuple[str, ...]
    tasks: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        # Primitive tasks may share classes (a custom task regroups classes of others, see
        # poe_core.extend); the tasks of one composite task may not (`check_disjoint`).
        if not self.tasks:
            raise ValueError("a taxonomy needs at least one primitive task")
        for name, members in self.tasks.items():
            if not members:
                raise ValueError(f"primitive task {name!r} has no classes")
            if len(set(members)) != len(members):
                raise ValueError(f"primitive task {name!r} names a class twice")
            for c in members:
                if not 0 <= c < len(self.classes):
                    raise ValueError(f"primitive task {name!r} names class index {c}")

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def class_names(self, task: str) -> list[str]:
        return [self.classes[c] for c in self.tasks[task]]

    def validate(self, names: Iterable[str]) -> list[str]:
        """Check a composite task and return it as a list; raise TaskError if it is bad."""
        if isinstance(names, str):
            raise TaskError("tasks must be a list of primitive task names, not one string")
        names = list(names)
        if not names:
            raise TaskError("the task list is empty: name at least one primitive task")
        if self.tasks.keys() >= set(names) and len(set(names)) == len(names):  # the usual case, at a glance
            return names
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise TaskError(
                f"unknown primitive task(s): {', '.join(map(repr, unknown))}; "
                f"valid tasks: {', '.join(self.tasks)}"
            )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TaskError(f"primitive task(s) listed more than once: {', '.join(duplicates)}")
        return names

    def check_disjoint(self, names: Iterable[str]) -> None:
        """Raise TaskError if two of the named (valid) tasks share a class: a composite
        model outputs each class once."""
        names = list(names)
        classes = [self.tasks[name] for name in names]
        if len(set().union(*classes)) == sum(map(len, classes)):  # the usual case, at a glance
            return
        seen: dict[int, str] = {}
        for name in names:
            for c in self.tasks[name]:
                if c in seen:
                    raise TaskError(f"primitive tasks {seen[c]!r} and {name!r} share class {self.classes[c]!r}: "
                                    "the tasks of a composite task must not overlap")
                seen[c] = name

    def class_indices(self, names: Iterable[str]) -> list[int]:
        """Indices of named classes, in the order given; raise TaskError naming the unknown."""
        if isinstance(names, str):
            raise TaskError("classes must be a list of class names, not one string")
        names = list(names)
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise TaskError(f"unknown class(es): {', '.join(map(repr, unknown))}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TaskError(f"class(es) listed more than once: {', '.join(duplicates)}")
        return [index[n] for n in names]

    def owners(self, class_index: int) -> list[str]:
        """The primitive tasks that hold a class, in the taxonomy's order."""
        return [t for t, members in self.tasks.items() if class_index in members]

    def owner(self, class_index: int) -> str | None:
        """The first primitive task that holds a class, if any."""
        return next(iter(self.owners(class_index)), None)

    def composite_classes(self, names: Iterable[str]) -> list[int]:
        """Class indices of a composite task, in the order of its concatenated logits."""
        return [c for n in names for c in self.tasks[n]]

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "tasks": {n: list(m) for n, m in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Taxonomy:
        return cls(tuple(d["classes"]), {n: tuple(m) for n, m in d["tasks"].items()})

    @classmethod
    def from_hierarchy(cls, hierarchy: Mapping[str, Iterable[str]]) -> Taxonomy:
        """Build from task name -> class names; classes are numbered in that order."""
        classes: list[str] = []
        tasks: dict[str, tuple[int, ...]] = {}
        for task, members in hierarchy.items():
            members = list(members)
            tasks[task] = tuple(range(len(classes), len(classes) + len(members)))
            classes.extend(members)
        return cls(tuple(classes), tasks)

    @classmethod
    def from_json(cls, path: str | Path) -> Taxonomy:
        return cls.from_hierarchy(read_hierarchy(path))

    def subset(self, names: Iterable[str]) -> Taxonomy:
        """The same classes with only the named primitive tasks."""
        names = self.validate(names)
        return Taxonomy(self.classes, {n: self.tasks[n] for n in names})


def read_hierarchy(path: str | Path) -> dict[str, list[str]]:
    """A hierarchy JSON: task name -> list of class names (or WordNet ids)."""
    try:
        hierarchy = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read hierarchy JSON {path}: {e}") from e
    if not isinstance(hierarchy, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in hierarchy.values()
    ):
        raise ValueError(f"{path}: expected an object mapping task name -> list of class names")
    return hierarchy


WNID = re.compile(r"^n\d{8}$")


def wordnet_taxonomy(groups: Mapping[str, Sequence[str]], wnids: Sequence[str], words: Mapping[str, str],
                     parents: Mapping[str, Sequence[str]]) -> tuple[Taxonomy, list[str]]:
    """Primitive tasks from groups of WordNet synsets, and each class's wnid.

    A task lists synsets: a class's own wnid (one of `wnids`, the class folders) or any
    synset above classes in `parents` (child -> parents, as ImageNet's wordnet.is_a.txt),
    which stands for every class below it. Classes are numbered in `wnids` order, each
    task's in that order, and named by the first lemma of `words` (words.txt: wnid ->
    "lemma, lemma, ..."), with the wnid appended when two classes share a lemma, or by
    the wnid when `words` lacks it. Classes no task reaches are left out.
    """
    def ancestors(wnid: str) -> set[str]:
        seen, todo = set(), [wnid]
        while todo:
            w = todo.pop()
            if w not in seen:
                seen.add(w)
                todo += parents.get(w, ())
        return seen

    above = {w: ancestors(w) for w in wnids}
    members = {task: [w for w in wnids if above[w] & set(synsets)] for task, synsets in groups.items()}
    empty = [t for t, m in members.items() if not m]
    if empty:
        raise ValueError(f"task(s) {', '.join(map(repr, empty))} reach no class folder: each synset must be a "
                         "class's wnid or lie above one in wordnet.is_a.txt")
    used = [w for w in wnids if any(w in m for m in members.values())]
    lemma = {w: words.get(w, w).split(",")[0].strip().replace(" ", "_") or w for w in used}
    shared = {n for n in lemma.values() if list(lemma.values()).count(n) > 1}
    name = {w: f"{lemma[w]}_{w}" if lemma[w] in shared else lemma[w] for w in used}
    index = {w: i for i, w in enumerate(used)}
    taxonomy = Taxonomy(tuple(name[w] for w in used), {t: tuple(index[w] for w in m) for t, m in members.items()})
    return taxonomy, used


def folder_taxonomy(root: str | Path, hierarchy: str | Path) -> tuple[Taxonomy, list[str]]:
    """The taxonomy of an ImageFolder and each class's folder name under root/train/.

    When the hierarchy JSON lists WordNet ids only, the class folders are wnids and the
    tasks are read as `wordnet_taxonomy` says, with root/words.txt and
    root/wordnet.is_a.txt ("parent child" per line) when present; else the JSON's class
    names are the folder names."""
    root = Path(root)
    groups = read_hierarchy(hierarchy)
    if not all(WNID.match(s) for synsets in groups.values() for s in synsets):
        taxonomy = Taxonomy.from_hierarchy(groups)
        return taxonomy, list(taxonomy.classes)
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and WNID.match(d.name))
    words: dict[str, str] = {}
    parents: dict[str, list[str]] = {}
    if (root / "words.txt").is_file():
        words = dict(line.split("\t", 1) for line in (root / "words.txt").read_text().splitlines() if "\t" in line)
    if (root / "wordnet.is_a.txt").is_file():
        for line in (root / "wordnet.is_a.txt").read_text().splitlines():
            if line.strip():
                parent, child = line.split()
                parents.setdefault(child, []).append(parent)
    return wordnet_taxonomy(groups, wnids, words, parents)


def cifar100() -> Taxonomy:
    """The 100 CIFAR-100 classes with the 20 superclasses as primitive tasks."""
    tasks = {
        name: tuple(c for c, s in enumerate(CIFAR100_FINE_TO_COARSE) if s == i)
        for i, name in enumerate(CIFAR100_SUPERCLASSES)
    }
    return Taxonomy(CIFAR100_CLASSES, tasks)
