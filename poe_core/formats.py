"""Mobile-ready formats of the pool's ONNX parts and of assembled models.

Weight formats, all merged by the same byte concatenation (see poe_core.assemble):

    fp32  the parts as exported once from PyTorch
    fp16  float16 initializers cast back to float32 in the graph: half the bytes, the same
          fp32 arithmetic on every runtime; derived from the fp32 parts, nothing stored
    int8  onnxruntime static quantization in QDQ form (int8 per-channel weights, int8
          activations, MinMax calibration), one part at a time at pool build time: the
          library on training images, every expert on the fp32 library features of those
          images. The QDQ pairs sit inside each part, so a merge of int8 parts is an int8
          composite model that onnxruntime fuses into integer kernels.

The ORT format (for onnxruntime-mobile) is a whole-model conversion, done per query by
onnxruntime itself (`to_ort`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

FORMATS = ("fp32", "fp16", "int8")
INT8_METHOD = "onnxruntime static QDQ, per-channel int8 weights, int8 activations, MinMax calibration"
# The official converter (onnxruntime.tools.convert_onnx_models_to_ort) drops this layout
# transformer for every target but amd64: its NCHWc kernels do not exist on ARM phones.
ORT_DISABLED_OPTIMIZERS = ["NchwcTransformer"]


class Unavailable(ValueError):
    """A capability this pool does not offer (a weight format, expert widths, the mask
    baseline), with the reason why."""


class FormatUnavailable(Unavailable):
    """A weight format this pool does not offer, with the reason why."""


def check_format(weights: str) -> None:
    if weights not in FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; use {', '.join(FORMATS)}")


def fp16_weights(graph: onnx.GraphProto) -> onnx.GraphProto:
    """Store float initializers as float16 and cast them back to float32 in the graph:
    half the bytes, the same fp32 arithmetic on every runtime."""
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    casts = []
    for tensor in out.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            continue
        name = tensor.name
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), name + "/fp16")
        tensor.CopyFrom(half)
        casts.append(helper.make_node("Cast", [name + "/fp16"], [name], name=name + "/cast",
                                      to=TensorProto.FLOAT))
    nodes = list(out.node)
    del out.node[:]
    out.node.extend(casts + nodes)
    return out


def fp16_model(model_bytes: bytes) -> bytes:
    """A whole part (or model) with fp16 weights, as `fp16_weights` makes them."""
    model = onnx.load_from_string(model_bytes)
    model.graph.CopyFrom(fp16_weights(model.graph))
    return model.SerializeToString()


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, data: np.ndarray, batch_size: int) -> None:
        self._batches = iter([{input_name: data[i:i + batch_size]} for i in range(0, len(data), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger for every model."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(model_bytes: bytes, input_name: str, calibration: np.ndarray, batch_size: int = 64) -> bytes:
    """One part quantized to int8 QDQ, activation ranges calibrated on `calibration`
    (float32 inputs of the part)."""
    with tempfile.TemporaryDirectory(prefix="poe-int8-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            onnx.load_from_string(model_bytes), out,
            _Batches(input_name, np.ascontiguousarray(calibration, np.float32), batch_size),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )
        return out.read_bytes()


def to_ort(model_bytes: bytes) -> bytes:
    """The ORT format of an ONNX model, for onnxruntime-mobile: onnxruntime loads it with
    the optimisations of the official converter's default (all levels, no NCHWc) and
    saves the optimised graph as a flatbuffer."""
    with tempfile.TemporaryDirectory(prefix="poe-ort-") as tmp:
        out = Path(tmp) / "model.ort"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(out)
        opts.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
        return out.read_bytes()
