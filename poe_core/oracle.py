"""The oracle as the students see it: any classifier over the data set's classes.

Two kinds are accepted. A *poe oracle* is a WRN this project trained (a work
directory's `oracle.safetensors` + `oracle.json`, or the copy kept beside a pool); an
*ONNX oracle* is any classifier exported to ONNX, for example an operator's ResNet-50
from another framework, run with onnxruntime. Either maps uint8 images to logits over
its declared classes with its own normalisation, which is all the logit bank needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from poe_core.data import Normalize
from poe_core.device import autocast
from poe_core.files import sha256_file

KINDS = ("poe", "onnx")  # a network of poe_core.nets (any family), or an ONNX classifier
# On a CPU the oracle runs in batches of at most this many images: a WRN-16-(4,4)'s
# activations for 100 CIFAR images stay in cache (147 img/s on a 2-core AMD EPYC, against
# 101 at 500 and 105 at 250; 145 at 50).
CPU_BATCH = 100


class OracleError(ValueError):
    """The file is not a usable oracle for this data set (message says why)."""


@dataclass
class Oracle:
    """A classifier over `classes` (in the data set's order) on images normalised by
    `mean`/`std`; `fingerprint` identifies its weights (the logit bank's key)."""

    kind: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    module: nn.Module | None = None
    session: object | None = None  # onnxruntime.InferenceSession
    input_name: str = "input"
    columns: np.ndarray | None = None  # output column of each data-set class

    @torch.no_grad()
    def logits(self, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """float32 (N, C) logits of uint8 images (N, 3, H, W), on x's device."""
        norm = Normalize(self.mean, self.std, x.device)
        if self.module is not None:
            if x.device.type == "cpu" and len(x) > CPU_BATCH:
                return torch.cat([self.logits(x[s:s + CPU_BATCH], precision) for s in range(0, len(x), CPU_BATCH)])
            with autocast(x.device, precision):
                return self.module(norm(x).contiguous(memory_format=torch.channels_last)).float()
        out = self.session.run(None, {self.input_name: norm(x).cpu().numpy()})[0]
        if self.columns is not None:
            out = out[:, self.columns]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)


def from_module(module: nn.Module, classes: Sequence[str], mean, std, fingerprint: str) -> Oracle:
    return Oracle("poe", list(classes), tuple(mean), tuple(std), fingerprint, module=module.eval())


def load_poe_oracle(weights: Path, classes: Sequence[str], device: torch.device) -> Oracle:
    """A poe network oracle (any family of poe_core.nets) from `<name>.safetensors`
    beside its `<name>.json` (architecture, normalisation)."""
    from safetensors.torch import load_file

    from poe_core.nets import Network, spec_from_dict

    info_path = weights.with_suffix(".json")
    if not info_path.is_file():
        raise OracleError(f"{weights}: a poe oracle needs its {info_path.name} beside it")
    info = json.loads(info_path.read_text())
    norm = info.get("normalization")
    if not norm:
        raise OracleError(f"{info_path} does not say the normalisation the oracle was trained with")
    model = Network(spec_from_dict(info["architecture"]), len(classes))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise OracleError(f"{weights} is not a WRN over {len(classes)} classes: {str(e).splitlines()[0]}") from e
    model = model.to(device, memory_format=torch.channels_last)
    return from_module(model, classes, norm["mean"], norm["std"], sha256_file(weights))


def load_onnx_oracle(
    path: Path, classes: Sequence[str], oracle_classes: Sequence[str], mean, std,
    image_shape: Sequence[int],
) -> Oracle:
    """An ONNX classifier whose output columns are `oracle_classes`; those must include
    every class of the data set (`classes`), in any order. Checked by running it once."""
    import onnxruntime as ort

    missing = [c for c in classes if c not in set(oracle_classes)]
    if missing:
        raise OracleError(f"the oracle's class list lacks {len(missing)} class(es) of the data set: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise OracleError(f"{path} is not an ONNX model onnxruntime can load: {str(e).splitlines()[0]}") from e
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OracleError(f"{path} has {len(inputs)} inputs; an oracle takes one image batch")
    probe = np.zeros((2, *image_shape), dtype=np.float32)
    try:
        out = session.run(None, {inputs[0].name: probe})[0]
    except Exception as e:
        raise OracleError(f"{path} does not run on a (N, {', '.join(map(str, image_shape))}) float batch: "
                          f"{str(e).splitlines()[0]}") from e
    if out.ndim != 2 or out.shape != (2, len(oracle_classes)):
        raise OracleError(f"{path} outputs shape {list(out.shape)} for 2 images; a classifier over the "
                          f"{len(oracle_classes)} declared classes outputs [2, {len(oracle_classes)}]")
    index = {c: i for i, c in enumerate(oracle_classes)}
    columns = np.array([index[c] for c in classes])
    identity = len(oracle_classes) == len(classes) and (columns == np.arange(len(classes))).all()
    return Oracle("onnx", list(classes), tuple(mean), tuple(std), sha256_file(path), session=session,
                  input_name=inputs[0].name, columns=None if identity else columns)


def read_class_list(path: Path) -> list[str]:
    """A JSON list of class names, or one name per line."""
    text = path.read_text()
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise OracleError(f"{path}: the oracle's classes must be a JSON list of names or one name per line")
    if len(set(names)) != len(names):
        raise OracleError(f"{path}: the oracle's class list names a class twice")
    return names
