"""The pool bundle: a directory that holds everything the service needs, no oracle.

    manifest.json               format version, pool id, taxonomy, architecture,
                                normalisation, training figures, sha256 of every file
    library.safetensors         the library (conv1..conv3 of the KD student)
    experts/<task>.safetensors  one expert head per primitive task
    onnx/library.onnx           the library exported once to ONNX: input -> features
    onnx/experts/<task>.onnx    every expert exported once: features -> logits
    onnx/int8/...               the same parts quantized to int8 (see poe_core.formats)
    logits/val_labels.npy       validation labels
    logits/<task>.npy           every expert's logits on the whole validation split
    logits/<format>/<task>.npy  the same for the fp16 and int8 parts

The ONNX parts are what assembly merges per query; the validation logits, one set per
weight format, are what the accuracy of any composite task in any format is computed
from without running a model. The manifest says which formats the pool offers: int8 is
refused when it loses more than a point of validation accuracy on composite tasks.
"""

from __future__ import annotations

import hashlib
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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from poe_core.data import ImageSet, Splits
from poe_core.evaluate import composite_accuracy, cross_expert_error_share
from poe_core.formats import FORMATS, INT8_METHOD, FormatUnavailable, check_format, fp16_model, quantize_int8
from poe_core.nets import BranchedModel, ExpertHead, Library, WRNSpec, count_flops, count_params
from poe_core.taxonomy import Taxonomy

FORMAT_VERSION = 2
LIBRARY_OUTPUT = "features"
OPSET = 17
# int8 is offered only if, over composite tasks of DROP_TASKS primitive tasks (all of
# them, or a fixed sample of DROP_SAMPLES), it loses at most this much accuracy on average.
INT8_MAX_MEAN_DROP = 0.01
DROP_TASKS = 5
DROP_SAMPLES = 200
CALIBRATION_IMAGES = 256


class PoolError(Exception):
    """A pool bundle that cannot be used: missing file, hash mismatch, bad manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _slug(task: str, index: int) -> str:
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)[:60]}"


@dataclass
class Pool:
    """A loaded, verified pool bundle."""

    root: Path
    manifest: dict
    taxonomy: Taxonomy
    val_labels: torch.Tensor
    val_logits: dict[str, torch.Tensor] = field(repr=False)
    format_logits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def pool_id(self) -> str:
        return self.manifest["pool_id"]

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["experts"])

    @property
    def mean(self) -> list[float]:
        return self.manifest["normalization"]["mean"]

    @property
    def std(self) -> list[float]:
        return self.manifest["normalization"]["std"]

    @property
    def image_shape(self) -> list[int]:
        return self.manifest["dataset"]["image_shape"]

    def expert_info(self, task: str) -> dict:
        return self.manifest["experts"][task]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def composite_params(self, tasks: Sequence[str]) -> int:
        return self.manifest["library"]["params"] + sum(self.expert_info(t)["params"] for t in tasks)

    def composite_flops(self, tasks: Sequence[str]) -> int:
        return self.manifest["library"]["flops"] + sum(self.expert_info(t)["flops"] for t in tasks)

    def format_info(self, weights: str) -> dict:
        """What the manifest says of a weight format: availability, reason, accuracy drop."""
        check_format(weights)
        return self.manifest["formats"][weights]

    def require_format(self, weights: str) -> None:
        """Raise FormatUnavailable, with the pool's reason, unless it offers `weights`."""
        info = self.format_info(weights)
        if not info["available"]:
            raise FormatUnavailable(f"{weights} is not available for pool {self.pool_id}: {info['reason']}")

    def logits(self, weights: str = "fp32") -> dict[str, torch.Tensor]:
        """Every expert's validation logits as computed by its parts in format `weights`."""
        self.require_format(weights)
        return self.format_logits[weights]

    def composite_accuracy(self, tasks: Sequence[str], weights: str = "fp32") -> float:
        """Validation accuracy of the composite model in format `weights`, from the cached logits."""
        return composite_accuracy(self.logits(weights), self.val_labels, self.taxonomy, tasks)

    def cross_expert_error_share(self, tasks: Sequence[str], weights: str = "fp32") -> float:
        return cross_expert_error_share(self.logits(weights), self.val_labels, self.taxonomy, tasks)

    @cached_property
    def library(self) -> Library:
        arch = self.manifest["architecture"]
        lib = Library(arch["library"]["depth"], arch["library"]["kc"], self.image_shape[0])
        lib.load_state_dict(load_file(str(self.path(self.manifest["library"]["weights"]))))
        return lib.eval()

    def expert(self, task: str) -> ExpertHead:
        arch = self.manifest["architecture"]
        spec = WRNSpec(**arch["expert"])
        head = ExpertHead(spec.depth, arch["library_channels"], spec.ks, len(self.taxonomy.tasks[task]))
        head.load_state_dict(load_file(str(self.path(self.expert_info(task)["weights"]))))
        return head.eval()

    def branched_model(self, tasks: Sequence[str]) -> BranchedModel:
        """The PyTorch twin of the assembled ONNX model, for checks and evaluation."""
        tasks = self.taxonomy.validate(tasks)
        return BranchedModel(self.library, [self.expert(t) for t in tasks]).eval()


def load_pool(root: str | Path) -> Pool:
    """Load a pool bundle, verifying the sha256 of every file the manifest lists."""
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise PoolError(f"{root} is not a pool: manifest.json is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PoolError(f"{root}/manifest.json is unreadable: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PoolError(f"{root}: pool format {manifest.get('format_version')!r} is not "
                        f"supported (this poe reads format {FORMAT_VERSION})")
    if manifest.get("pool_id") != _pool_id(manifest):
        raise PoolError(f"{root}/manifest.json was modified: its content does not match pool id "
                        f"{manifest.get('pool_id')!r}")
    for rel, digest in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise PoolError(f"pool {manifest['pool_id']}: file {rel} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise PoolError(f"pool {manifest['pool_id']}: file {rel} is corrupt "
                            f"(sha256 {actual[:12]}..., manifest says {digest[:12]}...)")
    taxonomy = Taxonomy.from_dict(manifest["taxonomy"])
    labels = torch.from_numpy(np.load(root / manifest["val_labels"]).astype(np.int64))
    logits = {t: torch.from_numpy(np.load(root / e["logits"]).astype(np.float32))
              for t, e in manifest["experts"].items()}
    format_logits = {"fp32": logits} | {
        f: {t: torch.from_numpy(np.load(root / e["formats"][f]["logits"]).astype(np.float32))
            for t, e in manifest["experts"].items()}
        for f in FORMATS if f != "fp32"
    }
    return Pool(root, manifest, taxonomy, labels, logits, format_logits)


def _pool_id(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "pool_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


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


def onnx_logits(library_onnx: bytes, expert_onnx: Mapping[str, bytes], images: ImageSet,
                mean, std, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Every expert's logits on `images`, computed by onnxruntime on the exported parts,
    so cached figures are those of the very models the service hands out."""
    lib = _ort_session(library_onnx)
    experts = {t: _ort_session(b) for t, b in expert_onnx.items()}
    out: dict[str, list[np.ndarray]] = {t: [] for t in experts}
    for start in range(0, len(images), batch_size):
        batch = images.subset(slice(start, start + batch_size))
        feats = lib.run(None, {"input": normalised(batch, mean, std)})[0]
        for t, sess in experts.items():
            out[t].append(sess.run(None, {LIBRARY_OUTPUT: feats})[0])
    return {t: np.concatenate(v) for t, v in out.items()}


def int8_parts(library_onnx: bytes, expert_onnx: Mapping[str, bytes], calibration: ImageSet,
               mean, std) -> tuple[bytes, dict[str, bytes]]:
    """The library and every expert quantized separately: the library calibrated on
    `calibration` images, the experts on the fp32 library's features of those images."""
    x = normalised(calibration, mean, std)
    features = _ort_session(library_onnx).run(None, {"input": x})[0]
    return (quantize_int8(library_onnx, "input", x),
            {t: quantize_int8(b, LIBRARY_OUTPUT, features) for t, b in expert_onnx.items()})


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
                  taxonomy: Taxonomy, composites: Sequence[Sequence[str]]) -> dict:
    """Validation accuracy lost against fp32 over `composites`: mean and max, as fractions."""
    drops = [composite_accuracy(fp32, labels, taxonomy, q) - composite_accuracy(other, labels, taxonomy, q)
             for q in composites]
    return {"n_tasks": len(composites[0]), "composite_tasks": len(composites),
            "mean": float(np.mean(drops)), "max": float(np.max(drops))}


def build_pool(
    out: str | Path, *, library: Library, experts: Mapping[str, ExpertHead], splits: Splits,
    library_spec: WRNSpec, expert_spec: WRNSpec, training: dict | None = None,
    fp16_logits: bool = False, progress: Callable[[str], None] | None = None,
    int8_max_mean_drop: float = INT8_MAX_MEAN_DROP, calibration_images: int = CALIBRATION_IMAGES,
) -> Pool:
    """Write a pool bundle to `out` atomically (a temp directory renamed into place).

    Besides the fp32 parts, quantizes every part to int8 (calibrated on
    `calibration_images` training images), caches validation logits per weight format
    and refuses int8 if it loses more than `int8_max_mean_drop` accuracy on average over
    composite tasks of DROP_TASKS primitive tasks.
    """
    out = Path(out)
    say = progress or (lambda _msg: None)
    taxonomy = splits.taxonomy
    shape = list(splits.image_shape)
    library = library.cpu().float().eval()
    experts = {t: e.cpu().float().eval() for t, e in experts.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "experts").mkdir()
        (tmp / "onnx" / "experts").mkdir(parents=True)
        (tmp / "onnx" / "int8" / "experts").mkdir(parents=True)
        (tmp / "logits" / "fp16").mkdir(parents=True)
        (tmp / "logits" / "int8").mkdir()
        save_file(library.state_dict(), str(tmp / "library.safetensors"))
        t0 = time.perf_counter()
        x = torch.zeros(1, *shape)
        library_onnx = export_onnx(library, x, "input", LIBRARY_OUTPUT)
        (tmp / "onnx" / "library.onnx").write_bytes(library_onnx)
        with torch.no_grad():
            features = library(x)
        expert_onnx, entries = {}, {}
        for i, (task, head) in enumerate(experts.items()):
            slug = _slug(task, i)
            save_file(head.state_dict(), str(tmp / "experts" / f"{slug}.safetensors"))
            expert_onnx[task] = export_onnx(head, features, LIBRARY_OUTPUT, "logits")
            (tmp / "onnx" / "experts" / f"{slug}.onnx").write_bytes(expert_onnx[task])
            entries[task] = {
                "classes": taxonomy.class_names(task),
                "weights": f"experts/{slug}.safetensors",
                "onnx": f"onnx/experts/{slug}.onnx",
                "logits": f"logits/{slug}.npy",
                "params": count_params(head),
                "flops": count_flops(head, features.shape[1:]),
                "onnx_bytes": len(expert_onnx[task]),
            }
        export_seconds = time.perf_counter() - t0
        say(f"exported library and {len(experts)} experts to ONNX in {export_seconds:.1f} s")

        t0 = time.perf_counter()
        calibration = splits.train.subset(
            torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:calibration_images])
        library_int8, experts_int8 = int8_parts(library_onnx, expert_onnx, calibration, splits.mean, splits.std)
        (tmp / "onnx" / "int8" / "library.onnx").write_bytes(library_int8)
        for task, entry in entries.items():
            entry["formats"] = {"fp16": {"logits": entry["logits"].replace("logits/", "logits/fp16/")},
                                "int8": {"onnx": entry["onnx"].replace("onnx/", "onnx/int8/"),
                                         "onnx_bytes": len(experts_int8[task]),
                                         "logits": entry["logits"].replace("logits/", "logits/int8/")}}
            (tmp / entry["formats"]["int8"]["onnx"]).write_bytes(experts_int8[task])
        quantize_seconds = time.perf_counter() - t0
        say(f"quantized library and {len(experts)} experts to int8 in {quantize_seconds:.1f} s")

        parts = {"fp32": (library_onnx, expert_onnx),
                 "fp16": (fp16_model(library_onnx), {t: fp16_model(b) for t, b in expert_onnx.items()}),
                 "int8": (library_int8, experts_int8)}
        np.save(tmp / "logits" / "val_labels.npy", splits.val.y.numpy().astype(np.int16))
        val_labels = splits.val.y
        val_logits = {}
        for fmt, (lib_part, expert_parts) in parts.items():
            logits = onnx_logits(lib_part, expert_parts, splits.val, splits.mean, splits.std)
            val_logits[fmt] = {}
            for task, entry in entries.items():
                stored = logits[task].astype(np.float16 if fp16_logits else np.float32)
                np.save(tmp / (entry if fmt == "fp32" else entry["formats"][fmt])["logits"], stored)
                val_logits[fmt][task] = torch.from_numpy(stored.astype(np.float32))
        for task, entry in entries.items():
            entry["val_acc"] = composite_accuracy(val_logits["fp32"], val_labels, taxonomy, [task])
            for fmt in ("fp16", "int8"):
                entry["formats"][fmt]["val_acc"] = composite_accuracy(val_logits[fmt], val_labels, taxonomy, [task])

        composites = composite_samples(list(experts), min(DROP_TASKS, len(experts)))
        drops = {f: accuracy_drop(val_logits["fp32"], val_logits[f], val_labels, taxonomy, composites)
                 for f in ("fp16", "int8")}
        formats = {"fp32": {"available": True, "reason": None},
                   "fp16": {"available": True, "reason": None, "val_acc_drop": drops["fp16"]},
                   "int8": {"available": drops["int8"]["mean"] <= int8_max_mean_drop, "reason": None,
                            "val_acc_drop": drops["int8"], "max_mean_drop": int8_max_mean_drop,
                            "method": INT8_METHOD, "calibration_images": len(calibration),
                            "library_onnx": "onnx/int8/library.onnx", "library_onnx_bytes": len(library_int8),
                            "quantize_seconds": round(quantize_seconds, 2)}}
        if not formats["int8"]["available"]:
            formats["int8"]["reason"] = (
                f"int8 loses {drops['int8']['mean']:.2%} validation accuracy on average over "
                f"{len(composites)} composite tasks of {drops['int8']['n_tasks']} primitive tasks, "
                f"more than the {int8_max_mean_drop:.2%} allowed")
        say(f"accuracy drop against fp32 over {len(composites)} composite tasks: " + ", ".join(
            f"{f} mean {d['mean']:.2%} max {d['max']:.2%}" for f, d in drops.items())
            + ("" if formats["int8"]["available"] else "; int8 refused"))

        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dataset": {"name": splits.name, "image_shape": shape, "val_images": len(splits.val),
                        "train_images": len(splits.train)},
            "taxonomy": taxonomy.subset(list(experts)).to_dict(),
            "normalization": {"mean": list(splits.mean), "std": list(splits.std)},
            "architecture": {"library": library_spec.to_dict(), "expert": expert_spec.to_dict(),
                             "library_channels": library.out_channels, "opset": OPSET,
                             "input": "input", "library_output": LIBRARY_OUTPUT},
            "library": {"weights": "library.safetensors", "onnx": "onnx/library.onnx",
                        "params": count_params(library), "flops": count_flops(library, shape),
                        "onnx_bytes": len(library_onnx)},
            "experts": entries,
            "formats": formats,
            "val_labels": "logits/val_labels.npy",
            "training": training or {},
            "export_seconds": round(export_seconds, 2),
        }
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest["pool_id"] = _pool_id(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_pool(out)


def build_pool_from_work(work: str | Path, out: str | Path, splits: Splits, *,
                         fp16_logits: bool = False, progress: Callable[[str], None] | None = None,
                         extra_training: dict | None = None,
                         int8_max_mean_drop: float = INT8_MAX_MEAN_DROP) -> Pool:
    """Build the pool from a finished extraction work directory (see poe_core.extract)."""
    from poe_core.extract import load_experts, load_wrn, phase_done, phase_info

    work = Path(work)
    missing = [p for p in ("library", "experts") if not phase_done(work, p)]
    if missing:
        raise PoolError(f"{work}: phase(s) {', '.join(missing)} not finished; run them first")
    student = load_wrn(work, "library", len(splits.taxonomy.classes), splits.image_shape[0])
    experts = load_experts(work, splits)
    training = {p: phase_info(work, p) for p in ("oracle", "library", "experts") if phase_done(work, p)}
    training |= extra_training or {}
    info = phase_info(work, "experts")
    return build_pool(out, library=student.library, experts=experts, splits=splits,
                      library_spec=WRNSpec(**training["library"]["architecture"]),
                      expert_spec=WRNSpec(**info["architecture"]), training=training,
                      fp16_logits=fp16_logits, progress=progress, int8_max_mean_drop=int8_max_mean_drop)
