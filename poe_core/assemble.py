"""Train-free consolidation: merge the pool's ONNX parts into one composite model.

The parts are exported once, when the pool is built. Here they are renamed once per
pool (every expert's names get the prefix "<task>/", its input is wired to the
library's features) and kept as serialized GraphProto fragments. Protobuf parses a
concatenation of serialized messages as their merge (repeated fields append), so the
graph of a composite model is the byte concatenation

    library fragment + expert fragments in request order + a small tail

where the tail carries the graph's input and output, the Concat (and Softmax) and the
graph name; the model wraps that graph with a pre-serialized header and the metadata.
Assembly is therefore a few memory copies, never a torch.onnx.export. Every weight
format the pool offers (fp32, fp16, int8: see poe_core.formats) has its own fragments,
all prepared when the Assembler is built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from poe_core.formats import FORMATS, FormatUnavailable, fp16_weights
from poe_core.pool import LIBRARY_OUTPUT, Pool

__all__ = ["AssembledModel", "Assembler", "FormatUnavailable", "prefix_graph"]

GRAPH_FIELD = 7  # ModelProto.graph
INPUT_NAME = "input"


@dataclass(frozen=True)
class AssembledModel:
    data: bytes
    tasks: tuple[str, ...]
    labels: tuple[str, ...]
    output: str  # "logits" or "probabilities"
    weights: str  # "fp32", "fp16" or "int8"


def prefix_graph(graph: onnx.GraphProto, prefix: str, keep: dict[str, str]) -> onnx.GraphProto:
    """A copy of `graph` with every node, tensor and value name prefixed, except the
    names in `keep`, which are mapped to the given names instead."""
    out = onnx.GraphProto()
    out.CopyFrom(graph)

    def rename(name: str) -> str:
        if not name:
            return name
        return keep.get(name, prefix + name)

    for node in out.node:
        node.name = prefix + (node.name or node.op_type)
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for tensor in out.initializer:
        tensor.name = rename(tensor.name)
    for values in (out.input, out.output, out.value_info):
        for v in values:
            v.name = rename(v.name)
    return out


def _fragment(graph: onnx.GraphProto) -> bytes:
    """Nodes and initializers of `graph` as a serialized GraphProto fragment."""
    frag = onnx.GraphProto()
    frag.node.extend(graph.node)
    frag.initializer.extend(graph.initializer)
    frag.value_info.extend(graph.value_info)
    return frag.SerializeToString()


def _header(parts: list[onnx.ModelProto]) -> bytes:
    """A serialized ModelProto without graph: the newest IR version and, per operator
    domain, the newest opset of the parts."""
    opsets: dict[str, int] = {}
    for part in parts:
        for op in part.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    header = onnx.ModelProto(ir_version=max(p.ir_version for p in parts), producer_name="poe",
                             producer_version="1", domain="ai.poe")
    header.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    return header.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Assembler:
    """Assembles composite models from one pool; build it once per pool and reuse it."""

    def __init__(self, pool: Pool, pool_version: str | None = None) -> None:
        self.pool = pool
        self.pool_version = pool_version
        self._headers: dict[str, bytes] = {}
        self._fragments: dict[str, dict[str, bytes]] = {}
        fp32 = self._load_parts(pool.manifest["library"]["onnx"],
                                {t: pool.expert_info(t)["onnx"] for t in pool.tasks})
        for weights in FORMATS:
            if not pool.format_info(weights)["available"]:
                continue
            parts = fp32 if weights != "int8" else self._load_parts(
                pool.format_info("int8")["library_onnx"],
                {t: pool.expert_info(t)["formats"]["int8"]["onnx"] for t in pool.tasks})
            graphs = self._prefixed(parts)
            if weights == "fp16":
                graphs = {k: fp16_weights(g) for k, g in graphs.items()}
            self._headers[weights] = _header(list(parts.values()))
            self._fragments[weights] = {k: _fragment(g) for k, g in graphs.items()}
        channels, height, width = pool.image_shape
        self._input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                    ["batch", channels, height, width])

    def _load_parts(self, library: str, experts: dict[str, str]) -> dict[str, onnx.ModelProto]:
        return {"library": onnx.load_model(str(self.pool.path(library)))} | {
            task: onnx.load_model(str(self.pool.path(rel))) for task, rel in experts.items()}

    @staticmethod
    def _prefixed(parts: dict[str, onnx.ModelProto]) -> dict[str, onnx.GraphProto]:
        features = "library/" + LIBRARY_OUTPUT
        return {name: prefix_graph(part.graph, f"{name}/",
                                   {INPUT_NAME: INPUT_NAME, LIBRARY_OUTPUT: features} if name == "library"
                                   else {LIBRARY_OUTPUT: features})
                for name, part in parts.items()}

    def fragments(self, weights: str) -> dict[str, bytes]:
        """The serialized, renamed parts in format `weights`, by "library" or task name."""
        self.pool.require_format(weights)
        return self._fragments[weights]

    def assemble(self, tasks: Sequence[str], *, softmax: bool = False, weights: str = "fp32") -> AssembledModel:
        """The composite model for `tasks` (validated), as ONNX bytes."""
        tasks = tuple(self.pool.taxonomy.validate(tasks))
        fragments = self.fragments(weights)
        labels = tuple(self.pool.taxonomy.classes[c] for c in self.pool.taxonomy.composite_classes(tasks))
        output = "probabilities" if softmax else "logits"
        graph_bytes = b"".join([fragments["library"], *(fragments[t] for t in tasks),
                                self._tail(tasks, len(labels), output)])
        model_bytes = b"".join([
            self._headers[weights],
            _varint(GRAPH_FIELD << 3 | 2), _varint(len(graph_bytes)), graph_bytes,
            self._metadata(tasks, labels, output, weights),
        ])
        return AssembledModel(model_bytes, tasks, labels, output, weights)

    def _tail(self, tasks: Sequence[str], n_classes: int, output: str) -> bytes:
        tail = onnx.GraphProto(name="poe_" + "+".join(tasks)[:200])
        logits = "logits"
        tail.node.append(helper.make_node("Concat", [f"{t}/logits" for t in tasks],
                                          ["logits"], name="concat", axis=1))
        if output == "probabilities":
            tail.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"],
                                              name="softmax", axis=1))
            logits = "probabilities"
        tail.input.append(self._input)
        tail.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", n_classes]))
        return tail.SerializeToString()

    def _metadata(self, tasks, labels, output, weights) -> bytes:
        pool = self.pool
        props = {
            "poe.labels": json.dumps(list(labels)),
            "poe.tasks": json.dumps(list(tasks)),
            "poe.task_classes": json.dumps({t: pool.taxonomy.class_names(t) for t in tasks}),
            "poe.input": json.dumps({"name": INPUT_NAME, "layout": "NCHW", "color": "RGB",
                                     "shape": ["batch", *pool.image_shape],
                                     "scale": "pixel / 255, then (x - mean) / std"}),
            "poe.mean": json.dumps(pool.mean),
            "poe.std": json.dumps(pool.std),
            "poe.output": output,
            "poe.weights": weights,
            "poe.pool_id": pool.pool_id,
        }
        if self.pool_version is not None:
            props["poe.pool_version"] = str(self.pool_version)
        meta = onnx.ModelProto()
        for key, value in props.items():
            meta.metadata_props.add(key=key, value=value)
        return meta.SerializeToString()
