"""The `onnxruntime-cuda` target: ONNX Runtime's Stable Diffusion fusions for its CUDA provider,
then fp16.

ONNX Runtime's transformers optimizer (`onnxruntime.transformers`, shipped in the wheel) has the
fused CUDA kernels Stable Diffusion needs and the fusions that emit them. On sdrt's opset-23 graphs
it recognises only some of them; sdrt writes the rest, in the form its later fusions expect:

- MultiHeadAttention with packed QKV / KV: sdrt (`attention`, `pack_qkv`); its attention fusion
  matches the MatMul-Softmax pattern of older exports, not ONNX `Attention`.
- GroupNorm (NHWC, SiLU fused): sdrt (`group_norm_nhwc`); it matches Reshape-InstanceNormalization-
  Reshape, not ONNX `GroupNormalization`.
- BiasSplitGelu: sdrt (`bias_split_gelu`); it matches GEGLU's Slice form, not the `Split` torch's
  exporter writes.
- SkipGroupNorm, SkipLayerNormalization, NhwcConv, BiasAdd and Transpose removal: ONNX Runtime's.

ONNX Runtime's fusions need symbolic shape inference, which fails on graphs with ONNX `Attention`
or `GroupNormalization` (it knows neither); after sdrt's passes it succeeds. The graph is then
converted to fp16 (fusions first: they match fp32 patterns), with MultiHeadAttention kept in fp32
for models that need attention upcast (SD 2.x, `upcast_attention`). GroupNorm, SkipGroupNorm,
BiasSplitGelu, BiasAdd and NhwcConv have CUDA kernels only: the graph is for the CUDA provider.
Each op has a NumPy reference (sdrt.kernels.contrib) that runs the graph where there is no GPU.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
from onnx import helper

from sdrt.kernels.attention import fuse_multihead_attention
from sdrt.kernels.graph import MS_DOMAIN, Graph, attrs, run_pass

log = logging.getLogger(__name__)

TARGET = "onnxruntime-cuda"
# the fused ops of this target, counted in the final graph (the manifest's `fused` and `sdrt info`)
FUSED_OPS = ("MultiHeadAttention", "PackedQKV", "PackedKV", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu",
             "BiasAdd", "SkipLayerNormalization", "NhwcConv")
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")  # no CPU kernels
NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def has_cuda_only_ops(path: Path) -> bool:
    """Whether the graph at PATH needs ONNX Runtime's CUDA provider (or sdrt.kernels.contrib) to run."""
    from sdrt.kernels.graph import load_graph_only

    return bool({n.op_type for n in load_graph_only(path).graph.node} & set(CUDA_ONLY_OPS))


# -- sdrt's passes ----------------------------------------------------------------------------------

def group_norm_nhwc(graph: Graph) -> int:
    """ONNX GroupNormalization [-> x * Sigmoid(x)] -> Transpose, com.microsoft.GroupNorm (channels
    last, SiLU fused as activation=1), Transpose: what ONNX Runtime's own GroupNorm fusion emits, so
    its SkipGroupNorm fusion and Transpose removal apply next."""
    opset = next((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:  # GroupNormalization-18 scales per group, not per channel as GroupNorm does
        return 0
    nodes = [n for n in graph.nodes if n.op_type == "GroupNormalization"]
    return run_pass(graph, nodes, lambda n: _group_norm(graph, n), domain=MS_DOMAIN)


def _silu_after(graph: Graph, value: str):
    """(Sigmoid, Mul) if VALUE's only readers compute VALUE * Sigmoid(VALUE)."""
    users = graph.consumers.get(value, [])
    if len(users) != 2 or value in graph.graph_outputs:
        return None
    sig = next((u for u in users if u.op_type == "Sigmoid"), None)
    mul = next((u for u in users if u.op_type == "Mul"), None)
    if sig is None or mul is None or sorted(mul.input) != sorted([value, sig.output[0]]):
        return None
    if graph.consumers.get(sig.output[0]) != [mul]:
        return None
    return sig, mul


def _group_norm(graph: Graph, node):
    a = attrs(node)
    x, scale, bias = node.input
    shape = graph.shapes.get(x)
    if a.get("stash_type", 1) != 1 or (shape is not None and len(shape) != 4):
        return None
    silu = _silu_after(graph, node.output[0])
    out = silu[1].output[0] if silu else node.output[0]
    p = graph.fresh("group_norm")
    new = [
        helper.make_node("Transpose", [x], [f"{p}_nhwc"], name=f"{p}_to_nhwc", perm=NHWC),
        helper.make_node("GroupNorm", [f"{p}_nhwc", scale, bias], [f"{p}_out"], name=p, domain=MS_DOMAIN,
                         activation=1 if silu else 0, channels_last=1, epsilon=float(a.get("epsilon", 1e-5)),
                         groups=int(a["num_groups"])),
        helper.make_node("Transpose", [f"{p}_out"], [out], name=f"{p}_to_nchw", perm=NCHW),
    ]
    return [node, *(silu or ())], new


def bias_split_gelu(graph: Graph) -> int:
    """GEGLU as torch exports it, Add(X, bias) -> Split in halves -> first * Gelu(second), ->
    com.microsoft.BiasSplitGelu(X, bias)."""
    nodes = [n for n in graph.nodes if n.op_type == "Split"]
    return run_pass(graph, nodes, lambda n: _bias_split_gelu(graph, n), domain=MS_DOMAIN)


def _constant_input(graph: Graph, node) -> tuple[int, object] | None:
    """(index, initializer) of NODE's one constant input."""
    found = [(i, graph.initializers[x]) for i, x in enumerate(node.input) if x in graph.initializers]
    return found[0] if len(found) == 1 else None


def _bias_split_gelu(graph: Graph, split):
    a = attrs(split)
    if len(split.output) != 2 or a.get("axis") not in (-1, 2) or len(split.input) > 1 and split.input[1]:
        return None  # explicit split sizes could be unequal
    add = graph.parent(split, 0, "Add")
    const = _constant_input(graph, add) if add is not None else None
    if const is None or len(const[1].dims) != 1 or graph.consumers.get(add.output[0]) != [split]:
        return None
    first, second = split.output
    gelu = graph.only_consumer(second, "Gelu")
    if gelu is None or attrs(gelu).get("approximate", b"none") not in (b"none", "none"):
        return None
    mul = graph.only_consumer(gelu.output[0], "Mul")
    if mul is None or graph.consumers.get(first) != [mul] or sorted(mul.input) != sorted([first, gelu.output[0]]):
        return None
    new = helper.make_node("BiasSplitGelu", [add.input[1 - const[0]], add.input[const[0]]], [mul.output[0]],
                           name=graph.fresh("bias_split_gelu"), domain=MS_DOMAIN)
    return [add, split, gelu, mul], [new]


def pack_qkv(graph: Graph) -> int:
    """MultiHeadAttention whose Q, K, V (or K, V) are bias-free projections of one input -> one MatMul
    with the weights interleaved per head, into MultiHeadAttention's packed QKV (B, S, heads, 3,
    head_dim) or packed KV input (ONNX Runtime's layout): one GEMM instead of three."""
    nodes = [n for n in graph.nodes if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN
             and len(n.input) == 3 and all(n.input)]
    return run_pass(graph, nodes, lambda n: _packed(graph, n), prune=True)


def _projection(graph: Graph, value: str):
    """(MatMul, input, weight array) if VALUE = MatMul(input, constant 2-D weight), read only once."""
    from onnx import numpy_helper

    mm = graph.producer.get(value)
    if mm is None or mm.op_type != "MatMul" or len(graph.consumers.get(value, [])) != 1:
        return None
    w = graph.initializers.get(mm.input[1])
    if w is None or len(w.dims) != 2:
        return None
    return mm, mm.input[0], numpy_helper.to_array(w)


def _packed(graph: Graph, node):
    heads = attrs(node)["num_heads"]
    q, k, v = (_projection(graph, x) for x in node.input)
    if k is None or v is None or k[1] != v[1]:
        return None
    packed = [q, k, v] if q is not None and q[1] == k[1] else [k, v]
    c = packed[0][2].shape[0]
    if any(p[2].shape != packed[0][2].shape for p in packed) or packed[0][2].shape[1] % heads:
        return None
    h = packed[0][2].shape[1] // heads
    weight = np.stack([p[2].reshape(c, heads, h) for p in packed], axis=2).reshape(c, heads * len(packed) * h)
    p = graph.fresh("packed_qkv" if len(packed) == 3 else "packed_kv")
    w = graph.add_initializer(f"{p}_weight", weight)
    shape = graph.add_initializer(f"{p}_shape", np.array([0, 0, heads, len(packed), h], np.int64))
    new = [helper.make_node("MatMul", [packed[0][1], w], [f"{p}_mm"], name=f"{p}_mm"),
           helper.make_node("Reshape", [f"{p}_mm", shape], [p], name=p)]
    inputs = [p, "", ""] if len(packed) == 3 else [node.input[0], p, ""]
    new.append(helper.make_node("MultiHeadAttention", inputs, list(node.output), name=node.name,
                                domain=MS_DOMAIN, **attrs(node)))
    return [node] + [x[0] for x in packed], new


# -- the target -------------------------------------------------------------------------------------

def count_fused(model) -> dict[str, int]:
    """How many of each fused op MODEL's graph has, those it has (packed attention counted by its
    input layout)."""
    ops = collections.Counter(n.op_type for n in model.graph.node if n.domain == MS_DOMAIN)
    shapes = {n.output[0]: n for n in model.graph.node if n.op_type == "Reshape"}
    for n in model.graph.node:
        if n.op_type == "MultiHeadAttention" and n.input[0] in shapes and not n.input[1]:
            ops["PackedQKV"] += 1
        elif n.op_type == "MultiHeadAttention" and len(n.input) > 1 and n.input[1] in shapes and not n.input[2]:
            ops["PackedKV"] += 1
    return {op: ops[op] for op in FUSED_OPS if ops.get(op)}


def sdrt_passes(graph: Graph, pack: bool = True) -> None:
    fuse_multihead_attention(graph)
    if pack:
        pack_qkv(graph)
    group_norm_nhwc(graph)
    bias_split_gelu(graph)


def ort_fusions(model):
    """ONNX Runtime's Stable Diffusion fusions on MODEL (after sdrt's passes): an OnnxModel."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel

    options = FusionOptions("unet")
    for done_by_sdrt in ("enable_attention", "enable_group_norm", "enable_bias_splitgelu"):
        setattr(options, done_by_sdrt, False)
    options.enable_bias_add = True  # off in its unet defaults; its kernel is CUDA's
    optimized = UnetOnnxModel(model, num_heads=0, hidden_size=0)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    optimized.optimize(options)  # its progress bar: through tqdm, on stderr
    optimized.topological_sort()
    return optimized


def build(src: Path, dst: Path, *, fp16: bool = True, fp32_attention: bool = False,
          pack: bool | None = None) -> dict[str, int]:
    """Write SRC (a standard fp32 graph) fused for ONNX Runtime's CUDA provider at DST, with its own
    weights in DST.data (packed and NHWC weights differ from SRC's); return the fused-op counts.
    fp32_attention: keep MultiHeadAttention in fp32 in the fp16 graph. pack: pack Q, K and V
    (default: where attention runs in fp16, as ONNX Runtime's packed kernels need)."""
    import onnx

    model = onnx.load(str(src))
    graph = Graph(model)
    # ONNX Runtime's CUDA kernels take packed QKV / KV in fp16 only (its fused attention kernels)
    sdrt_passes(graph, pack=fp16 and not fp32_attention if pack is None else pack)
    optimized = ort_fusions(model)
    if fp16:
        from sdrt.export.fp16 import convert_model

        optimized.model = convert_model(optimized.model, fp32_ops=("MultiHeadAttention",) if fp32_attention else ())
        # its NhwcConv fusion casts inputs whose type it could not see to the weights' type: no-ops
        # (fp16 -> fp16) once converted
        optimized.utils.remove_useless_cast_nodes()
    counts = count_fused(optimized.model)
    onnx.save(optimized.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)
    log.info("%s graph %s: %s", TARGET, dst, ", ".join(f"{k} x{v}" for k, v in counts.items() if v))
    return counts
