"""Feature caching in the UNet's graphs (DeepCache, Ma et al. 2023): a `full` graph that also outputs
the deep feature, and a `shallow` graph that takes it in and computes only what lies outside it.

The deep feature is the input of the last up block's last layer (its resnet and transformer): what
the whole network below that layer produced. The shallow graph keeps conv_in, the time embedding,
that last layer (fed the cached feature and conv_in's skip connection) and conv_out; everything else
is dead and goes. This is DeepCache's shallowest branch (the A1111 and ComfyUI ports' level 0).

Both are graph-only rewrites of an existing UNet graph: they keep its initializer names and point at
its weights file, so no weights are copied. Any UNet graph works (the standard one, a target's
rewrite, the int8 QDQ graph): the feature is found by name, which the rewrites keep.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnx import helper

from sdrt.errors import SdrtError
from sdrt.kernels import target_file
from sdrt.kernels.graph import Graph, load_graph_only, module_scopes, node_inputs, save_graph_only

FEATURE = "cached_feature"  # the full graph's extra output, the shallow graph's extra input
FULL, SHALLOW = "full", "shallow"  # file suffixes: unet/model.full.onnx, unet/model.shallow.onnx


def feature_name(model: onnx.ModelProto) -> str:
    """The deep feature's value name in a UNet graph torch's dynamo exporter wrote (its nodes carry
    their module scopes): the first input of the Concat that feeds the last up block's last resnet."""
    layers: dict[tuple[int, int], list] = {}
    for node in model.graph.node:
        for scope in module_scopes(node):
            m = re.fullmatch(r"(?:unet\.)?up_blocks\.(\d+)\.resnets\.(\d+)", scope)
            if m:
                layers.setdefault((int(m[1]), int(m[2])), []).append(node)
    if not layers:
        raise SdrtError("no up-block resnets found by their module scopes (not a UNet graph from torch's exporter?)")
    last = layers[max(layers)]
    inside = {o for n in last for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in last:
        for i in n.input:
            p = producer.get(i)
            if i not in inside and p is not None and p.op_type == "Concat":
                return p.input[0]
    raise SdrtError(f"the last up-block resnet {max(layers)} reads no skip Concat")


def _value_type(graph: Graph, name: str) -> int:
    return graph.types.get(name) or graph.types[graph.g.output[0].name]


def split(model: onnx.ModelProto, feature: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(full, shallow) from a UNet graph (without its weights loaded) and its deep feature's name."""
    g = Graph(model)
    if feature not in g.producer:
        raise SdrtError(f"the graph has no value {feature!r} to cache")
    dtype = _value_type(g, feature)
    sample = g.shapes.get(g.g.input[0].name) or ["B", None, "h", "w"]
    shape = [sample[0], None, sample[2], sample[3]]
    value = helper.make_tensor_value_info(FEATURE, dtype, shape)

    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.node.append(helper.make_node("Identity", [feature], [FEATURE], name="sdrt_cached_feature"))
    full.graph.output.append(value)

    shallow = onnx.ModelProto()
    shallow.CopyFrom(model)
    s = Graph(shallow)
    for node in s.nodes:
        node.input[:] = [FEATURE if i == feature else i for i in node.input]
    s.commit()
    s.g.input.append(value)
    s.remove_dead()
    s.commit()
    used = {i for n in s.nodes for i in node_inputs(n)}
    for inp in [i for i in s.g.input if i.name not in used]:  # initializers listed as inputs (Winograd graphs)
        s.g.input.remove(inp)
    return full, shallow


def pair_files(model_file: str) -> tuple[str, str]:
    """unet/model.onnxruntime-cpu.onnx -> (unet/model.onnxruntime-cpu.full.onnx, ...shallow.onnx)"""
    return target_file(model_file, FULL), target_file(model_file, SHALLOW)


def write_pair(src: Path, feature: str) -> tuple[Path, Path, list[str], str]:
    """Write SRC's full and shallow graphs beside it (sharing its weights file); return their paths,
    the names of the initializers the shallow graph keeps, and the feature's dtype (a NumPy name)."""
    full, shallow = split(load_graph_only(src), feature)
    full_name, shallow_name = pair_files(src.name)
    save_graph_only(full, src.parent / full_name)
    save_graph_only(shallow, src.parent / shallow_name)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(full.graph.output[-1].type.tensor_type.elem_type).name
    return src.parent / full_name, src.parent / shallow_name, [t.name for t in shallow.graph.initializer], dtype
