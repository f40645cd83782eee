"""Train-free consolidation: merge the pool's ONNX parts into one composite model.

The parts are exported once, when the pool is built. Here they are renamed once per
pool (every expert's names get the prefix "<task>/", its input is wired to the
library's features) and kept as serialized GraphProto fragments. Protobuf parses a
concatenation of serialized messages as their merge (repeated fields append), so the
graph of a composite model is the byte concatenation

    library fragment + expert fragments in request order + a small tail

where the tail carries the graph's input and outputs, the Concat, the Gather of the
requested classes when a query names classes (see poe_core.query), the Softmax and the
"none of these" rule when asked for (see poe_core.reject), and the graph name; the
model wraps that graph with a pre-serialized header and the metadata. Assembly is
therefore a few small writes, never a torch.onnx.export: the model is that list of
pieces (AssembledModel.chunks), the prepared fragments not even copied until the bytes
are joined (AssembledModel.data). Every expert width and every
weight format the pool offers (fp32, fp16, int8: see poe_core.formats) has its own
fragments, all prepared when the Assembler is built. An expert's names are prefixed by
its task only, whatever its width: a model holds one width per task, and the tail does
not depend on the widths. The "mask" method merges the library with the student head
(prefix "student/") instead of experts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import onnx
from onnx import TensorProto, helper

from poe_core.formats import FORMATS, FormatUnavailable, fp16_weights
from poe_core.pool import LIBRARY_OUTPUT, QUERY_MEMO, STUDENT, Pool, part_key
from poe_core.query import Query
from poe_core.reject import RejectRule, reject_nodes

__all__ = ["AssembledModel", "Assembler", "FormatUnavailable", "PlainPieces", "prefix_graph"]

GRAPH_FIELD = 7  # ModelProto.graph
INPUT_NAME = "input"
ACCEPTED = "accepted"
WIDTHS_KEY = "poe.widths"


@dataclass(frozen=True)
class AssembledModel:
    """A composite model: its ONNX file is `chunks` end to end, the shared, prepared
    fragments among them as they are (not copied: a server can write them out with one
    writev); `data` joins them, once, when asked."""

    chunks: tuple[bytes, ...]
    tasks: tuple[str, ...]
    labels: tuple[str, ...]
    output: str  # "logits" or "probabilities"
    weights: str  # "fp32", "fp16" or "int8"
    widths: tuple[float, ...] = ()  # ks of each task's expert ("poe")
    method: str = "poe"  # or "mask"
    reject: RejectRule | None = None

    @cached_property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @cached_property
    def size(self) -> int:
        return sum(map(len, self.chunks))


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


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL_VARINTS = [_encode_varint(n) for n in range(1 << 14)]  # every one- and two-byte varint


def _varint(n: int) -> bytes:
    """n as a protobuf varint (a table lookup for the small ones every assembly writes)."""
    if n < 1 << 14:
        return _SMALL_VARINTS[n]
    if n < 1 << 21:  # the length of a model's graph, up to 2 MB
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    return _encode_varint(n)


_GRAPH_TAG = _varint(GRAPH_FIELD << 3 | 2)  # ModelProto.graph, length-delimited


class Assembler:
    """Assembles composite models from one pool; build it once per pool and reuse it."""

    def __init__(self, pool: Pool, pool_version: str | None = None) -> None:
        self.pool = pool
        self.pool_version = pool_version
        self._headers: dict[str, bytes] = {}
        self._fragments: dict[str, dict[str, bytes]] = {}
        spec = pool.spec
        sources = {"library": spec.library} | {part_key(t, float(w)): p for t, e in spec.experts.items()
                                               for w, p in e.widths.items()}
        if spec.student is not None:
            sources[STUDENT] = spec.student
        loaded: dict[str, dict[str, onnx.ModelProto]] = {}
        for weights in FORMATS:
            if not pool.format_info(weights)["available"]:
                continue
            stored = "int8" if weights == "int8" else "fp32"  # fp16 is derived from fp32
            if stored not in loaded:
                loaded[stored] = {k: onnx.load_model(str(pool.path(p.files(stored).onnx))) for k, p in sources.items()}
            parts = loaded[stored]
            graphs = {k: prefix_graph(part.graph, f"{_prefix(k)}/", _keep(k)) for k, part in parts.items()}
            if weights == "fp16":
                graphs = {k: fp16_weights(g) for k, g in graphs.items()}
            self._headers[weights] = _header(list(parts.values()))
            self._fragments[weights] = {k: _fragment(g) for k, g in graphs.items()}
        channels, height, width = pool.image_shape
        self._input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                    ["batch", channels, height, width])
        self._prepare_tail_and_metadata()

    def fragments(self, weights: str) -> dict[str, bytes]:
        """The serialized, renamed parts in format `weights`, by "library", part key
        ("<task>@<ks>", see poe_core.pool.part_key) or "student"."""
        self.pool.require_format(weights)
        return self._fragments[weights]

    def assemble(self, query: Query | Sequence[str], *, softmax: bool = False, weights: str = "fp32",
                 reject: RejectRule | None = None, reject_output: bool = False) -> AssembledModel:
        """The model answering `query` (a Query from pool.query, or a list of task
        names), as an ONNX file in pieces (`chunks`; `data` joins them). `reject` (from
        pool.reject_rule) goes into the metadata as poe.reject; `reject_output` also
        computes it in the graph, as the output `accepted` (one bool per image)."""
        q = query if isinstance(query, Query) else self.pool.query(query)
        if reject_output and reject is None:
            raise ValueError("reject_output needs the query's reject rule (pool.reject_rule(query, weights))")
        pieces = self._of_query(q)
        output = "probabilities" if softmax else "logits"
        chunks = tuple(self._pieces(q, weights, output, reject, reject_output, pieces))
        return AssembledModel(chunks, q.tasks, pieces.labels, output, weights, q.widths, q.method, reject)

    def plain_pieces(self) -> PlainPieces:
        """What every plain model (whole tasks in sorted order, method poe, every expert at
        the pool's default width, no reject output) is joined from, for a native
        assembler to join the same bytes as `assemble` (app/_lane.c): the file is

            headers[weights] + varint(graph length)
            + fragments[weights]["library"] + the tasks' fragments
            + field 1 (the tasks' concat inputs + concat_rest) + softmax_field if asked
            + field 2 ("poe_" + "+".join(tasks)[:200]) + input_field + output_field(output, classes)
            + metadata: poe.labels, poe.tasks, poe.task_classes (JSON from the pieces below),
              choice_entries[output, weights], poe.widths where the pool has several widths,
              version_entry

        (see _query_pieces, _tail and _metadata: this is their plain case, spelled out)."""
        taxonomy, width = self.pool.taxonomy, float(self.pool.default_width)
        return PlainPieces(
            headers={w: h + _GRAPH_TAG for w, h in self._headers.items()},
            fragments={w: {"library": f["library"], **{t: f[part_key(t, width)] for t in taxonomy.task_names}}
                       for w, f in self._fragments.items()},
            concat_inputs=dict(self._concat_inputs), concat_rest=self._concat_rest["logits"],
            softmax_field=self._softmax_field, input_field=self._input_field,
            labels={t: ", ".join(self._class_json[c] for c in taxonomy.tasks[t]) for t in taxonomy.task_names},
            task_json=dict(self._task_json), task_classes=dict(self._task_classes_json),
            width_items={t: f"{self._task_json[t]}: {json.dumps(width)}" for t in taxonomy.task_names},
            widths_entry=len(self.pool.widths) > 1, pool_entries=self._pool_entries,
            choice_entries=dict(self._choice_entries), version_entry=self._version_entry)

    def output_field(self, output: str, classes: int) -> bytes:
        """The graph's output field for `output` over `classes` classes."""
        return self._output_field(output, classes)

    def sizes(self, q: Query, choices: Sequence[Sequence[float]], weights: str = "fp32") -> list[int]:
        """Bytes of the plain model (logits, no reject output) for `q` at each choice of
        expert widths, from one assembly: only the expert fragments and the poe.widths
        entry change with the widths (the tail names experts by task)."""
        header, tag, _, *graph, meta = self._pieces(q, weights, "logits", None, False)
        fragments = self.fragments(weights)
        widths = self.pool.widths
        column = {w: j for j, w in enumerate(widths)}
        picks = np.array([[column[w] for w in c] for c in choices], dtype=np.int64).reshape(len(choices), len(q.tasks))
        rows = np.arange(len(q.tasks))[None, :]
        length = np.array([[len(fragments[part_key(t, w)]) for w in widths] for t in q.tasks], dtype=np.int64)
        # The poe.widths value is JSON: its length changes by the length of each width's number.
        number = np.array([len(json.dumps(w)) for w in widths], dtype=np.int64)
        mine = np.array([column[w] for w in q.widths], dtype=np.int64)
        experts = length[rows, picks].sum(1)
        graph_bytes = sum(map(len, graph)) - int(length[rows[0], mine].sum()) + experts
        if len(widths) > 1:  # else no poe.widths entry
            other_value = len(_widths_json(q.tasks, q.widths).encode()) - int(number[mine].sum())
            values = other_value + number[picks].sum(1)
            entry = {v: _entry_size(WIDTHS_KEY, v) for v in np.unique(values).tolist()}
            other_meta = len(meta) - _entry_size(WIDTHS_KEY, other_value + int(number[mine].sum()))
            meta_bytes = [other_meta + entry[v] for v in values.tolist()]
        else:
            meta_bytes = [len(meta)] * len(choices)
        fixed = len(header) + len(tag)
        return [fixed + len(_varint(g)) + g + m for g, m in zip(graph_bytes.tolist(), meta_bytes, strict=True)]

    def _pieces(self, q: Query, weights: str, output: str, reject: RejectRule | None,
                reject_output: bool, pieces: _QueryPieces | None = None) -> list[bytes]:
        pieces = pieces or self._of_query(q)
        fragments = self._fragments.get(weights) or self.fragments(weights)
        graph = [fragments["library"], *[fragments[k] for k in pieces.heads],
                 self._tail(q, output, reject if reject_output else None, pieces)]
        return [self._headers[weights], _GRAPH_TAG, _varint(sum(map(len, graph))), *graph,
                self._metadata(q, output, weights, reject, pieces)]

    def _tail(self, q: Query, output: str, reject: RejectRule | None, pieces: _QueryPieces | None = None) -> bytes:
        if reject is not None:
            return self._write_tail(q, output, reject)
        # _write_tail(q, output, None), from what it writes for the query alone.
        pieces = pieces or self._of_query(q)
        return b"".join((pieces.tail_nodes, self._softmax_field if output == "probabilities" else b"",
                         pieces.tail_rest, self._output_field(output, len(q.classes))))

    def _write_tail(self, q: Query, output: str, reject: RejectRule | None) -> bytes:
        """The GraphProto fields closing the graph, written field by field: the Concat
        (its per-task inputs and its fixed rest prepared when the Assembler is built), the
        Gather, Softmax and reject rule when asked for, the name, the input and outputs."""
        nodes, initializers, outputs = self._tail_parts(q, output, reject)
        # GraphProto: node 1, name 2, initializer 5, input 11, output 12, in field order as
        # protobuf writes them.
        return b"".join([*(_field(1, n) for n in nodes), _field(2, _graph_name(q)),
                         *(_field(5, t) for t in initializers), self._input_field, *(_field(12, o) for o in outputs)])

    def _tail_parts(self, q: Query, output: str, reject: RejectRule | None
                    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The tail's nodes, initializers and outputs, each serialized."""
        gather = q.gathers(self.pool.taxonomy)
        nodes, initializers = [], []
        if q.method == "mask":
            source = f"{STUDENT}/logits"
        else:
            source = "concat" if gather else "logits"
            nodes.append(b"".join([*(self._concat_inputs[t] for t in q.tasks), self._concat_rest[source]]))
        if gather:
            initializers.append(helper.make_tensor("gather/indices", TensorProto.INT64, [len(q.classes)],
                                                   list(q.columns(self.pool.taxonomy))).SerializeToString())
            nodes.append(helper.make_node("Gather", [source, "gather/indices"], ["logits"], name="gather",
                                          axis=1).SerializeToString())
        if output == "probabilities":
            nodes.append(self._softmax)
        outputs = [self._output(output, len(q.classes))]
        if reject is not None:
            extra_nodes, extra_initializers = reject_nodes(reject, "logits", ACCEPTED)
            nodes.extend(n.SerializeToString() for n in extra_nodes)
            initializers.extend(t.SerializeToString() for t in extra_initializers)
            outputs.append(self._accepted)
        return nodes, initializers, outputs

    def _output_field(self, output: str, classes: int) -> bytes:
        key = (output, classes)
        found = self._output_fields.get(key)
        if found is None:
            found = self._output_fields[key] = _field(12, self._output(output, classes))
        return found

    def _output(self, output: str, classes: int) -> bytes:
        key = (output, classes)
        found = self._outputs.get(key)
        if found is None:
            found = self._outputs[key] = helper.make_tensor_value_info(
                output, TensorProto.FLOAT, ["batch", classes]).SerializeToString()
        return found

    def _metadata(self, q: Query, output: str, weights: str, reject: RejectRule | None,
                  pieces: _QueryPieces | None = None) -> bytes:
        """ModelProto.metadata_props, written entry by entry; the JSON values are joined
        from pieces json.dumps wrote for each class and task when the Assembler was
        built, so they are byte for byte json.dumps of the whole."""
        pieces = pieces or self._of_query(q)
        props = [pieces.entries, self._pool_entries, self._choice_entries[output, weights], pieces.method_entries]
        if reject is not None:
            props.append(_entry("poe.reject", reject.to_json()))
        props.append(self._version_entry)
        return b"".join(props)

    def _query_pieces(self, q: Query) -> _QueryPieces:
        """What an assembly takes from the query alone, whatever the file's options."""
        entries = b"".join([
            _entry("poe.labels", "[" + ", ".join([self._class_json[c] for c in q.classes]) + "]"),
            _entry("poe.tasks", "[" + ", ".join([self._task_json[t] for t in q.tasks]) + "]"),
            _entry("poe.task_classes", "{" + ", ".join([self._task_classes_json[t] for t in q.tasks]) + "}"),
        ])
        # Keys of the newer capabilities appear only where they say something, so that
        # a plain query's bytes stay those of earlier pools.
        method_entries = b""
        if q.method != "poe":
            method_entries += _entry("poe.method", q.method)
        if len(self.pool.widths) > 1 and q.method == "poe":
            method_entries += _entry(WIDTHS_KEY, _widths_json(q.tasks, q.widths))
        heads = (STUDENT,) if q.method == "mask" else tuple(map(part_key, q.tasks, q.widths))
        # The tail of a plain model (no reject output) but its Softmax and output, as
        # _write_tail writes it: the fields before the Softmax node, those between it and the output.
        nodes, initializers, _ = self._tail_parts(q, "logits", None)
        tail_nodes = b"".join([_field(1, n) for n in nodes])
        tail_rest = b"".join([_field(2, _graph_name(q)), *(_field(5, t) for t in initializers), self._input_field])
        return _QueryPieces(tuple(self.pool.taxonomy.classes[c] for c in q.classes), heads, entries, method_entries,
                            tail_nodes, tail_rest)

    def _prepare_tail_and_metadata(self) -> None:
        """The pieces of every tail and metadata that do not depend on the query, and
        memos of those that depend on it but not on the file's options (a composite task
        asked again in another format or output writes them once)."""
        self._of_query = lru_cache(maxsize=QUERY_MEMO)(self._query_pieces)
        pool, taxonomy = self.pool, self.pool.taxonomy
        tasks = taxonomy.task_names
        self._concat_inputs = {t: _field(1, f"{t}/logits".encode()) for t in tasks}
        # A NodeProto's inputs are its field 1, written first: the rest follows as it would.
        self._concat_rest = {source: helper.make_node("Concat", [], [source], name="concat",
                                                      axis=1).SerializeToString()
                             for source in ("concat", "logits")}
        self._softmax = helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax",
                                         axis=1).SerializeToString()
        self._input_field = _field(11, self._input.SerializeToString())
        self._accepted = helper.make_tensor_value_info(ACCEPTED, TensorProto.BOOL, ["batch"]).SerializeToString()
        self._outputs: dict[tuple[str, int], bytes] = {}
        self._output_fields: dict[tuple[str, int], bytes] = {}
        self._softmax_field = _field(1, self._softmax)
        self._class_json = [json.dumps(c) for c in taxonomy.classes]
        self._task_json = {t: json.dumps(t) for t in tasks}
        self._task_classes_json = {t: f"{json.dumps(t)}: {json.dumps(taxonomy.class_names(t))}" for t in tasks}
        # A photo pool also says how a photo was made its input (no key for other pools,
        # whose bytes stay those of before).
        self._pool_entries = b"".join([
            _entry("poe.input", json.dumps({"name": INPUT_NAME, "layout": "NCHW", "color": "RGB",
                                            "shape": ["batch", *pool.image_shape],
                                            "scale": "pixel / 255, then (x - mean) / std",
                                            **(pool.spec.dataset.preprocess or {})})),
            _entry("poe.mean", json.dumps(pool.mean)),
            _entry("poe.std", json.dumps(pool.std)),
        ])
        self._choice_entries = {(output, weights): _entry("poe.output", output) + _entry("poe.weights", weights)
                                + _entry("poe.pool_id", pool.pool_id)
                                for output in ("logits", "probabilities") for weights in FORMATS}
        self._version_entry = b"" if self.pool_version is None else _entry("poe.pool_version",
                                                                           str(self.pool_version))


@dataclass(frozen=True)
class PlainPieces:
    """See Assembler.plain_pieces; JSON pieces as text, the rest serialized."""

    headers: dict[str, bytes]  # per weight format the pool offers: ModelProto without graph + the graph's tag
    fragments: dict[str, dict[str, bytes]]  # per format: "library" and each task's expert at the default width
    concat_inputs: dict[str, bytes]
    concat_rest: bytes
    softmax_field: bytes
    input_field: bytes
    labels: dict[str, str]  # per task: its classes' JSON strings, ", "-joined
    task_json: dict[str, str]
    task_classes: dict[str, str]  # '"<task>": [<its class names>]'
    width_items: dict[str, str]  # '"<task>": <default width>'
    widths_entry: bool
    pool_entries: bytes
    choice_entries: dict[tuple[str, str], bytes]  # per (output, weights)
    version_entry: bytes


@dataclass(frozen=True)
class _QueryPieces:
    labels: tuple[str, ...]  # the output classes' names
    heads: tuple[str, ...]  # the parts after the library, by part key
    entries: bytes  # poe.labels, poe.tasks, poe.task_classes
    method_entries: bytes  # poe.method and poe.widths, where they say something
    tail_nodes: bytes  # the plain tail's nodes before the Softmax: Concat, Gather
    tail_rest: bytes  # its name, initializers and input, between the Softmax and the output


def _graph_name(q: Query) -> bytes:
    return (("mask_" if q.method == "mask" else "poe_") + "+".join(q.tasks)[:200]).encode()


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return b"".join((_SMALL_VARINTS[number << 3 | 2], _varint(len(payload)), payload))


def _entry(key: str, value: str) -> bytes:
    """One ModelProto.metadata_props entry (field 14; StringStringEntryProto key 1, value 2)."""
    return _field(14, _field(1, key.encode()) + _field(2, value.encode()))


def _entry_size(key: str, value_bytes: int) -> int:
    """Serialized size of one metadata entry whose value is `value_bytes` long."""
    return len(_entry(key, "0" * value_bytes))


def _widths_json(tasks: Sequence[str], widths: Sequence[float]) -> str:
    return json.dumps(dict(zip(tasks, widths, strict=True)))


def _prefix(part: str) -> str:
    """The name prefix of a part in the merged graph: an expert's task, whatever its width."""
    return part.rsplit("@", 1)[0] if part not in ("library", STUDENT) else part


def _keep(part: str) -> dict[str, str]:
    """The names a part shares with the rest of the graph: the input, the library features."""
    features = "library/" + LIBRARY_OUTPUT
    return {INPUT_NAME: INPUT_NAME, LIBRARY_OUTPUT: features} if part == "library" else {LIBRARY_OUTPUT: features}
