"""A linear layer read only by a Split of its output in two halves, computed as two linear layers, one
per half (the `SplitLinear` pass of the openvino and onnxruntime-cpu targets).

Every transformer block of the SD UNet starts its feed-forward with GEGLU: `proj = Linear(C, 2F)`,
then `hidden, gate = proj(x).chunk(2, dim=-1)` and `hidden * gelu(gate)`. torch's exporter writes
the chunk as a Split of the last axis, which OpenVINO's CPU plugin runs with its reference kernel:
a copy of the whole (B, S, 2F) product, 16 nodes and 2.8% of an int8 UNet step at 512 px on a Xeon
with AMX. Each half is the product with half of the weight's columns, so two MatMuls, one per half,
compute the same dot products without the Split.

The columns are taken in the graph (a Slice of the weight, and of a per-channel quantization scale
and zero point), so the graph keeps sharing its weights file; OpenVINO folds those Slices when it
compiles. Two forms, as the exporter and sdrt.export.quantize write them:
- float: `Split(Add(MatMul(x, W), b))`;
- int8 QDQ: `Split(Add(DQ(Q(MatMul(x, DQ(W_int8))))), b))`, the weight per tensor or per output
  channel and its output rounded per tensor, which rounds each element on its own, so per half alike.

The same values: ONNX Runtime (optimizations off) gives the rewritten graph's output bit for bit.
OpenVINO picks other kernels for the new shapes, which moves an int8 UNet's output about as far as
other kernel choices do (docs/kernels.md, "int8"). Measured on 2 cores of a Xeon with AMX, random-sd15
int8 at 512 px, the guided UNet step alone: 1.060x faster at the median of 12 alternating rounds,
faster in all 12 (1.029 against 1.095 s); replacing the Split by two Slices instead: 1.013x. On an
fp32 export computed in bf16: 1.017x (faster in 11 of 12), as far from fp32 as before. On ONNX
Runtime's CPU provider (its Split is a copy too), the guided UNet step of the onnxruntime-cpu graph:
1.019x int8 (3.256 against 3.335 s, faster in 6 of 6) and 1.030x fp32 (4.808 against 4.862 s, 5 of 6),
the same output bit for bit.
"""

from __future__ import annotations

from onnx import numpy_helper

from sdrt.kernels.graph import Builder, Constants, Graph, attrs, run_pass

HALVES = 2


def _halves(graph: Graph, split) -> bool:
    """Whether SPLIT cuts its input's last axis into two equal halves."""
    a = attrs(split)
    if len(split.output) != HALVES or a.get("num_outputs", HALVES) != HALVES:
        return False
    sizes = a.get("split")
    if len(split.input) > 1 and split.input[1]:
        t = graph.initializers.get(split.input[1])
        sizes = numpy_helper.to_array(t).tolist() if t is not None else [None]
    if sizes is not None and (len(sizes) != HALVES or sizes[0] != sizes[1]):
        return False
    axis, rank = a.get("axis", 0), len(graph.shapes.get(split.input[0]) or [])
    return axis == -1 or (rank > 0 and axis == rank - 1)


def _per_tensor(graph: Graph, node) -> bool:
    """A QuantizeLinear / DequantizeLinear with a constant scalar scale (and zero point)."""
    ts = [graph.initializers.get(name) for name in node.input[1:3]]
    return all(t is not None and not t.dims for t in ts)


def _match(graph: Graph, split):
    """(the nodes from the MatMul to the Split, the weight's DequantizeLinear or None, the bias's index
    in the Add); None where SPLIT is not the end of a linear layer this pass rewrites."""
    if not _halves(graph, split):
        return None
    add = graph.parent_of(split.input[0], "Add")
    if add is None or graph.only_consumer(add.output[0], "Split") is not split:
        return None
    bias_at = next((i for i, name in enumerate(add.input) if name in graph.initializers), None)
    if bias_at is None:
        return None
    bias, product = graph.initializers[add.input[bias_at]], add.input[1 - bias_at]
    chain, matmul = [split, add], graph.parent_of(product, "MatMul")
    if matmul is None:  # int8: the product's output rounded by a pair per tensor
        dq = graph.parent_of(product, "DequantizeLinear")
        q = graph.parent_of(dq.input[0], "QuantizeLinear") if dq is not None else None
        matmul = graph.parent_of(q.input[0], "MatMul") if q is not None else None
        if (matmul is None or not (_per_tensor(graph, q) and _per_tensor(graph, dq))
                or graph.only_consumer(dq.output[0], "Add") is not add
                or graph.only_consumer(q.output[0], "DequantizeLinear") is not dq):
            return None
        chain += [dq, q]
        expected = "QuantizeLinear"
    else:
        expected = "Add"
    if graph.only_consumer(matmul.output[0], expected) is None:
        return None
    chain.append(matmul)
    columns = 2 * (bias.dims[0] // 2) if len(bias.dims) == 1 else -1
    w, wdq = graph.initializers.get(matmul.input[1]), None
    if w is None:  # int8: the weight through a DequantizeLinear
        wdq = graph.parent_of(matmul.input[1], "DequantizeLinear")
        w = graph.initializers.get(wdq.input[0]) if wdq is not None else None
        if w is None or graph.only_consumer(wdq.output[0], "MatMul") is not matmul or "block_size" in attrs(wdq):
            return None
        scales = [graph.initializers.get(name) for name in wdq.input[1:3]]
        per_channel = any(t is not None and t.dims for t in scales)
        if any(t is None for t in scales) or (per_channel and (attrs(wdq).get("axis", 1) not in (1, -1) or any(
                list(t.dims) != [columns] for t in scales))):
            return None
    if len(w.dims) != 2 or w.dims[1] != columns or columns != bias.dims[0]:
        return None
    return chain, wdq, bias_at


def split_linear(graph: Graph) -> int:
    """Rewrite each linear layer read only by a Split in two halves as two layers; returns how many."""
    k = Constants(graph, "split_linear")

    def rewrite(split):
        match = _match(graph, split)
        if match is None:
            return None
        chain, wdq, bias_at = match
        add, matmul = chain[1], chain[-1]
        dq, q = (chain[2], chain[3]) if len(chain) == 5 else (None, None)
        half = graph.initializers[add.input[bias_at]].dims[0] // 2
        op = Builder(graph, k)
        for i in range(HALVES):
            span = [k.ints(i * half), k.ints((i + 1) * half)]

            def columns(name: str, axis: int, span=span) -> str:  # half I of NAME along AXIS
                return op("Slice", name, *span, k.ints(axis))

            if wdq is None:
                weight = columns(matmul.input[1], 1)
            else:
                scale_zero = [columns(name, 0) if graph.initializers[name].dims else name for name in wdq.input[1:3]]
                weight = op("DequantizeLinear", columns(wdq.input[0], 1), *scale_zero, **attrs(wdq))
            product = op("MatMul", matmul.input[0], weight)
            if q is not None:
                product = op("QuantizeLinear", product, *q.input[1:], **attrs(q))
                product = op("DequantizeLinear", product, *dq.input[1:], **attrs(dq))
            inputs = [product, columns(add.input[bias_at], 0)]
            op("Add", *(inputs if bias_at == 1 else inputs[::-1]), output=chain[0].output[i])
        for n in op.nodes:  # the layer's module scope, for profiles and sdrt.kernels.deepcache
            n.metadata_props.extend(matmul.metadata_props)
        return chain, op.nodes

    candidates = [n for n in graph.nodes if n.op_type == "Split"]
    return run_pass(graph, candidates, rewrite, prune=True)
