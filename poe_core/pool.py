"""The pool bundle as the service reads it: verified, with exact validation figures.

    manifest.json               format version, pool id, taxonomy, architecture, every
                                part's files per weight format (see poe_core.manifest),
                                training figures, sha256 of every file
    library.safetensors         the library (conv1..conv3 of the KD student)
    experts/...                 one expert head per primitive task and width
    student.safetensors         the KD student's own head over all classes (optional)
    onnx/...                    every part exported once to ONNX (+ onnx/int8/...)
    logits/...                  every part's logits on the whole validation split, per
                                weight format, and the validation labels

The ONNX parts are what assembly merges per query; the validation logits are what the
accuracy of any query, in any format, is computed from without running a model. The
pool is written by poe_core.build; reading it never imports the training code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from poe_core.evaluate import cross_expert_error_share, task_specific_accuracy
from poe_core.files import sha256_file
from poe_core.formats import FORMATS, FormatUnavailable, Unavailable, check_format
from poe_core.manifest import Manifest, ManifestError, Part, parse_manifest, pool_id
from poe_core.nets import BranchedModel, spec_from_dict
from poe_core.query import Query, resolve_query
from poe_core.reject import RejectRule, fit_reject
from poe_core.taxonomy import Taxonomy

__all__ = ["LIBRARY_OUTPUT", "STUDENT", "Pool", "PoolError", "Unavailable", "load_pool", "part_key",
           "sha256_file"]

LIBRARY_OUTPUT = "features"
STUDENT = "student"
QUERY_MEMO = 4096  # queries Pool.query remembers


class PoolError(Exception):
    """A pool bundle that cannot be used: missing file, hash mismatch, bad manifest."""


def part_key(task: str, ks: float) -> str:
    """The name of an expert part at one width, in the pool's logits and the Assembler."""
    return f"{task}@{ks:g}"


@dataclass
class Pool:
    """A loaded, verified pool bundle."""

    root: Path
    manifest: dict  # as stored: its hash is the pool id
    spec: Manifest  # the same, typed, in the current format version
    taxonomy: Taxonomy
    val_labels: torch.Tensor
    part_logits: dict[str, dict[str, torch.Tensor]] = field(repr=False)  # format -> part key -> logits

    @property
    def pool_id(self) -> str:
        return self.spec.pool_id

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.experts)

    @property
    def mean(self) -> list[float]:
        return self.spec.normalization.mean

    @property
    def std(self) -> list[float]:
        return self.spec.normalization.std

    @property
    def image_shape(self) -> list[int]:
        return self.spec.dataset.image_shape

    @property
    def widths(self) -> list[float]:
        """Every expert width (ks) the pool holds."""
        return self.spec.architecture.widths

    @property
    def default_width(self) -> float:
        return self.spec.architecture.expert["ks"]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def part(self, task: str, ks: float | None = None) -> Part:
        return self.spec.experts[task].at(ks)

    def expert_info(self, task: str) -> dict:
        """The default-width expert's entry as a plain dict (classes, files, sizes, accuracy)."""
        return {"classes": self.spec.experts[task].classes} | self.part(task).model_dump()

    # -- capabilities --------------------------------------------------------------

    def format_info(self, weights: str) -> dict:
        """What the manifest says of a weight format: availability, reason, accuracy drop."""
        check_format(weights)
        return self.manifest["formats"][weights]

    def require_format(self, weights: str) -> None:
        """Raise FormatUnavailable, with the pool's reason, unless it offers `weights`."""
        info = self.format_info(weights)
        if not info["available"]:
            raise FormatUnavailable(f"{weights} is not available for pool {self.pool_id}: {info['reason']}")

    def unavailable(self, capability: str) -> str | None:
        """Why the pool cannot offer `capability` ("widths" for budgets and plans, "mask"
        for the SMART baseline), or None if it can."""
        if capability == "widths":
            return None if len(self.widths) > 1 else (
                f"pool {self.pool_id} holds its experts at one width (ks = {self.default_width:g}) only")
        if capability == "mask":
            return None if self.spec.student is not None else (
                f"pool {self.pool_id} keeps no library student head (built before format 3 or without one)")
        raise ValueError(f"unknown capability {capability!r}; use widths or mask")

    def require(self, capability: str) -> None:
        reason = self.unavailable(capability)
        if reason is not None:
            raise Unavailable(reason)

    # -- queries -------------------------------------------------------------------

    def query(self, tasks: Sequence[str] = (), classes: Sequence[str] = (), *, method: str = "poe",
              widths: Mapping[str, float] | None = None) -> Query:
        """The Query for tasks and/or classes (see poe_core.query); TaskError if it names
        an unknown task or class, Unavailable if the pool lacks a width or the student.
        The last QUERY_MEMO queries are remembered (a composite task asked again, in any
        file option, resolves once); a refused one is not."""
        try:
            key = (tasks if isinstance(tasks, str) else tuple(tasks),
                   classes if isinstance(classes, str) else tuple(classes), method,
                   tuple(widths.items()) if widths else ())
            hash(key)
        except (TypeError, AttributeError):  # not hashable: resolve_query says what is wrong
            return self._query(tasks, classes, method, widths)
        return self._memo(*key)

    @cached_property
    def _memo(self):
        return lru_cache(maxsize=QUERY_MEMO)(lambda tasks, classes, method, widths:
                                             self._query(tasks, classes, method, dict(widths) or None))

    def _query(self, tasks, classes, method: str, widths: Mapping[str, float] | None) -> Query:
        q = resolve_query(self.taxonomy, tasks, classes, method=method, widths=widths,
                          default_width=self.default_width)
        if method == "mask":
            self.require("mask")
        missing = sorted({w for w in q.widths if w not in self.widths})
        if missing:
            raise Unavailable(f"pool {self.pool_id} holds no expert of width {', '.join(f'{w:g}' for w in missing)}"
                              f" (widths: {', '.join(f'{w:g}' for w in self.widths)})")
        return q

    def params(self, q: Query) -> int:
        return self.spec.library.params + sum(p.params for p in self._parts(q))

    def flops(self, q: Query) -> int:
        """Multiply-accumulates per image (the paper's FLOPs)."""
        return self.spec.library.flops + sum(p.flops for p in self._parts(q))

    def _parts(self, q: Query) -> list[Part]:
        if q.method == "mask":
            return [self.spec.student]
        return [self.part(t, w) for t, w in zip(q.tasks, q.widths, strict=True)]

    def logits_of(self, weights: str = "fp32") -> dict[str, torch.Tensor]:
        """Every part's validation logits in format `weights`, by part key."""
        self.require_format(weights)
        return self.part_logits[weights]

    def logits(self, weights: str = "fp32") -> dict[str, torch.Tensor]:
        """Every default-width expert's validation logits in format `weights`, by task."""
        cached = self.logits_of(weights)
        return {t: cached[part_key(t, self.default_width)] for t in self.tasks}

    @property
    def val_logits(self) -> dict[str, torch.Tensor]:
        return self.logits("fp32")

    def query_logits(self, q: Query, weights: str = "fp32") -> torch.Tensor:
        """The delivered model's logits on every validation image, from the cached parts."""
        cached = self.logits_of(weights)
        if q.method == "mask":
            return cached[STUDENT][:, list(q.classes)]
        logits = torch.cat([cached[part_key(t, w)] for t, w in zip(q.tasks, q.widths, strict=True)], dim=1)
        return logits[:, list(q.columns(self.taxonomy))] if q.gathers(self.taxonomy) else logits

    def accuracy(self, q: Query, weights: str = "fp32") -> float:
        """Exact validation accuracy of the delivered model on the images of its classes."""
        return task_specific_accuracy(self.query_logits(q, weights), self.val_labels, q.classes)

    def accuracy_by_class(self, q: Query, weights: str = "fp32") -> dict[str, float]:
        """Per output class of the delivered model, in its order: the share of that class's
        validation images it ranks first among its classes. With equal images per class
        their mean is `accuracy`."""
        predicted = self.query_logits(q, weights).argmax(1)
        names = self.taxonomy.classes
        return {names[c]: (predicted[self.val_labels == c] == i).float().mean().item()
                for i, c in enumerate(q.classes)}

    def mask_accuracy(self, q: Query, weights: str = "fp32") -> float:
        """What the SMART mask baseline scores on the same query (Unavailable without a student)."""
        self.require("mask")
        return self.accuracy(replace(q, method="mask", widths=()), weights)

    def reject_rule(self, q: Query, weights: str = "fp32") -> RejectRule:
        """The "none of these" rule of the delivered model, fitted on validation."""
        in_task = torch.isin(self.val_labels, torch.tensor(q.classes)).numpy()
        return fit_reject(self.query_logits(q, weights).numpy(), in_task)

    def composite_params(self, tasks: Sequence[str]) -> int:
        return self.params(self.query(tasks))

    def composite_flops(self, tasks: Sequence[str]) -> int:
        return self.flops(self.query(tasks))

    def composite_accuracy(self, tasks: Sequence[str], weights: str = "fp32") -> float:
        """Validation accuracy of the composite model for `tasks` in format `weights`."""
        return self.accuracy(self.query(tasks), weights)

    def cross_expert_error_share(self, tasks: Sequence[str], weights: str = "fp32") -> float:
        return cross_expert_error_share(self.logits(weights), self.val_labels, self.taxonomy, tasks)

    # -- PyTorch twins, for checks and test-split evaluation ------------------------

    @cached_property
    def library(self) -> nn.Module:
        lib = spec_from_dict(self.spec.architecture.library).library(self.image_shape[0])
        lib.load_state_dict(load_file(str(self.path(self.spec.library.weights))))
        return lib.eval()

    def student_head(self) -> nn.Module:
        """The library student's own head over all classes (Unavailable if not kept)."""
        self.require("mask")
        arch = self.spec.architecture
        head = spec_from_dict(arch.library).head(arch.library_channels, len(self.taxonomy.classes))
        head.load_state_dict(load_file(str(self.path(self.spec.student.weights))))
        return head.eval()

    def expert(self, task: str, ks: float | None = None) -> nn.Module:
        arch = self.spec.architecture
        spec = spec_from_dict(arch.expert)
        ks = spec.ks if ks is None else ks
        head = spec.with_ks(ks).head(arch.library_channels, len(self.taxonomy.tasks[task]))
        head.load_state_dict(load_file(str(self.path(self.part(task, ks).weights))))
        return head.eval()

    def branched_model(self, tasks: Sequence[str]) -> BranchedModel:
        """The PyTorch twin of the assembled ONNX model, for checks and evaluation."""
        tasks = self.taxonomy.validate(tasks)
        return BranchedModel(self.library, [self.expert(t) for t in tasks]).eval()


def load_pool(root: str | Path) -> Pool:
    """Load a pool bundle, verifying the sha256 of every file the manifest lists."""
    root = Path(root)
    try:
        raw = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise PoolError(f"{root} is not a pool: manifest.json is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PoolError(f"{root}/manifest.json is unreadable: {e}") from None
    if raw.get("pool_id") != pool_id(raw):
        raise PoolError(f"{root}/manifest.json was modified: its content does not match pool id "
                        f"{raw.get('pool_id')!r}")
    try:
        spec = parse_manifest(raw)
    except ManifestError as e:
        raise PoolError(f"{root}: {e}") from None
    for rel, digest in spec.files.items():
        path = root / rel
        if not path.is_file():
            raise PoolError(f"pool {spec.pool_id}: file {rel} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise PoolError(f"pool {spec.pool_id}: file {rel} is corrupt "
                            f"(sha256 {actual[:12]}..., manifest says {digest[:12]}...)")
    parts = {part_key(t, float(w)): p for t, e in spec.experts.items() for w, p in e.widths.items()}
    if spec.student is not None:
        parts[STUDENT] = spec.student
    part_logits = {f: {k: _logits(root / p.files(f).logits) for k, p in parts.items()} for f in FORMATS}
    labels = torch.from_numpy(np.load(root / spec.val_labels).astype(np.int64))
    return Pool(root, raw, spec, Taxonomy.from_dict(spec.taxonomy), labels, part_logits)


def _logits(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path).astype(np.float32))


def __getattr__(name: str):
    # The builder moved to poe_core.build, which imports torch.onnx and the quantizer; the
    # service reads pools without them. Old imports keep working, loaded on first use.
    if name in ("build_pool", "build_pool_from_work", "onnx_logits", "normalised", "composite_samples"):
        from poe_core import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
