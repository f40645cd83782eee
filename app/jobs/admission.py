"""Extraction requests: checking one against this deployment before it is queued.

The API process runs this, so it imports nothing that trains. A job's data set must lie
under one of POE_DATA_ROOTS (symbolic links resolved), so an admin request cannot make
the worker read arbitrary files. Reusing an oracle (and
library) needs the work directory of the extraction that made the active pool: pools
imported from bundles carry no oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from app.schemas import DEFAULT_IMAGE_SIZE, ExtractionRequest
from app.store.pools import active_version
from app.store.tables import PoolVersion
from poe_core.data import make_synthetic
from poe_core.extract import phase_done
from poe_core.oracle import OracleError, load_onnx_oracle, load_poe_oracle, read_class_list
from poe_core.taxonomy import Taxonomy, cifar100, folder_taxonomy

REUSED_PHASES = {"none": (), "oracle": ("oracle",), "library": ("oracle", "library")}


class ExtractionRejected(ValueError):
    """A request this deployment cannot run; the message is meant for the admin."""


class ReuseUnavailable(Exception):
    """The active pool has no oracle/library to reuse."""


def resolve_data_path(path: str, roots: Sequence[Path], what: str = "data path") -> Path:
    """`path` (absolute, or relative to a data root) resolved inside an allowed root."""
    given = Path(path)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
            if any(resolved.is_relative_to(root) for root in roots) and resolved.exists():
                return resolved
        except OSError:  # a name too long, a loop of links: not a path we can read
            continue
    allowed = ", ".join(str(r) for r in roots)
    raise ExtractionRejected(f"{what} {path!r} is not an existing file or directory under the allowed "
                             f"data roots ({allowed}); set POE_DATA_ROOTS to allow more")


def _taxonomy(data: dict) -> Taxonomy:
    if data["source"] == "synthetic":
        return make_synthetic(seed=data["seed"]).taxonomy
    if data["source"] == "image-folder":  # WordNet groups need the class folders to name the classes
        return folder_taxonomy(data["path"], data["hierarchy"])[0]
    return cifar100()


def prepare(session: Session, request: ExtractionRequest, roots: Sequence[Path]) -> dict:
    """Check a request and return what the job row stores: the request with resolved
    paths and, when reusing, where the reused phases come from."""
    body = request.model_dump()
    data = body["data"]
    # The schema requires what each source reads; what a source ignores is dropped.
    if data["source"] == "synthetic":
        data["path"] = None
    else:
        data["path"] = str(resolve_data_path(data["path"], roots))
    if data["source"] == "image-folder":
        data["hierarchy"] = str(resolve_data_path(data["hierarchy"], roots, "hierarchy"))
        data["image_size"] = data["image_size"] or DEFAULT_IMAGE_SIZE
        data["resize"] = data["resize"] or data["image_size"]
        if data["resize"] < data["image_size"]:
            raise ExtractionRejected(f"data: resize {data['resize']} is smaller than the image size "
                                     f"{data['image_size']}: the crop must fit in the resized photo")
    else:
        data["hierarchy"] = None
    try:
        taxonomy = _taxonomy(data)
        if request.tasks is not None:
            body["tasks"] = taxonomy.validate(request.tasks)
    except (ValueError, OSError) as e:  # a bad or unreadable hierarchy file, unknown or repeated tasks
        raise ExtractionRejected(str(e)) from None
    if request.oracle.file is not None:
        body["oracle"] = _brought_oracle(body["oracle"], request.reuse, roots, taxonomy, _image_shape(data))
    reused = REUSED_PHASES[request.reuse]
    if reused:
        body["reuse_from"] = _reuse_source(session, reused, taxonomy)
    return body


def _image_shape(data: dict) -> tuple[int, ...]:
    if data["source"] == "synthetic":
        return make_synthetic(seed=data["seed"]).image_shape
    if data["source"] == "image-folder":
        return (3, data["image_size"], data["image_size"])
    return (3, 32, 32)  # CIFAR-100


def _brought_oracle(oracle: dict, reuse: str, roots: Sequence[Path], taxonomy: Taxonomy,
                    image_shape: tuple[int, ...]) -> dict:
    """Resolve an operator's oracle under the data roots and check, by loading and running
    it once, that it is a classifier over the data set's classes (else 422 saying why)."""
    if reuse != "none":
        raise ExtractionRejected("a brought oracle replaces the oracle phase: use reuse=none with oracle.file")
    oracle = dict(oracle)
    path = resolve_data_path(oracle["file"], roots, "oracle file")
    classes = resolve_data_path(oracle["classes"], roots, "oracle classes") if oracle["classes"] else None
    oracle["file"], oracle["classes"] = str(path), str(classes) if classes else None
    # The check runs the oracle on a blank batch, where the normalisation makes no difference.
    mean, std = oracle["mean"] or [0.0] * 3, oracle["std"] or [1.0] * 3
    try:
        if path.suffix == ".onnx":
            declared = read_class_list(classes) if classes else list(taxonomy.classes)
            load_onnx_oracle(path, taxonomy.classes, declared, mean, std, image_shape)
        else:
            load_poe_oracle(path, taxonomy.classes, torch.device("cpu"))
    except (OracleError, OSError) as e:
        raise ExtractionRejected(f"oracle.file: {e}") from None
    return oracle


def _reuse_source(session: Session, phases: Sequence[str], taxonomy: Taxonomy) -> dict:
    version = active_version(session)
    if version is None:
        raise ReuseUnavailable("there is no active pool to reuse an oracle from; use reuse=none")
    pool = session.get(PoolVersion, version)
    work = Path(pool.work_dir) if pool.work_dir else None
    missing = [p for p in phases if work is None or not phase_done(work, p)]
    if missing:
        origin = "was imported from a bundle, which carries no oracle" if work is None else \
            f"has lost its work directory {work}"
        raise ReuseUnavailable(f"the active pool (version {version}) {origin}: its "
                               f"{' and '.join(missing)} cannot be reused; use reuse=none")
    if list(pool.manifest["taxonomy"]["classes"]) != list(taxonomy.classes):
        raise ReuseUnavailable(f"the active pool (version {version}) was trained on other classes "
                               "than this data set's; use reuse=none")
    return {"pool_version": version, "work_dir": str(work), "phases": list(phases)}
