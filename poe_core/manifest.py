"""The pool manifest: one typed model, written by poe_core.build and read by poe_core.pool.

Format 3 (this version) states every file of every part in every weight format
explicitly; nothing is derived from another path. A part is a network piece exported
once to ONNX: the library (input -> features), an expert at one width (features ->
logits over its task's classes) or the library student's own head (features -> logits
over all classes, the SMART "mask" baseline). Its fp32 files sit at the top of the
entry, those of the other formats under `formats`:

    {"weights": "experts/000-fish@0.25.safetensors", "onnx": "onnx/experts/000-fish@0.25.onnx",
     "onnx_bytes": 53339, "logits": "logits/000-fish@0.25.npy", "val_acc": 0.61,
     "params": 12309, "flops": 770128,
     "formats": {"fp16": {"logits": "logits/fp16/000-fish@0.25.npy", "val_acc": 0.61},
                 "int8": {"onnx": "onnx/int8/experts/000-fish@0.25.onnx", "onnx_bytes": 30490,
                          "logits": "logits/int8/000-fish@0.25.npy", "val_acc": 0.60}}}

fp16 has no ONNX file of its own: the Assembler derives it from the fp32 part. An expert
lists the part of every width it was trained at (`widths`, keyed by ks as "0.25") and its
default width. Format 2 manifests (one width, int8 library path under `formats.int8`)
are converted on read by `parse_manifest`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)


class ManifestError(ValueError):
    """A manifest this poe cannot read: unknown format version or bad content."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartFiles(_Model):
    """A part's files and validation accuracy in one weight format."""

    onnx: str | None = None  # None: derived from the fp32 ONNX part (fp16)
    onnx_bytes: int | None = None
    logits: str | None = None  # validation logits; the library has none
    val_acc: float | None = None  # task-specific validation accuracy


class Part(_Model):
    weights: str  # safetensors
    onnx: str
    onnx_bytes: int
    params: int
    flops: int  # multiply-accumulates per image (the paper's "FLOPs")
    logits: str | None = None
    val_acc: float | None = None
    formats: dict[str, PartFiles] = {}  # fp16, int8

    def files(self, weights: str) -> PartFiles:
        """The part's files in format `weights` ("fp32" is the top of the entry)."""
        if weights == "fp32":
            return PartFiles(onnx=self.onnx, onnx_bytes=self.onnx_bytes, logits=self.logits, val_acc=self.val_acc)
        return self.formats[weights]


def width_key(ks: float) -> str:
    return f"{ks:g}"


class Expert(_Model):
    classes: list[str]
    width: float  # the default ks
    widths: dict[str, Part]  # every width held, by width_key(ks); includes the default

    def at(self, ks: float | None = None) -> Part:
        return self.widths[width_key(self.width if ks is None else ks)]


class Normalization(_Model):
    mean: list[float]
    std: list[float]


class Oracle(_Model):
    """The oracle kept server-side with its pool, never in a delivered model."""

    weights: str
    # poe: a network of poe_core.nets (any family) in safetensors, its spec in
    # `architecture`; onnx: the operator's ONNX classifier.
    format: Literal["poe", "onnx"]
    classes: list[str]
    normalization: Normalization
    architecture: dict | None = None
    dtype: Literal["fp32", "fp16"] = "fp32"  # of the stored weights; loaded as fp32

    @field_validator("format", mode="before")
    @classmethod
    def _poe_network(cls, value):
        # Earlier pools wrote "poe-wrn" for every poe network, a MobileNetV2 too.
        return "poe" if value == "poe-wrn" else value


class Dataset(_Model):
    name: str
    image_shape: list[int]  # the model input (C, H, W)
    # How a photo becomes that input, for photo data sets (poe_core.data.load_photo):
    # {"resize_shorter_side": R, "center_crop": S}; None: the images are stored at that size.
    preprocess: dict | None = None
    val_images: int
    train_images: int


class Architecture(_Model):
    library: dict  # the library student's spec, poe_core.nets (to_dict): family, split point, widths
    expert: dict  # the experts' spec at the default width (same family; MobileNetV2: same split)
    widths: list[float]  # every expert width (ks) the pool holds
    library_channels: int
    opset: int
    input: str
    library_output: str

    @property
    def family(self) -> str:
        """The architecture family (poe_core.nets.FAMILIES); pools of WRNs do not say it."""
        return self.library.get("family", "wrn")


class FormatPolicy(_Model):
    """Whether the pool offers a weight format, and why not."""

    model_config = ConfigDict(extra="allow", frozen=True)  # build figures: method, timings

    available: bool
    reason: str | None = None
    val_acc_drop: dict | None = None


class Manifest(_Model):
    format_version: Literal[3] = FORMAT_VERSION
    pool_id: str
    created: str
    dataset: Dataset
    taxonomy: dict
    normalization: Normalization
    architecture: Architecture
    library: Part
    experts: dict[str, Expert]
    student: Part | None = None  # the library student's head over all classes
    oracle: Oracle | None = None
    formats: dict[str, FormatPolicy]
    val_labels: str
    training: dict
    export_seconds: float
    files: dict[str, str]  # path -> sha256 of every file but the manifest


def pool_id(raw: Mapping) -> str:
    """The pool's id: a hash of the manifest's content without the id itself."""
    body = {k: v for k, v in raw.items() if k != "pool_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def parse_manifest(raw: Mapping) -> Manifest:
    """The typed manifest of a stored one, of any readable format version."""
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ManifestError(f"pool format {version!r} is not supported (this poe reads formats "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
    try:
        return Manifest.model_validate(_from_v2(raw) if version == 2 else raw)
    except ValidationError as e:
        raise ManifestError(f"the manifest of format {version} does not match its schema: {e}") from None


def _from_v2(raw: Mapping) -> dict:
    """Format 2: one width per expert, stored flat in the entry; the int8 library under
    formats.int8; no student head."""
    m = copy.deepcopy(dict(raw))
    ks = m["architecture"]["expert"]["ks"]
    m["format_version"] = FORMAT_VERSION
    m["architecture"]["widths"] = [ks]
    int8 = m["formats"]["int8"]
    m["library"]["formats"] = {"fp16": {}, "int8": {"onnx": int8.pop("library_onnx"),
                                        "onnx_bytes": int8.pop("library_onnx_bytes")}}
    m["experts"] = {task: {"classes": e.pop("classes"), "width": ks, "widths": {width_key(ks): e}}
                    for task, e in m["experts"].items()}
    return m
