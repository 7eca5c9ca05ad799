"""Attention rewrites.

torch's exporter (opset 23) writes each SDPA call as ONNX `Attention` on 4-D (B, heads, S, head_dim)
tensors, with a Reshape + Transpose before each of Q, K, V and after the output. Two rewrites:

- `fuse_multihead_attention`: the whole block -> ONNX Runtime's `com.microsoft.MultiHeadAttention`
  on the 3-D (B, S, heads*head_dim) projections: no transposes, and ONNX Runtime's CPU and CUDA
  kernels for it (flash / memory-efficient attention). ONNX Runtime's transformers optimizer can't do
  this: its fusions match the MatMul-Softmax-MatMul pattern of older exports, not opset-23 Attention.
  It is faster and smaller than ONNX Runtime's own Attention-23 kernel on the CPU, which also failed
  intermittently on the VAE mid-block (docs/kernels.md).
- `decompose_attention`: `Attention` -> MatMul, Softmax, MatMul: the pattern TensorRT fuses into
  its own attention kernels, and what fp16 conversion needs to keep QK^T and the softmax in fp32.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from sdrt.kernels.graph import MS_DOMAIN, Graph, attrs, run_pass

HEAD_SPLIT = [0, 2, 1, 3]
QK_NODE_PREFIX = "sdrt_attention_qk"  # node names of a decomposed attention's QK^T part (fp32 in fp16 graphs)
SOFTMAX_NODE_PREFIX = "sdrt_attention_softmax"


def _head_split_source(graph: Graph, value: str):
    """X for `Transpose(Reshape(X, (B, S, heads, head_dim)), perm=0,2,1,3)`, with those two nodes."""
    t = graph.producer.get(value)
    if t is None or t.op_type != "Transpose" or list(attrs(t).get("perm", [])) != HEAD_SPLIT:
        return None
    r = graph.parent(t, 0, "Reshape")
    if r is None or len(graph.consumers[t.output[0]]) != 1:
        return None
    return r.input[0]


FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _additive_mask(graph: Graph, value: str, dtype: int) -> tuple[str | None, list]:
    """Attention's mask as an additive bias of type DTYPE: (value, nodes that make it); (None, []) if
    its type is unknown. A boolean mask (True = attend; CLIP's causal mask) becomes
    Where(mask, 0, lowest finite)."""
    elem = graph.types.get(value)
    if elem == dtype:
        return value, []
    out = graph.fresh("mask_bias")
    if elem in FLOATS:
        return out, [helper.make_node("Cast", [value], [out], name=out, to=dtype)]
    if elem != TensorProto.BOOL:
        return None, []
    np_type = FLOATS[dtype]
    zero = graph.add_initializer("mask_zero", np.array(0.0, np_type))
    low = graph.add_initializer("mask_low", np.array(np.finfo(np_type).min, np_type))
    return out, [helper.make_node("Where", [value, zero, low], [out], name=out)]


def _plain_attentions(graph: Graph):
    """(node, attributes) of each Attention both rewrites handle: not causal, no softcap, and no
    present key/value or QK outputs in use."""
    for node in [n for n in graph.nodes if n.op_type == "Attention"]:
        a = attrs(node)
        if a.get("is_causal", 0) or a.get("softcap", 0.0) or a.get("qk_matmul_output_mode", 0):
            continue
        if len(node.output) > 1 and any(node.output[1:]):
            continue
        yield node, a


def fuse_multihead_attention(graph: Graph) -> int:
    """Rewrite every matching Attention block into MultiHeadAttention; return how many."""
    return run_pass(graph, _plain_attentions(graph), lambda c: _multihead(graph, *c), domain=MS_DOMAIN,
                    prune=True)  # prune: the head-split Reshape/Transpose pairs


def _multihead(graph: Graph, node, a: dict):
    sources = [_head_split_source(graph, x) for x in node.input[:3]]
    if None in sources:
        return None
    merge = graph.only_consumer(node.output[0], "Transpose")
    if merge is None or list(attrs(merge).get("perm", [])) != HEAD_SPLIT:
        return None
    out = graph.only_consumer(merge.output[0], "Reshape")
    if out is None:
        return None
    heads = graph.shapes.get(node.input[0], [None, None])[1]
    k_heads = graph.shapes.get(node.input[1], [None, None])[1]
    dtype = graph.types.get(node.input[0])
    if not isinstance(heads, int) or heads != k_heads or dtype not in FLOATS:
        return None
    inputs, extra = list(sources), []
    if len(node.input) > 3 and node.input[3]:
        bias, extra = _additive_mask(graph, node.input[3], dtype)
        if bias is None:
            return None
        inputs += ["", "", bias]  # bias, key_padding_mask, attention_bias
    kwargs = {"num_heads": heads}
    if "scale" in a:
        kwargs["scale"] = float(a["scale"])
    mha = helper.make_node("MultiHeadAttention", inputs, [out.output[0]], name=f"{node.name}_mha",
                           domain=MS_DOMAIN, **kwargs)
    return [node, merge, out], extra + [mha]


def decompose_attention(graph: Graph) -> int:
    """Attention(Q, K, V[, mask]) -> softmax(Q K^T * scale [+ mask]) V in plain ops. In an fp16 graph
    QK^T, the mask and the softmax are computed in fp32 (Casts around them)."""
    return run_pass(graph, _plain_attentions(graph), lambda c: _decomposed(graph, *c))


def _decomposed(graph: Graph, node, a: dict):
    q, k, v = node.input[:3]
    dtype = graph.types.get(q)
    if dtype not in FLOATS:
        return None
    mask, nodes = None, []
    if len(node.input) > 3 and node.input[3]:
        mask, nodes = _additive_mask(graph, node.input[3], TensorProto.FLOAT)
        if mask is None:
            return None
    head_dim = graph.shapes.get(q, [None] * 4)[-1]
    if "scale" in a:
        scale = float(a["scale"])
    elif isinstance(head_dim, int):
        scale = 1.0 / np.sqrt(head_dim)
    else:
        return None
    p = graph.fresh("attn")
    s = graph.add_initializer("attn_scale", np.array(scale, np.float32))
    upcast = dtype != TensorProto.FLOAT
    if upcast:
        nodes += [helper.make_node("Cast", [x], [f"{p}_{x}32"], name=f"{QK_NODE_PREFIX}_{p}_{x}32",
                                   to=TensorProto.FLOAT) for x in (q, k)]
        q, k = f"{p}_{q}32", f"{p}_{k}32"
    nodes += [
        helper.make_node("Transpose", [k], [f"{p}_kt"], name=f"{p}_kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [q, f"{p}_kt"], [f"{p}_qk"], name=f"{QK_NODE_PREFIX}_{p}"),
        helper.make_node("Mul", [f"{p}_qk", s], [f"{p}_scaled"], name=f"{QK_NODE_PREFIX}_{p}_scale"),
    ]
    logits = f"{p}_scaled"
    if mask:
        nodes.append(helper.make_node("Add", [logits, mask], [f"{p}_masked"], name=f"{QK_NODE_PREFIX}_{p}_mask"))
        logits = f"{p}_masked"
    nodes += [
        helper.make_node("Softmax", [logits], [f"{p}_probs"], name=f"{SOFTMAX_NODE_PREFIX}_{p}", axis=-1),
    ]
    probs = f"{p}_probs"
    if upcast:
        nodes.append(helper.make_node("Cast", [probs], [f"{p}_probs16"], name=f"{p}_probs16", to=dtype))
        probs = f"{p}_probs16"
    nodes.append(helper.make_node("MatMul", [probs, v], [node.output[0]], name=f"{p}_pv"))
    return [node], nodes
