"""Building a pool bundle from trained networks (poe_core.pool reads it).

Every part is exported once to ONNX here: the library (input -> features), every expert
at every width it was trained at, and the library student's own head over all classes
(the SMART "mask" baseline). Every part is also quantized to int8 (onnxruntime static
QDQ), and every part's logits on the whole validation split are cached per weight
format, computed by onnxruntime on that format's parts: the figures the service reports
are those of the very models it hands out. int8 is refused when it loses more than a
point of validation accuracy on average over composite tasks (the accuracy-drop policy).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from poe_core.data import ImageSet, Splits
from poe_core.evaluate import composite_accuracy, task_specific_accuracy
from poe_core.files import sha256_file
from poe_core.formats import FORMATS, INT8_METHOD, fp16_model, quantize_int8
from poe_core.manifest import Manifest, pool_id, width_key
from poe_core.nets import ArchSpec, ExpertHead, Library, check_continues, count_flops, count_params, spec_from_dict
from poe_core.pool import LIBRARY_OUTPUT, STUDENT, Pool, PoolError, load_pool, part_key
from poe_core.taxonomy import Taxonomy

OPSET = 17
# int8 is offered only if, over composite tasks of DROP_TASKS primitive tasks (all of
# them, or a fixed sample of DROP_SAMPLES), it loses at most this much accuracy on average.
INT8_MAX_MEAN_DROP = 0.01
DROP_TASKS = 5
DROP_SAMPLES = 200
CALIBRATION_IMAGES = 256


def export_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str) -> bytes:
    """Export one part once, at pool build time; batch dimension dynamic."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval().float().to(memory_format=torch.contiguous_format), (example,), buf,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    return buf.getvalue()


def _ort_session(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def normalised(images: ImageSet, mean, std) -> np.ndarray:
    """The model input for `images`: pixel / 255, then (x - mean) / std, float32 NCHW."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return (images.x.numpy().astype(np.float32) / 255 - m) / s


def onnx_logits(library_onnx: bytes, part_onnx: Mapping[str, bytes], images: ImageSet,
                mean, std, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Every head part's logits on `images`, computed by onnxruntime on the exported parts."""
    lib = _ort_session(library_onnx)
    parts = {k: _ort_session(b) for k, b in part_onnx.items()}
    out: dict[str, list[np.ndarray]] = {k: [] for k in parts}
    for start in range(0, len(images), batch_size):
        batch = images.subset(slice(start, start + batch_size))
        feats = lib.run(None, {"input": normalised(batch, mean, std)})[0]
        for k, sess in parts.items():
            out[k].append(sess.run(None, {LIBRARY_OUTPUT: feats})[0])
    return {k: np.concatenate(v) for k, v in out.items()}


def calibration_images_of(splits: Splits, n: int) -> ImageSet:
    """The int8 calibration images: a fixed random sample of n training images."""
    return splits.train.subset(torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:n])


def int8_parts(library_onnx: bytes, part_onnx: Mapping[str, bytes], calibration: ImageSet,
               mean, std) -> tuple[bytes, dict[str, bytes]]:
    """The library and every head part quantized separately: the library calibrated on
    `calibration` images, the heads on the fp32 library's features of those images."""
    x = normalised(calibration, mean, std)
    return quantize_int8(library_onnx, "input", x), int8_heads(library_onnx, part_onnx, x)


def int8_heads(library_onnx: bytes, part_onnx: Mapping[str, bytes], x: np.ndarray) -> dict[str, bytes]:
    """Head parts quantized to int8, calibrated on the fp32 library's features of the
    normalised calibration images `x`."""
    features = _ort_session(library_onnx).run(None, {"input": x})[0]
    return {k: quantize_int8(b, LIBRARY_OUTPUT, features) for k, b in part_onnx.items()}


def composite_samples(tasks: Sequence[str], n: int, limit: int = DROP_SAMPLES, seed: int = 0) -> list[tuple[str, ...]]:
    """All composite tasks of n primitive tasks, or a fixed random sample of `limit`."""
    if math.comb(len(tasks), n) <= limit:
        return list(itertools.combinations(tasks, n))
    rng = random.Random(seed)
    sample: set[tuple[str, ...]] = set()
    while len(sample) < limit:
        sample.add(tuple(sorted(rng.sample(list(tasks), n))))
    return sorted(sample)


def accuracy_drop(fp32: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  taxonomy, composites: Sequence[Sequence[str]]) -> dict:
    """Validation accuracy lost against fp32 over `composites`: mean and max, as fractions."""
    drops = [composite_accuracy(fp32, labels, taxonomy, q) - composite_accuracy(other, labels, taxonomy, q)
             for q in composites]
    return {"n_tasks": len(composites[0]), "composite_tasks": len(composites),
            "mean": float(np.mean(drops)), "max": float(np.max(drops))}


def experts_by_width(experts: Mapping, default_width: float) -> dict[float, dict[str, ExpertHead]]:
    """width -> task -> head, from either that or task -> head (one width: the default)."""
    if all(isinstance(v, nn.Module) for v in experts.values()):
        return {float(default_width): dict(experts)}
    return {float(w): dict(heads) for w, heads in experts.items()}


def _slug(task: str, index: int) -> str:
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)[:60]}"


def _files(name: str, folder: str = "") -> dict:
    """Where a part's files go, in every weight format: stated, never derived from each other."""
    sub = f"{folder}/" if folder else ""
    return {"weights": f"{sub}{name}.safetensors",
            "fp32": {"onnx": f"onnx/{sub}{name}.onnx", "logits": f"logits/{name}.npy"},
            "fp16": {"logits": f"logits/fp16/{name}.npy"},
            "int8": {"onnx": f"onnx/int8/{sub}{name}.onnx", "logits": f"logits/int8/{name}.npy"}}


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_pool(
    out: str | Path, *, library: Library, experts: Mapping, splits: Splits,
    library_spec: ArchSpec, expert_spec: ArchSpec, student_head: ExpertHead | None = None,
    training: dict | None = None, fp16_logits: bool = False, progress: Callable[[str], None] | None = None,
    int8_max_mean_drop: float = INT8_MAX_MEAN_DROP, calibration_images: int = CALIBRATION_IMAGES,
    oracle: KeptOracle | None = None,
) -> Pool:
    """Write a pool bundle to `out` atomically (a temp directory renamed into place).

    `experts` maps width (ks) -> task -> head, or task -> head for one width; the
    default width is `expert_spec.ks`. `student_head` is the library student's own head
    over all classes, kept for the mask baseline. Besides the fp32 parts, quantizes
    every part to int8 (calibrated on `calibration_images` training images), caches
    validation logits per weight format and refuses int8 if it loses more than
    `int8_max_mean_drop` accuracy on average over composite tasks of DROP_TASKS
    primitive tasks (at the default width). `oracle` is kept in the bundle's `oracle/`
    for rebuilding or extending the pool; no delivered model ever contains it.
    """
    out = Path(out)
    say = progress or (lambda _msg: None)
    taxonomy = splits.taxonomy
    shape = list(splits.image_shape)
    check_continues(library_spec, expert_spec)
    by_width = experts_by_width(experts, expert_spec.ks)
    default = float(expert_spec.ks)
    if default not in by_width:
        raise ValueError(f"no experts at the default width {default:g} (widths: {sorted(by_width)})")
    tasks = list(by_width[default])
    for w, heads in by_width.items():
        if set(heads) != set(tasks):
            raise ValueError(f"the experts at width {w:g} are not those at the default width {default:g}")
    widths = sorted(by_width)
    library = library.cpu().float().eval()
    heads = {part_key(t, w): by_width[w][t].cpu().float().eval() for t in tasks for w in widths}
    if student_head is not None:
        heads[STUDENT] = student_head.cpu().float().eval()
    files = {part_key(t, w): _files(f"{_slug(t, i)}@{width_key(w)}", "experts")
             for i, t in enumerate(tasks) for w in widths}
    files[STUDENT] = _files(STUDENT)
    library_files = _files("library")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        x = torch.zeros(1, *shape)
        library_onnx = export_onnx(library, x, "input", LIBRARY_OUTPUT)
        with torch.no_grad():
            features = library(x)
        part_onnx = {k: export_onnx(h, features, LIBRARY_OUTPUT, "logits") for k, h in heads.items()}
        export_seconds = time.perf_counter() - t0
        say(f"exported the library and {len(part_onnx)} head parts ({len(tasks)} experts at "
            f"{len(widths)} width(s){', the student head' if student_head is not None else ''}) "
            f"to ONNX in {export_seconds:.1f} s")

        t0 = time.perf_counter()
        calibration = calibration_images_of(splits, calibration_images)
        library_int8, parts_int8 = int8_parts(library_onnx, part_onnx, calibration, splits.mean, splits.std)
        quantize_seconds = time.perf_counter() - t0
        say(f"quantized the library and {len(part_onnx)} head parts to int8 in {quantize_seconds:.1f} s")

        onnx_by_format = {"fp32": (library_onnx, part_onnx),
                          "fp16": (fp16_model(library_onnx), {k: fp16_model(b) for k, b in part_onnx.items()}),
                          "int8": (library_int8, parts_int8)}
        val_labels = splits.val.y
        logits, val_acc = _validation_logits(tmp, onnx_by_format, files, splits, fp16_logits)
        _write(tmp, "logits/val_labels.npy", _npy(val_labels.numpy().astype(np.int16)))
        oracle_entry = None
        if oracle is not None:
            for rel, data in oracle.files.items():
                _write(tmp, rel, data)
            oracle_entry = oracle.entry

        _write(tmp, library_files["weights"], _safetensors(library))
        _write(tmp, library_files["fp32"]["onnx"], library_onnx)
        _write(tmp, library_files["int8"]["onnx"], library_int8)
        library_entry = {"weights": library_files["weights"], "onnx": library_files["fp32"]["onnx"],
                         "onnx_bytes": len(library_onnx), "params": count_params(library),
                         "flops": count_flops(library, shape),
                         "formats": {"fp16": {}, "int8": {"onnx": library_files["int8"]["onnx"],
                                                         "onnx_bytes": len(library_int8)}}}
        entries = {k: _head_entry(tmp, files[k], head, part_onnx[k], parts_int8[k],
                                  {f: val_acc[f][k] for f in FORMATS}, features.shape[1:])
                   for k, head in heads.items()}

        formats = _format_policy(logits, val_labels, taxonomy, tasks, default, int8_max_mean_drop, say)
        formats["int8"] |= {"method": INT8_METHOD, "calibration_images": len(calibration),
                            "quantize_seconds": round(quantize_seconds, 2)}
        manifest = Manifest(
            pool_id="", created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            dataset={"name": splits.name, "image_shape": shape, "val_images": len(splits.val),
                     "train_images": len(splits.train), "preprocess": splits.preprocess},
            taxonomy=taxonomy.subset(tasks).to_dict(),
            normalization={"mean": list(splits.mean), "std": list(splits.std)},
            architecture={"library": library_spec.to_dict(), "expert": expert_spec.to_dict(), "widths": widths,
                          "library_channels": library.out_channels, "opset": OPSET, "input": "input",
                          "library_output": LIBRARY_OUTPUT},
            library=library_entry,
            experts={t: {"classes": taxonomy.class_names(t), "width": default,
                         "widths": {width_key(w): entries[part_key(t, w)] for w in widths}} for t in tasks},
            student=entries.get(STUDENT), oracle=oracle_entry,
            formats=formats, val_labels="logits/val_labels.npy", training=training or {},
            export_seconds=round(export_seconds, 2),
            files=_hashes(tmp),
        )
        _publish(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_pool(out)


def _hashes(tmp: Path) -> dict[str, str]:
    """sha256 of every file of a bundle being written, by relative path."""
    return {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}


def _publish(tmp: Path, out: Path, manifest: Manifest) -> None:
    """Write the manifest with its pool id into `tmp` and move the bundle to `out`."""
    stored = manifest.model_dump(mode="json")
    stored["pool_id"] = pool_id(stored)
    (tmp / "manifest.json").write_text(json.dumps(stored, indent=1))
    os.chmod(tmp, 0o755)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _validation_logits(tmp: Path, onnx_by_format: Mapping[str, tuple[bytes, Mapping[str, bytes]]],
                       files: Mapping[str, dict], splits: Splits, fp16_logits: bool):
    """Every head part's validation logits per weight format, computed by onnxruntime on
    that format's parts and written to the bundle; and each part's task-specific
    validation accuracy from the stored logits (format -> part key -> ...)."""
    taxonomy = splits.taxonomy
    logits: dict[str, dict[str, torch.Tensor]] = {}
    val_acc: dict[str, dict[str, float]] = {}
    for fmt, (lib_part, head_parts) in onnx_by_format.items():
        computed = onnx_logits(lib_part, head_parts, splits.val, splits.mean, splits.std)
        logits[fmt], val_acc[fmt] = {}, {}
        for k, array in computed.items():
            stored = array.astype(np.float16 if fp16_logits else np.float32)
            _write(tmp, files[k][fmt]["logits"], _npy(stored))
            logits[fmt][k] = torch.from_numpy(stored.astype(np.float32))
            classes = list(range(len(taxonomy.classes))) if k == STUDENT else taxonomy.tasks[k.rsplit("@", 1)[0]]
            val_acc[fmt][k] = task_specific_accuracy(logits[fmt][k], splits.val.y, classes)
    return logits, val_acc


def _head_entry(tmp: Path, f: dict, head: nn.Module, onnx_fp32: bytes, onnx_int8: bytes,
                val_acc: Mapping[str, float], feature_shape) -> dict:
    """Write a head part's weights and ONNX files; return its manifest entry."""
    _write(tmp, f["weights"], _safetensors(head))
    _write(tmp, f["fp32"]["onnx"], onnx_fp32)
    _write(tmp, f["int8"]["onnx"], onnx_int8)
    return {"weights": f["weights"], "onnx": f["fp32"]["onnx"], "onnx_bytes": len(onnx_fp32),
            "logits": f["fp32"]["logits"], "val_acc": val_acc["fp32"],
            "params": count_params(head), "flops": count_flops(head, feature_shape),
            "formats": {"fp16": {"logits": f["fp16"]["logits"], "val_acc": val_acc["fp16"]},
                        "int8": {"onnx": f["int8"]["onnx"], "onnx_bytes": len(onnx_int8),
                                 "logits": f["int8"]["logits"], "val_acc": val_acc["int8"]}}}


def extend_pool(pool: Pool, out: str | Path, *, task: str, classes: Sequence[int],
                experts: Mapping[float, ExpertHead], splits: Splits, training: dict,
                progress: Callable[[str], None] | None = None) -> Pool:
    """A new bundle at `out` (written atomically): every file of `pool` copied byte for
    byte, plus primitive task `task` over class indices `classes` with its expert at
    every width the pool holds (`experts`: ks -> head), exported, quantized and
    evaluated on the validation split as build_pool does it for every expert. The
    manifest gains the task, its files and `training` under `training.added_tasks`;
    the weight-format policy stays the pool's (decided on its first tasks). `splits`
    must be the pool's data set: its validation images give the cached logits."""
    out = Path(out)
    say = progress or (lambda _msg: None)
    if task in pool.spec.experts:
        raise ValueError(f"pool {pool.pool_id} already has a primitive task {task!r}")
    if sorted(experts) != sorted(pool.widths):
        raise ValueError(f"the new expert's widths {sorted(experts)} are not the pool's {pool.widths}")
    if not torch.equal(splits.val.y, pool.val_labels):
        raise ValueError(f"these validation images are not those of pool {pool.pool_id}")
    spec = pool.spec.model_dump(mode="json")
    spec["taxonomy"]["tasks"][task] = list(classes)
    taxonomy = Taxonomy.from_dict(spec["taxonomy"])
    splits = dataclasses.replace(splits, taxonomy=taxonomy, mean=tuple(pool.mean), std=tuple(pool.std))
    files = {part_key(task, w): _files(f"{_slug(task, len(pool.tasks))}@{width_key(w)}", "experts")
             for w in experts}
    heads = {part_key(task, w): head.cpu().float().eval() for w, head in experts.items()}
    fp16_logits = np.load(pool.path(pool.part(pool.tasks[0]).logits)).dtype == np.float16

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel in pool.spec.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pool.path(rel), tmp / rel)
        t0 = time.perf_counter()
        library_onnx = pool.path(pool.spec.library.onnx).read_bytes()
        with torch.no_grad():
            features = pool.library(torch.zeros(1, *pool.image_shape))
        part_onnx = {k: export_onnx(h, features, LIBRARY_OUTPUT, "logits") for k, h in heads.items()}
        x = normalised(calibration_images_of(splits, pool.spec.formats["int8"].model_extra.get(
            "calibration_images", CALIBRATION_IMAGES)), pool.mean, pool.std)
        parts_int8 = int8_heads(library_onnx, part_onnx, x)
        library_int8 = pool.path(pool.spec.library.files("int8").onnx).read_bytes()
        onnx_by_format = {"fp32": (library_onnx, part_onnx),
                          "fp16": (fp16_model(library_onnx), {k: fp16_model(b) for k, b in part_onnx.items()}),
                          "int8": (library_int8, parts_int8)}
        _, val_acc = _validation_logits(tmp, onnx_by_format, files, splits, fp16_logits)
        entries = {w: _head_entry(tmp, files[k], heads[k], part_onnx[k], parts_int8[k],
                                  {f: val_acc[f][k] for f in FORMATS}, features.shape[1:])
                   for w in experts for k in [part_key(task, w)]}
        say(f"exported, quantized and evaluated the expert of {task} at {len(entries)} width(s) in "
            f"{time.perf_counter() - t0:.1f} s")
        spec["experts"][task] = {"classes": [taxonomy.classes[c] for c in classes], "width": pool.default_width,
                                 "widths": {width_key(w): e for w, e in entries.items()}}
        spec["training"]["added_tasks"] = [*spec["training"].get("added_tasks", []), training]
        spec["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        spec["files"] = _hashes(tmp)
        _publish(tmp, out, Manifest.model_validate(spec | {"pool_id": ""}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_pool(out)


def _format_policy(logits, labels, taxonomy, tasks, default, int8_max_mean_drop, say) -> dict:
    """Which weight formats the pool offers: int8 only within the accuracy-drop budget."""
    at_default = {f: {t: logits[f][part_key(t, default)] for t in tasks} for f in FORMATS}
    composites = composite_samples(tasks, min(DROP_TASKS, len(tasks)))
    drops = {f: accuracy_drop(at_default["fp32"], at_default[f], labels, taxonomy, composites)
             for f in ("fp16", "int8")}
    int8_ok = drops["int8"]["mean"] <= int8_max_mean_drop
    say(f"accuracy drop against fp32 over {len(composites)} composite tasks: "
        + ", ".join(f"{f} mean {d['mean']:.2%} max {d['max']:.2%}" for f, d in drops.items())
        + ("" if int8_ok else "; int8 refused"))
    return {"fp32": {"available": True, "reason": None},
            "fp16": {"available": True, "reason": None, "val_acc_drop": drops["fp16"]},
            "int8": {"available": int8_ok, "val_acc_drop": drops["int8"], "max_mean_drop": int8_max_mean_drop,
                     "reason": None if int8_ok else (
                         f"int8 loses {drops['int8']['mean']:.2%} validation accuracy on average over "
                         f"{len(composites)} composite tasks of {drops['int8']['n_tasks']} primitive tasks, "
                         f"more than the {int8_max_mean_drop:.2%} allowed")}}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _safetensors(module: nn.Module) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in module.state_dict().items()})


@dataclass
class KeptOracle:
    """The oracle's files as they go into a bundle, and its manifest entry."""

    files: dict[str, bytes]
    entry: dict


ORACLE_DIR = "oracle"
# The kept oracle is stored in fp16 when that changes no validation prediction by more
# than this share of images (a WRN-16-(4,4) halves from 11 to 5.5 MB); else in fp32.
ORACLE_FP16_MAX_CHANGED = 0.001


def keep_oracle(work: Path, splits: Splits) -> KeptOracle:
    """The work directory's oracle (trained or brought) as bundle files: a poe WRN as
    safetensors + its phase figures (fp16 when that is lossless on validation, see
    ORACLE_FP16_MAX_CHANGED), an ONNX oracle as its file and class list."""
    from poe_core.extract import ONNX_ORACLE, load_oracle, phase_info
    from poe_core.oracle import Oracle

    info = phase_info(work, "oracle")
    cpu = torch.device("cpu")
    oracle: Oracle = load_oracle(work, splits, cpu)
    normalization = {"mean": list(oracle.mean), "std": list(oracle.std)}
    if oracle.kind == "onnx":
        rel = f"{ORACLE_DIR}/oracle.onnx"
        files = {rel: (work / ONNX_ORACLE).read_bytes()}
        entry = {"weights": rel, "format": "onnx", "classes": info["classes"], "normalization": normalization,
                 "dtype": "fp32"}
        return KeptOracle(files, entry)
    module = oracle.module.float().eval()

    def predictions() -> torch.Tensor:
        return torch.cat([oracle.logits(splits.val.x[i:i + 500]).argmax(1) for i in range(0, len(splits.val), 500)])

    fp32 = predictions()
    half = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    module.load_state_dict(half)  # copies back into fp32 parameters: the fp16-rounded oracle
    changed = (predictions() != fp32).float().mean().item()
    state = half if changed <= ORACLE_FP16_MAX_CHANGED else {
        k: v.float() for k, v in load_file(str(work / "oracle.safetensors")).items()}
    dtype = "fp16" if state is half else "fp32"
    rel = f"{ORACLE_DIR}/oracle.safetensors"
    figures = {k: info[k] for k in ("architecture", "normalization", "trained_on", "epochs", "seconds",
                                    "precision", "val_acc", "machine") if k in info}
    figures["fp16_changed_predictions"] = changed
    files = {rel: save_safetensors({k: v.contiguous() for k, v in state.items()}),
             f"{ORACLE_DIR}/oracle.json": json.dumps(figures | {"normalization": normalization}, indent=1).encode()}
    entry = {"weights": rel, "format": "poe", "classes": list(splits.taxonomy.classes),
             "normalization": normalization, "architecture": info["architecture"], "dtype": dtype}
    return KeptOracle(files, entry)


def build_pool_from_work(work: str | Path, out: str | Path, splits: Splits, *,
                         fp16_logits: bool = False, progress: Callable[[str], None] | None = None,
                         extra_training: dict | None = None,
                         int8_max_mean_drop: float = INT8_MAX_MEAN_DROP, student_head: bool = True) -> Pool:
    """Build the pool from a finished extraction work directory (see poe_core.extract):
    the library student (its library and, unless `student_head` is False, its own head),
    the experts at every width."""
    from poe_core.extract import load_expert_widths, load_wrn, phase_done, phase_info

    work = Path(work)
    missing = [p for p in ("library", "experts") if not phase_done(work, p)]
    if missing:
        raise PoolError(f"{work}: phase(s) {', '.join(missing)} not finished; run them first")
    student = load_wrn(work, "library", len(splits.taxonomy.classes), splits.image_shape[0])
    training = {p: phase_info(work, p) for p in ("oracle", "library", "experts") if phase_done(work, p)}
    training |= extra_training or {}
    return build_pool(out, library=student.library, experts=load_expert_widths(work, splits),
                      student_head=student.head if student_head else None,
                      splits=splits, library_spec=spec_from_dict(training["library"]["architecture"]),
                      expert_spec=spec_from_dict(training["experts"]["architecture"]), training=training,
                      fp16_logits=fp16_logits, progress=progress, int8_max_mean_drop=int8_max_mean_drop,
                      oracle=keep_oracle(work, splits) if phase_done(work, "oracle") else None)
