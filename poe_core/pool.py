"""The pool bundle: a directory that holds everything the service needs, no oracle.

    manifest.json               format version, pool id, taxonomy, architecture,
                                normalisation, training figures, sha256 of every file
    library.safetensors         the library (conv1..conv3 of the KD student)
    experts/<task>.safetensors  one expert head per primitive task
    onnx/library.onnx           the library exported once to ONNX: input -> features
    onnx/experts/<task>.onnx    every expert exported once: features -> logits
    logits/val_labels.npy       validation labels
    logits/<task>.npy           every expert's logits on the whole validation split

The ONNX parts are what assembly merges per query; the validation logits are what the
accuracy of any composite task is computed from without running a model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
from poe_core.nets import BranchedModel, ExpertHead, Library, WRNSpec, count_flops, count_params
from poe_core.taxonomy import Taxonomy

FORMAT_VERSION = 1
LIBRARY_OUTPUT = "features"
OPSET = 17


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

    def composite_accuracy(self, tasks: Sequence[str]) -> float:
        """Validation accuracy of the composite model, from the cached logits."""
        return composite_accuracy(self.val_logits, self.val_labels, self.taxonomy, tasks)

    def cross_expert_error_share(self, tasks: Sequence[str]) -> float:
        return cross_expert_error_share(self.val_logits, self.val_labels, self.taxonomy, tasks)

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
    return Pool(root, manifest, taxonomy, labels, logits)


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


def onnx_logits(library_onnx: bytes, expert_onnx: Mapping[str, bytes], images: ImageSet,
                mean, std, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Every expert's logits on `images`, computed by onnxruntime on the exported parts,
    so cached figures are those of the very models the service hands out."""
    lib = _ort_session(library_onnx)
    experts = {t: _ort_session(b) for t, b in expert_onnx.items()}
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    out: dict[str, list[np.ndarray]] = {t: [] for t in experts}
    for start in range(0, len(images), batch_size):
        x = images.x[start:start + batch_size].numpy().astype(np.float32) / 255
        feats = lib.run(None, {"input": (x - m) / s})[0]
        for t, sess in experts.items():
            out[t].append(sess.run(None, {LIBRARY_OUTPUT: feats})[0])
    return {t: np.concatenate(v) for t, v in out.items()}


def build_pool(
    out: str | Path, *, library: Library, experts: Mapping[str, ExpertHead], splits: Splits,
    library_spec: WRNSpec, expert_spec: WRNSpec, training: dict | None = None,
    fp16_logits: bool = False, progress: Callable[[str], None] | None = None,
) -> Pool:
    """Write a pool bundle to `out` atomically (a temp directory renamed into place)."""
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
        (tmp / "logits").mkdir()
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
        logits = onnx_logits(library_onnx, expert_onnx, splits.val, splits.mean, splits.std)
        np.save(tmp / "logits" / "val_labels.npy", splits.val.y.numpy().astype(np.int16))
        for task, entry in entries.items():
            np.save(tmp / entry["logits"], logits[task].astype(np.float16 if fp16_logits else np.float32))
        val_labels = splits.val.y
        val_logits = {t: torch.from_numpy(v.astype(np.float32)) for t, v in logits.items()}
        for task, entry in entries.items():
            entry["val_acc"] = composite_accuracy(val_logits, val_labels, taxonomy, [task])

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
                         extra_training: dict | None = None) -> Pool:
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
                      fp16_logits=fp16_logits, progress=progress)
