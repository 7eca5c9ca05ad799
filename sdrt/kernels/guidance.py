"""A UNet graph for guided batches that computes the part both halves share once (`*.guided.onnx`).

With classifier-free guidance every UNet call runs the batch [x; x] with the timesteps [t; t] and
the contexts [uncond; cond]: both halves read the same latents and timestep, and differ only in the
text context. Everything the UNet computes before it first reads the context is therefore the same
for both halves: on SD 1.5 the time embedding and every resnet's projection of it, `conv_in`, the first
resnet (two 3x3 convolutions at the latents' resolution) and the first transformer block's
self-attention (4096 tokens at 512 px), up to the cross-attention's query. The guided graph takes x
and t once (batch N, the context batch 2N), computes those nodes at batch N, and duplicates each
value where a node that also reads the context takes it (`Concat(v, v)` on axis 0, the batch order
diffusers uses). The arithmetic is the same, so the output is the plain graph's on [x; x] up to the
kernels' order of summation (random-sd15: equal bit for bit for the int8 UNet on OpenVINO, within
1.3e-6 for the fp32 one on ONNX Runtime's CPU provider).

How a value is split: a node is shared when every input it reads other than constants is a shared
value (the shared graph inputs start the set); the shared nodes are cloned on the halved inputs.
Values derived from shapes alone (`Shape` and what is computed from it) are not duplicated: the
unshared nodes keep reading them from the original nodes, which now read the doubled inputs, so
batch sizes in Reshape targets stay those of the full batch. The original shared nodes nothing
reads any more are dropped.

Measured on 2 cores of a Xeon with AMX, OpenVINO bf16, random-sd15's int8 UNet at 512 px: 229 nodes
computed once; docs/kernels.md has the step times. The runtime runs the guided graph only for calls
whose halves are equal (sdrt.runtime.backends.guided), and the plain graph for any other.
"""

from __future__ import annotations

from pathlib import Path

from onnx import helper

from sdrt.components import GUIDED_SHARED as SHARED
from sdrt.kernels import target_file
from sdrt.kernels.graph import Graph, load_graph_only, node_inputs, save_graph_only, subgraph_reads, toposort

SUFFIX = "guided"  # unet/model.openvino.onnx -> unet/model.openvino.guided.onnx (sdrt.kernels.target_file)


def share_guided_prefix(graph: Graph, shared: tuple[str, ...] = SHARED) -> int:
    """Rewrite GRAPH to take SHARED once for both halves of its batch (the other inputs and the
    outputs keep the full batch); returns how many nodes now compute at half the batch (0: none,
    GRAPH unchanged)."""
    inputs = {i.name for i in graph.g.input}
    if not set(shared) <= inputs or any(set(shared) & set(subgraph_reads(n)) for n in graph.nodes):
        return 0  # not a UNet's inputs, or a subgraph reads them (renaming inside subgraphs: not done)
    constant = set(graph.initializers)
    halved = set(shared)  # values equal in both halves, computed at half the batch
    shape_only = set()  # of those, values computed from shapes alone
    half = {name: name for name in shared}  # value -> its half-batch twin
    clones = []
    for node in graph.nodes:
        reads = [i for i in node_inputs(node) if i and i not in constant]
        if not reads:
            constant.update(o for o in node.output if o)  # Constant nodes, weights' DequantizeLinear
            continue
        if not all(i in halved for i in reads) or subgraph_reads(node):
            continue  # nodes with subgraphs stay at the full batch
        outputs = [o for o in node.output if o]
        halved.update(outputs)
        if node.op_type == "Shape" or all(i in shape_only for i in reads):
            shape_only.update(outputs)
        clone = helper.make_node(node.op_type, [half.get(i, i) for i in node.input],
                                 [graph.fresh(f"{o}_half") if o else "" for o in node.output],
                                 name=graph.fresh(node.name or node.op_type), domain=node.domain)
        clone.attribute.extend(node.attribute)
        clone.metadata_props.extend(node.metadata_props)
        half.update({o: c for o, c in zip(node.output, clone.output, strict=True) if o})
        clones.append(clone)
    edits = []  # (node, input index, value), where an unshared node reads a shared value
    for node in graph.nodes:
        if not any(o in halved for o in node.output):
            edits += [(node, k, name) for k, name in enumerate(node.input)
                      if name in halved and name not in shape_only]
    if all(name in shared for _, _, name in edits):  # nothing computed from the shared inputs is used
        return 0
    # the graph inputs now hold one half; the original nodes read both halves
    doubled = {name: graph.fresh(f"{name}_doubled") for name in shared}
    joins = [helper.make_node("Concat", [name, name], [both], axis=0) for name, both in doubled.items()]
    for node in graph.nodes:
        node.input[:] = [doubled.get(name, name) for name in node.input]
    for node, k, name in edits:
        if name not in doubled:
            doubled[name] = graph.fresh(f"{name}_doubled")
            joins.append(helper.make_node("Concat", [half[name], half[name]], [doubled[name]], axis=0))
        node.input[k] = doubled[name]
    graph.nodes = joins + clones + graph.nodes
    graph.remove_dead()  # the original shared nodes but those computing shapes
    live = {id(n) for n in graph.nodes}
    graph.commit()
    toposort(graph.g)
    graph.nodes = list(graph.g.node)
    graph.refresh()
    return sum(id(c) in live for c in clones)


def write_guided(src: Path) -> tuple[Path | None, int]:
    """SRC's guided graph beside it (sharing its weights file); (None, 0) where nothing is shared."""
    model = load_graph_only(src)
    count = share_guided_prefix(Graph(model))
    if not count:
        return None, 0
    dst = src.with_name(target_file(src.name, SUFFIX))
    save_graph_only(model, dst)
    return dst, count
