"""The text encoder's `embeds` graph: the exported graph with its token lookup cut off, so that it
takes token embeddings (B, 77, D) instead of token ids. Textual-inversion vectors then go in as rows
of that input (sdrt.runtime.embeddings) with no re-export. The token table stays in the standard
graph's weights file; the manifest records where (the runtime maps it, read-only)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from sdrt.errors import SdrtError
from sdrt.kernels.graph import Graph, attrs, load_graph_only, save_graph_only

TARGET = "embeds"
IDS, EMBEDS = "input_ids", "inputs_embeds"
_PASS_THROUGH = ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Identity")


def build(src: Path, dst: Path) -> dict:
    """Write SRC's graph taking inputs_embeds to DST; return the token table's record: {"file" (relative
    to SRC's folder), "offset", "shape", "dtype"}. SdrtError when the graph's ids feed anything but the
    lookup and Shape nodes (then the model gets no embeds graph)."""
    model = load_graph_only(src)
    g = Graph(model)
    lookup = next((n for n in g.nodes if n.op_type == "Gather" and n.input[0] in g.initializers
                   and len(g.initializers[n.input[0]].dims) == 2 and _reads_ids(g, n.input[1])), None)
    if lookup is None:
        raise SdrtError(f"{src}: no token-embedding lookup found")
    table = g.initializers[lookup.input[0]]
    record = _table_record(table)
    for n in g.consumers[IDS]:
        if n.op_type == "Shape":  # (batch, length): the first two dims of the embeddings
            n.input[0] = EMBEDS
            if "end" not in attrs(n):
                n.attribute.append(helper.make_attribute("end", 2))
        elif n.op_type not in _PASS_THROUGH:
            raise SdrtError(f"{src}: the token ids also feed a {n.op_type} node")
    for n in g.consumers[lookup.output[0]]:
        n.input[:] = [EMBEDS if i == lookup.output[0] else i for i in n.input]
    old = next(i for i in model.graph.input if i.name == IDS)
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    new = helper.make_tensor_value_info(EMBEDS, table.data_type, [*dims, int(table.dims[1])])
    model.graph.input.remove(old)
    model.graph.input.insert(0, new)
    g.commit()
    g.remove_dead()  # the lookup and the table go (the table stays in the weights file)
    g.commit()
    stale = [v for v in model.graph.value_info if v.name in (lookup.output[0], IDS)]
    for v in stale:
        model.graph.value_info.remove(v)
    save_graph_only(model, dst)
    return record


def _reads_ids(g: Graph, value: str) -> bool:
    """Whether VALUE is the token ids, through reshapes and casts."""
    for _ in range(8):
        if value == IDS:
            return True
        node = g.producer.get(value)
        if node is None or node.op_type not in _PASS_THROUGH:
            return False
        value = node.input[0]
    return False


def _table_record(table: onnx.TensorProto) -> dict:
    ext = {e.key: e.value for e in table.external_data}
    if table.data_location != onnx.TensorProto.EXTERNAL or "location" not in ext:
        raise SdrtError("the token table is not in an external weights file")
    dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(table.data_type)
    if dtype is None:
        raise SdrtError(f"the token table's type {table.data_type} is not float32 or float16")
    return {"file": ext["location"], "offset": int(ext.get("offset", 0)), "shape": [int(d) for d in table.dims],
            "dtype": dtype}
