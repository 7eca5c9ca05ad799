"""sdrt.kernels: every op a pass emits vs its NumPy reference, exact rewrite counts per component,
and rewritten engines vs the standard ones and vs PyTorch."""

from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sdrt
from sdrt.errors import InputError
from sdrt.kernels import TARGETS, reference, winograd
from sdrt.kernels.attention import decompose_attention, fuse_multihead_attention
from sdrt.kernels.graph import MS_DOMAIN, Graph
from sdrt.kernels.int8_attention import symmetric_int8_attention
from sdrt.kernels.split_linear import split_linear
from sdrt.kernels.upsample import upsample_conv
from sdrt.manifest import Manifest
from tests.conftest import CHECKPOINTS, SIZES

OP_TOL = 1e-5  # max abs, fp32 kernels vs the float64 references on O(1) inputs
ATTENTION_SHAPES = [  # batch, heads, query length, key length, head dim
    (1, 1, 16, 16, 32), (2, 4, 9, 77, 8), (3, 8, 5, 7, 16), (2, 2, 64, 64, 4)]


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _rng_inputs(b, h, s, kv_len, d, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((b, s, h * d), (b, kv_len, h * d), (b, kv_len, h * d))
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def _sdpa_block_model(b, h, s, kv_len, d, mask: str | None = None, scale: float | None = None) -> onnx.ModelProto:
    """The exporter's shape of one attention call: 3-D projections, head split, Attention, head merge."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    lengths = (("q", s), ("k", kv_len), ("v", kv_len))
    inputs = [helper.make_tensor_value_info(n, f, [b, n_len, h * d]) for n, n_len in lengths]
    nodes, inits = [], [helper.make_tensor("split", i64, [4], [0, 0, h, d]),
                        helper.make_tensor("merge", i64, [3], [0, 0, h * d])]
    value_info = []
    for name, n_len in (("q", s), ("k", kv_len), ("v", kv_len)):
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3])]
        value_info.append(helper.make_tensor_value_info(f"{name}h", f, [b, h, n_len, d]))
    att_inputs = ["qh", "kh", "vh"]
    if mask == "bool":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [b, 1, s, kv_len]))
        att_inputs.append("mask")
    elif mask == "float":
        inputs.append(helper.make_tensor_value_info("mask", f, [b, 1, s, kv_len]))
        att_inputs.append("mask")
    kwargs = {} if scale is None else {"scale": scale}
    nodes += [helper.make_node("Attention", att_inputs, ["oh"], **kwargs),
              helper.make_node("Transpose", ["oh"], ["o4"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o4", "merge"], ["out"])]
    graph = helper.make_graph(nodes, "sdpa", inputs, [helper.make_tensor_value_info("out", f, [b, s, h * d])],
                              inits, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _mask_feed(kind, b, s, kv_len, seed=1):
    rng = np.random.default_rng(seed)
    causal = np.tril(np.ones((s, kv_len), bool), k=kv_len - s)
    if kind == "bool":
        return np.broadcast_to(causal, (b, 1, s, kv_len)).copy()
    return (rng.standard_normal((b, 1, s, kv_len)) - 20 * ~causal).astype(np.float32)


def _reference(q, k, v, h, mask_kind, mask, scale):
    bias = None
    if mask_kind == "bool":
        bias = np.where(mask, 0.0, np.finfo(np.float32).min)
    elif mask_kind == "float":
        bias = mask
    return reference.multi_head_attention(q, k, v, h, bias, scale)


SHAPE_IDS = [f"b{b}h{h}s{s}l{kv_len}d{d}" for b, h, s, kv_len, d in ATTENTION_SHAPES]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("rewrite", [fuse_multihead_attention, decompose_attention])
def test_attention_rewrites_match_numpy(shape, mask_kind, rewrite):
    b, h, s, kv_len, d = shape
    scale = 0.3 if mask_kind == "float" else None
    model = _sdpa_block_model(b, h, s, kv_len, d, mask_kind, scale)
    q, k, v = _rng_inputs(b, h, s, kv_len, d)
    feeds = {"q": q, "k": k, "v": v}
    if mask_kind:
        feeds["mask"] = _mask_feed(mask_kind, b, s, kv_len)
    ref = _reference(q, k, v, h, mask_kind, feeds.get("mask"), scale)
    (plain,) = _run(model, feeds)

    graph = Graph(model)
    assert rewrite(graph) == 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Attention"] == 0
    if rewrite is fuse_multihead_attention:  # the head split/merge went with it
        assert ops["MultiHeadAttention"] == 1 and ops["Transpose"] == 0 and ops["Reshape"] == 0
    else:
        assert ops["Softmax"] == 1 and ops["MatMul"] == 2
    onnx.checker.check_model(model)
    (fused,) = _run(model, feeds)
    assert np.abs(plain - ref).max() < OP_TOL  # ONNX Runtime's Attention-23 agrees with the reference
    assert np.abs(fused - ref).max() < OP_TOL


@pytest.mark.parametrize("shape", ATTENTION_SHAPES[:3], ids=["b1h1", "b2h4", "b3h8"])
def test_multihead_attention_kernel_matches_numpy(shape):
    """The contrib op itself, fed directly (cross-attention lengths, additive bias)."""
    b, h, s, kv_len, d = shape
    q, k, v = _rng_inputs(b, h, s, kv_len, d, seed=5)
    bias = _mask_feed("float", b, s, kv_len, seed=6)
    f = TensorProto.FLOAT
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["out"], domain=MS_DOMAIN,
                            num_heads=h)
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("q", "k", "v", "bias")]
    graph = helper.make_graph([node], "mha", inputs, [helper.make_tensor_value_info("out", f, None)])
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    (got,) = _run(model, {"q": q, "k": k, "v": v, "bias": bias})
    assert np.abs(got - reference.multi_head_attention(q, k, v, h, bias)).max() < OP_TOL


def test_numpy_attention_reference_matches_onnx_spec():
    """The NumPy reference itself vs ONNX's reference evaluator for Attention-23."""
    from onnx.reference import ReferenceEvaluator

    b, h, s, kv_len, d = 2, 3, 5, 6, 4
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for n in (s, kv_len, kv_len))
    mask = rng.standard_normal((b, 1, s, kv_len)).astype(np.float32)
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"])
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "a", [helper.make_tensor_value_info(n, f, None) for n in "qkvm"],
                              [helper.make_tensor_value_info("y", f, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    (want,) = ReferenceEvaluator(model).run(None, {"q": q, "k": k, "v": v, "m": mask})
    assert np.abs(reference.attention(q, k, v, mask) - want).max() < OP_TOL


WINOGRAD_TOL = 1e-4  # max abs on O(1) outputs: F(4x4, 3x3) in fp32 rounds to about 1e-5 relative
CONV_SHAPES = [  # batch, in channels, out channels, height, width (odd sides: partial edge tiles)
    (1, 3, 5, 7, 9), (2, 8, 4, 32, 33), (3, 16, 8, 40, 36), (1, 4, 4, 4, 4)]


def test_winograd_transforms_compute_a_correlation():
    """The 1-D F(4, 3): A^T [(G g) * (B^T d)] is the 4 outputs of correlating 6 inputs with 3 taps."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, g = rng.standard_normal(6), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ g for i in range(4)])
        got = winograd.AT @ ((winograd.G @ g) * (winograd.BT @ d))
        assert np.abs(got - want).max() < 1e-12
    bt2, g2, at2 = winograd.transforms()
    assert bt2.shape == (36, 36) and g2.shape == (36, 9) and at2.shape == (16, 36)


@pytest.mark.parametrize("shape", CONV_SHAPES[:3], ids=["odd", "b2", "b3"])
def test_winograd_reference_matches_direct_convolution(shape):
    n, c, k, h, w = shape
    rng = np.random.default_rng(1)
    x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((k, c, 3, 3)), rng.standard_normal(k)
    got = reference.winograd_conv(x, wt, b, winograd.BT, winograd.G, winograd.AT)
    assert np.abs(got - reference.conv2d(x, wt, b)).max() < 1e-9


def _conv_model(c, k, side=("h", "w"), bias=True, weight_input=False, **attrs) -> onnx.ModelProto:
    """One Conv as the exporter writes it: symbolic sides in the shape annotations."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(2)
    kernel = attrs.pop("kernel", 3)
    w = (rng.standard_normal((k, c // attrs.get("group", 1), kernel, kernel)) / np.sqrt(9 * c)).astype(np.float32)
    inits = [] if weight_input else [numpy_helper.from_array(w, "w")]
    inputs = [helper.make_tensor_value_info("x", f, ["N", c, *side])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", f, list(w.shape)))
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
    attrs.setdefault("pads", [1, 1, 1, 1])
    node = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="conv", **attrs)
    out_side = [s if attrs.get("strides", [1, 1]) == [1, 1] else f"(({s} - 1)//2) + 1" for s in side]
    graph = helper.make_graph([node], "conv", inputs, [helper.make_tensor_value_info("y", f, ["N", k, *out_side])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=["odd", "b2", "b3", "one-tile"])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_rewrite_matches_numpy(shape, bias):
    n, c, k, h, w = shape
    model = _conv_model(c, k, bias=bias)
    x = np.random.default_rng(3).standard_normal((n, c, h, w)).astype(np.float32)
    (plain,) = _run(model, {"x": x})
    params = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ref = reference.conv2d(x, params["w"], params.get("b"))
    assert winograd.winograd_conv(Graph(model)) == 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["DepthToSpace"] == 1 and ops["MatMul"] == 3  # filter transform, the 36 GEMMs, output transform
    (gather,) = [n for n in model.graph.node if n.op_type == "Conv"]  # the tiles' input transform, 6x6 stride 4
    assert list(Graph(model).initializers[gather.input[1]].dims) == [36, 1, 6, 6]
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]  # G is overridable, never a required input
    (got,) = session.run(None, {"x": x})
    assert got.shape == (n, k, h, w)
    assert np.abs(plain - ref).max() < OP_TOL
    assert np.abs(got - ref).max() < WINOGRAD_TOL


def _qdq_conv_model(c: int, k: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A 3x3 Conv as quantize_static writes it (uint8 activation and output, per-channel int8 weight,
    int32 bias), whose output feeds an fp32 op (Relu) and a quantized 1x1 Conv; and its float values."""
    f, rng = TensorProto.FLOAT, np.random.default_rng(4)
    x_scale, y_scale = np.float32(0.03), np.float32(0.05)
    w = rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)
    w_scale = (np.abs(w).reshape(k, -1).max(1) / 127).astype(np.float32)
    w_q = np.round(w / w_scale[:, None, None, None]).astype(np.int8)
    b_scale = (x_scale * w_scale).astype(np.float32)
    b_q = np.round(rng.standard_normal(k) / b_scale).astype(np.int32)
    w2_scale = np.full(k, 0.01, np.float32)
    w2_q = rng.integers(-100, 100, (k, k, 1, 1)).astype(np.int8)
    tensors = {"x_scale": x_scale, "x_zp": np.uint8(128), "y_scale": y_scale, "y_zp": np.uint8(128),
               "w_q": w_q, "w_scale": w_scale, "w_zp": np.zeros(k, np.int8), "b_q": b_q, "b_scale": b_scale,
               "b_zp": np.zeros(k, np.int32), "w2_q": w2_q, "w2_scale": w2_scale, "w2_zp": np.zeros(k, np.int8)}
    node = helper.make_node
    nodes = [node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=0),
             node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["bd"], axis=0),
             node("Conv", ["xd", "wd", "bd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["yq"]),
             node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["yd"]),
             node("Relu", ["yd"], ["relu"]),
             node("DequantizeLinear", ["w2_q", "w2_scale", "w2_zp"], ["w2d"], axis=0),
             node("Conv", ["yd", "w2d"], ["z"], name="conv2")]
    out = [helper.make_tensor_value_info(n, f, ["N", k, "h", "w"]) for n in ("relu", "z")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", f, ["N", c, "h", "w"])], out,
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in tensors.items()],
                              value_info=[helper.make_tensor_value_info("y", f, ["N", k, "h", "w"])])
    weights = {"w": (w_q * w_scale[:, None, None, None]).astype(np.float32), "b": (b_q * b_scale).astype(np.float32)}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), weights


def test_winograd_computes_a_quantized_layer_in_fp32():
    """In a QDQ graph the rewritten layer reads its activation unrounded and its dequantized weight; the
    fp32 op after it reads its output unrounded, the quantized layer after it keeps its int8 input."""
    model, wb = _qdq_conv_model(8, 16)
    x = np.random.default_rng(5).standard_normal((2, 8, 12, 12)).astype(np.float32)
    want = np.maximum(reference.conv2d(x, wb["w"], wb["b"]), 0)
    relu_before, z_before = _run(model, {"x": x})
    assert winograd.winograd_conv(Graph(model)) == 1
    onnx.checker.check_model(model)
    g = Graph(model)
    assert g.producer["relu"].input[0] == "y" and g.producer["z"].input[0] == "yd"  # conv2 stays int8
    assert "xq" not in g.producer  # the input's Q/DQ pair read by nothing else: dropped
    relu, z = _run(model, {"x": x})
    assert np.abs(relu - want).max() < WINOGRAD_TOL
    assert np.abs(relu_before - want).max() > 100 * WINOGRAD_TOL  # what the int8 layer rounded away
    assert np.abs(z - z_before).max() < 0.05 * np.abs(z_before).max()  # the output's rounding still there


def _qdq_attention_model(zero_points, scale=0.035) -> onnx.ModelProto:
    """_sdpa_block_model with q, k and v each through a uint8 QuantizeLinear / DequantizeLinear pair
    first, as an int8 UNet's projections' outputs are."""
    model = _sdpa_block_model(2, 2, 16, 16, 8)
    g = model.graph
    for name, z in zip("qkv", zero_points, strict=True):
        next(n for n in g.node if n.op_type == "Reshape" and n.input[0] == name).input[0] = f"{name}_dq"
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
                              numpy_helper.from_array(np.array(z, np.uint8), f"{name}_zp")])
        g.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"],
                                          [f"{name}_dq"]))
        g.node.insert(0, helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zp"], [f"{name}_q"]))
    return model


def _run_unoptimized(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """ONNX Runtime with its graph optimizations off: the graph's own QDQ arithmetic."""
    from sdrt.runtime.backends.onnxruntime import session

    return session(model.SerializeToString(), optimize=False).run(None, feeds)[0]


def test_symmetric_int8_attention_keeps_each_inputs_range():
    zero_points = (128, 110, 146)
    model = _qdq_attention_model(zero_points)
    feeds = dict(zip("qkv", _rng_inputs(2, 2, 16, 16, 8), strict=True))
    exact = reference.multi_head_attention(*feeds.values(), 2, None, None)
    before = _run_unoptimized(model, feeds)
    assert symmetric_int8_attention(Graph(model)) == 3
    onnx.checker.check_model(model)
    g = Graph(model)
    for name, z in zip("qkv", zero_points, strict=True):
        q, dq = g.producer[f"{name}_q"], g.producer[f"{name}_dq"]
        scale, zero = (numpy_helper.to_array(g.initializers[i]) for i in q.input[1:])
        assert zero.dtype == np.int8 and zero == 0 and dq.input[1:] == q.input[1:]
        # the same range: [-z, 255 - z] steps of 0.035 covered by [-127, 127] steps
        assert float(scale) == pytest.approx(0.035 * max(z, 255 - z) / 127, rel=1e-6)
    assert not {f"{n}_{k}" for n in "qkv" for k in ("zp", "scale")} & set(g.initializers)  # the uint8 ones went
    after = _run_unoptimized(model, feeds)
    assert np.abs(after - before).max() > 0  # rounded differently...

    def error(x):  # relative RMS against the attention of the unrounded inputs
        return float(np.sqrt(np.mean((x - exact) ** 2) / np.mean(exact ** 2)))

    # ...but as finely: steps up to 15% coarser (146: 1.15); over 4 seeds 1.4-1.6% before, 1.5-1.9% after
    assert error(before) < 0.02 and error(after) < 1.3 * error(before)
    assert symmetric_int8_attention(Graph(model)) == 0  # already int8


def test_symmetric_int8_attention_leaves_float_graphs_and_other_pairs_alone():
    model = _sdpa_block_model(2, 2, 16, 16, 8)
    assert symmetric_int8_attention(Graph(model)) == 0
    qdq_conv, _ = _qdq_conv_model(8, 16)  # pairs that feed convolutions, not an attention
    before = qdq_conv.SerializeToString()
    assert symmetric_int8_attention(Graph(qdq_conv)) == 0 and qdq_conv.SerializeToString() == before


@pytest.mark.parametrize("model", [
    _conv_model(4, 4, strides=[2, 2]), _conv_model(4, 4, group=2), _conv_model(4, 4, dilations=[2, 2], pads=[2] * 4),
    _conv_model(4, 4, kernel=1, pads=[0] * 4), _conv_model(4, 4, pads=[0] * 4), _conv_model(4, 4, weight_input=True),
    _conv_model(4, 4, side=("h // 4", "w // 4")), _conv_model(4, 4, side=("h", "w**2"))],
    ids=["stride2", "group2", "dilated", "1x1", "unpadded", "runtime-weight", "16x16-at-512px", "unknown-side"])
def test_winograd_leaves_other_convolutions_alone(model):
    assert winograd.winograd_conv(Graph(model)) == 0
    assert [n.op_type for n in model.graph.node] == ["Conv"]


@pytest.mark.parametrize("n_bands, h", [(2, 33), (3, 40), (5, 9), (7, 3)],
                         ids=["2-bands", "3-bands", "5-bands-odd", "more-bands-than-rows"])
def test_winograd_in_row_bands_matches_numpy(monkeypatch, n_bands, h):
    """A layer whose tiles would exceed MAX_TILE_BYTES is computed in row bands, at any height (bands
    of one row, or none, too)."""
    c, k, w = 8, 4, 13
    model = _conv_model(c, k)
    tile_bytes = 36 * c * 16 * 16 * 4  # at latent side 64 (the default layer choice): 16x16 tiles
    monkeypatch.setattr(winograd, "MAX_TILE_BYTES", -(-tile_bytes // n_bands))
    g = Graph(model)
    assert winograd.bands(g, g.nodes[0]) == n_bands
    assert winograd.winograd_conv(g) == 1
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["DepthToSpace"] == n_bands and ops["MatMul"] == 1 + 2 * n_bands  # one filter transform
    onnx.checker.check_model(model)
    x = np.random.default_rng(6).standard_normal((2, c, h, w)).astype(np.float32)
    params = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (got,) = _run(model, {"x": x})
    assert got.shape == (2, k, h, w)
    assert np.abs(got - reference.conv2d(x, params["w"], params["b"])).max() < WINOGRAD_TOL


@pytest.mark.parametrize("side,latent_side,rewritten", [("h // 2", 64, 1), ("h // 2", 32, 0), ("h // 4", 64, 0),
                                                      ("h // 4", 128, 1)])
def test_winograd_layer_choice_follows_the_size_it_is_made_for(side, latent_side, rewritten):
    """A map at half / a quarter of the latent side is rewritten where it is at least 32x32."""
    model = _conv_model(4, 4, side=(side, side.replace("h", "w")))
    assert winograd.winograd_conv(Graph(model), latent_side) == rewritten


def test_shape_annotations_are_evaluated_at_512_px():
    assert winograd.eval_dim("h", 64) == 64
    assert winograd.eval_dim("(((h - 1)//2)) + 1", 64) == 32
    assert winograd.eval_dim("8*h", 64) == 512
    assert winograd.eval_dim(7, 64) == 7
    assert winograd.eval_dim("h**2", 64) is None and winograd.eval_dim("f(h)", 64) is None
    assert winograd.eval_dim(None, 64) is None


UPSAMPLE_CASES = [  # batch, in channels, out channels, input (h, w), output size (None: scales [1, 1, 2, 2])
    (1, 3, 5, (4, 5), None), (2, 4, 6, (3, 3), None), (2, 4, 6, (4, 5), (8, 10)), (3, 3, 2, (4, 5), (7, 10)),
    (1, 4, 4, (3, 3), (5, 5)), (2, 3, 3, (5, 2), (10, 3))]


def _upsample_model(c, k, sizes: bool, bias=True, resize=None, **conv) -> onnx.ModelProto:
    """Nearest 2x upsampling and a 3x3 Conv as torch's exporter writes Upsample2D: by scales (the VAE
    decoder) or to the size of a skip connection (sdrt's UNet export)."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(4)
    kernel = conv.pop("kernel", 3)
    inits = [numpy_helper.from_array((rng.standard_normal((k, c, kernel, kernel)) / np.sqrt(9 * c)).astype(np.float32),
                                     "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
    inputs, nodes = [helper.make_tensor_value_info("x", f, ["N", c, "h", "w"])], []
    if sizes:
        inputs.append(helper.make_tensor_value_info("skip", f, ["N", c, "H", "W"]))
        nodes += [helper.make_node("Shape", ["x"], ["lead"], end=2),
                  helper.make_node("Shape", ["skip"], ["side"], start=2),
                  helper.make_node("Concat", ["lead", "side"], ["sizes"], axis=0)]
        resize_in = ["x", "", "", "sizes"]
    else:
        inits.append(numpy_helper.from_array(np.array((resize or {}).pop("scales", [1, 1, 2, 2]), np.float32), "s"))
        resize_in = ["x", "", "s"]
    r = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", **(resize or {})}
    conv.setdefault("pads", [1, 1, 1, 1])
    nodes += [helper.make_node("Resize", resize_in, ["up"], **r),
              helper.make_node("Conv", ["up", "w", "b"] if bias else ["up", "w"], ["y"], kernel_shape=[kernel] * 2,
                               **conv)]
    graph = helper.make_graph(nodes, "upsample", inputs, [helper.make_tensor_value_info("y", f, ["N", k, "H", "W"])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_nearest_resize_reference_matches_onnx_spec():
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).standard_normal((1, 2, 5, 3)).astype(np.float32)
    for size in [(10, 6), (9, 5), (10, 5)]:
        model = _upsample_model(2, 2, sizes=True)
        model.graph.output[0].name = "up"  # the Resize alone
        (want,) = ReferenceEvaluator(model).run(None, {"x": x, "skip": np.zeros((1, 2, *size), np.float32)})
        np.testing.assert_array_equal(reference.nearest_resize(x, size), want)


@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=["scales", "scales-b2", "sizes-2x", "sizes-odd-h",
                                                      "sizes-odd-both", "sizes-odd-w"])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_matches_numpy(case, bias):
    """The phases vs NumPy, on ONNX Runtime with and without its graph optimizations; where the size
    comes at run time, cropped and corrected for odd sides (three one-row convolutions), with no If."""
    n, c, k, (h, w), size = case
    model = _upsample_model(c, k, sizes=size is not None, bias=bias)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert upsample_conv(Graph(model)) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = collections.Counter(nd.op_type for nd in model.graph.node)
    assert (ops["If"], ops["DepthToSpace"], ops["Conv"]) == (0, 1, 7 if size else 4)
    assert "up" not in {o for nd in model.graph.node for o in nd.output}  # the full-size upsampling is gone
    size = size or (2 * h, 2 * w)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((n, c, h, w)).astype(np.float32)}
    if "skip" in {i.name for i in model.graph.input}:
        feeds["skip"] = np.zeros((n, c, *size), np.float32)
    want = reference.conv2d(reference.nearest_resize(feeds["x"].astype(np.float64), size), weights["w"],
                            weights.get("b"))
    for optimize in (False, True):
        got = _run_unoptimized(model, feeds) if not optimize else _run(model, feeds)[0]
        assert got.shape == want.shape and np.abs(got - want).max() < OP_TOL


@pytest.mark.parametrize("model", [
    _upsample_model(4, 4, False, resize={"mode": "linear"}),
    _upsample_model(4, 4, False, resize={"coordinate_transformation_mode": "half_pixel"}),
    _upsample_model(4, 4, False, resize={"scales": [1, 1, 3, 3]}),
    _upsample_model(4, 4, False, strides=[2, 2]), _upsample_model(4, 4, False, kernel=1, pads=[0] * 4),
    _upsample_model(4, 4, True, pads=[0] * 4)],
    ids=["linear", "half-pixel", "3x", "stride2", "1x1", "unpadded"])
def test_upsample_conv_leaves_other_pairs_alone(model):
    before = model.SerializeToString()
    assert upsample_conv(Graph(model)) == 0 and model.SerializeToString() == before


def test_upsample_conv_leaves_an_upsampling_read_twice():
    model = _upsample_model(4, 4, False)
    model.graph.output.append(helper.make_tensor_value_info("up", TensorProto.FLOAT, None))
    assert upsample_conv(Graph(model)) == 0


def _geglu_model(int8: str | None = None, axis: int = -1, sizes=None, c=16, f=24) -> tuple[onnx.ModelProto, dict]:
    """GEGLU as torch's exporter writes diffusers' (`Linear(C, 2F)`, chunk on the last axis, the first half
    times gelu of the second); INT8 "per-channel" or "per-tensor": as sdrt.export.quantize writes it
    (uint8 activations through Q/DQ pairs per tensor, the weight int8). Returns it and its float weights."""
    fl, rng = TensorProto.FLOAT, np.random.default_rng(6)
    w = (rng.standard_normal((c, 2 * f)) / np.sqrt(c)).astype(np.float32)
    b = rng.standard_normal(2 * f).astype(np.float32)
    node, tensors, nodes = helper.make_node, {"b": b}, []
    x, weight = "x", "w"
    if int8:
        w_scale = (np.abs(w).max(0) / 127 if int8 == "per-channel" else np.abs(w).max() / 127).astype(np.float32)
        tensors |= {"w_q": np.round(w / w_scale).astype(np.int8), "w_scale": w_scale,
                    "w_zp": np.zeros_like(w_scale, np.int8), "x_scale": np.float32(0.02), "x_zp": np.uint8(128),
                    "y_scale": np.float32(0.04), "y_zp": np.uint8(120)}
        w = (tensors["w_q"] * w_scale).astype(np.float32)
        nodes += [node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
                  node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
                  node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=1)]
        x, weight = "xd", "wd"
    else:
        tensors["w"] = w
    nodes.append(node("MatMul", [x, weight], ["y"]))
    if int8:
        nodes += [node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["yq"]),
                  node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["yd"])]
    split_inputs = ["h"]
    if sizes is not None:
        tensors["sizes"] = np.array(sizes, np.int64)
        split_inputs.append("sizes")
    nodes += [node("Add", ["yd" if int8 else "y", "b"], ["h"]),
              node("Split", split_inputs, ["hidden", "gate"], axis=axis, **({} if sizes else {"num_outputs": 2})),
              node("Gelu", ["gate"], ["g"]), node("Mul", ["hidden", "g"], ["out"])]
    graph = helper.make_graph(nodes, "geglu", [helper.make_tensor_value_info("x", fl, ["N", "S", c])],
                              [helper.make_tensor_value_info("out", fl, ["N", "S", f])],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in tensors.items()],
                              value_info=[helper.make_tensor_value_info("h", fl, ["N", "S", 2 * f])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), {"w": w, "b": b}


@pytest.mark.parametrize("int8", [None, "per-channel", "per-tensor"])
@pytest.mark.parametrize("axis", [-1, 2])
def test_split_linear_computes_each_half_by_its_own_layer(int8, axis):
    """The same values bit for bit (ONNX Runtime, optimizations off); no Split left; the weights shared."""
    from math import erf

    model, wb = _geglu_model(int8, axis)
    x = np.random.default_rng(7).standard_normal((2, 5, 16)).astype(np.float32)
    before = _run_unoptimized(model, {"x": x})
    initializers = {t.name for t in model.graph.initializer}
    assert split_linear(Graph(model)) == 1
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # per half: the weight's and bias's columns, and the scale's and zero point's where per channel
    assert ops["Split"] == 0 and ops["MatMul"] == 2 and ops["Slice"] == (8 if int8 == "per-channel" else 4)
    assert initializers <= {t.name for t in model.graph.initializer}  # no weight copied, every one still read
    np.testing.assert_array_equal(_run_unoptimized(model, {"x": x}), before)
    if int8 is None:  # and what GEGLU computes
        h = x.astype(np.float64) @ wb["w"] + wb["b"]
        gate = h[..., 24:]
        want = h[..., :24] * gate * 0.5 * (1 + np.vectorize(erf)(gate / np.sqrt(2)))
        assert np.abs(before - want).max() < OP_TOL


@pytest.mark.parametrize("case", ["split-axis-1", "unequal-halves", "product-read-twice", "no-shape"])
def test_split_linear_leaves_other_splits_alone(case):
    model, _ = _geglu_model("per-channel", axis={"split-axis-1": 1, "no-shape": 2}.get(case, -1),
                            sizes=[20, 28] if case == "unequal-halves" else None)
    if case == "product-read-twice":
        model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    if case == "no-shape":  # the last axis by number, the rank unknown: not taken on trust
        del model.graph.value_info[:]
    before = model.SerializeToString()
    assert split_linear(Graph(model)) == 0 and model.SerializeToString() == before


def test_dead_node_removal_keeps_what_a_subgraph_reads():
    """An If's branches read outer values without listing them as inputs; Graph counts them."""
    from sdrt.kernels.graph import node_inputs

    f = TensorProto.FLOAT
    branch = {n: helper.make_graph([helper.make_node("Add", ["x", w], [f"{n}_y"])], n, [],
                                   [helper.make_tensor_value_info(f"{n}_y", f, [2])])
              for n, w in (("a", "wa"), ("b", "wb"))}
    nodes = [helper.make_node("Neg", ["x"], ["unused"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch["a"], else_branch=branch["b"])]
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("wa", "wb", "dead")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", f, [2])], inits)
    g = Graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10))
    reads = node_inputs(g.nodes[1])
    assert reads[0] == "c" and sorted(reads[1:]) == ["wa", "wb", "x"]  # each outer value once
    assert g.remove_dead() == 1 and set(g.initializers) == {"wa", "wb"}
    assert [n.name for n in g.consumers["wa"]] == [g.nodes[0].name] and g.nodes[0].op_type == "If"


def _upsamplers(checkpoint, component) -> int:
    """How many Upsample2D layers with a convolution the PyTorch module has: what the openvino
    target's UpsampleConv must rewrite, exactly."""
    module = _torch_module(_torch_pipe(checkpoint), component)
    return sum(type(m).__name__ == "Upsample2D" and m.use_conv for m in module.modules())


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_every_upsampler_is_rewritten_for_openvino(engines, checkpoints, kind):
    manifest = Manifest.read(engines[kind])
    counts = {}
    for name, entry in manifest.components.items():
        expected = counts[name] = _upsamplers(checkpoints[kind], name)
        graph = entry.targets.get("openvino")
        if not expected:  # float graphs with no upsampler: OpenVINO runs the standard graph
            assert graph is None, name
            continue
        geglus = sum(type(m).__name__ == "GEGLU" for m in _torch_module(_torch_pipe(checkpoints[kind]), name).modules())
        assert graph.fused == {"SymmetricInt8Attention": 0, "UpsampleConv": expected, "SplitLinear": geglus}
        assert graph.parity_max_abs <= entry.parity_tolerance
        ops = _op_counts(engines[kind] / graph.file)
        assert ops["Split"] == 0 and (geglus > 0) == (name == "unet")  # GEGLU: the UNet's transformer blocks
        # the UNet asks for its skip connection's size (odd latent sides): its corrections upsample one
        # row and one column of the input per layer
        assert ops["DepthToSpace"] == expected and ops["Resize"] == (2 * expected if name == "unet" else 0)
    assert counts["unet"] and counts["vae_decoder"] and not counts["vae_encoder"] + counts["text_encoder"]
    unet = manifest.components["unet"]
    assert unet.targets["openvino"].file in unet.feature_cache  # feature caching's pair for it, checked at export


@functools.cache
def _torch_pipe(checkpoint):
    """The checkpoint's diffusers pipeline (fp32), loaded once for every test that reads it."""
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)


def _torch_module(pipe, component):
    return {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae.decoder,
            "vae_encoder": pipe.vae.encoder}[component]


def _op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def _attention_modules(checkpoint, component):
    """How many attention calls the PyTorch module makes: what each pass must rewrite, exactly."""
    module = _torch_module(_torch_pipe(checkpoint), component)
    names = {"Attention", "CLIPAttention", "CLIPSdpaAttention"}
    return sum(type(m).__name__ in names for m in module.modules())


ATTENTION_PASSES = ("MultiHeadAttention", "DecomposedAttention")


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_every_attention_is_rewritten_for_every_target(engines, checkpoints, kind):
    manifest = Manifest.read(engines[kind])
    counts = {}
    for name, entry in manifest.components.items():
        expected = _attention_modules(checkpoints[kind], name)
        assert expected > 0
        for target, passes in TARGETS.items():
            if target not in entry.targets:  # the same graph as another target's (or the standard one,
                # which openvino runs for float graphs without upsamplers): not written twice
                assert (target, name) in {("onnxruntime-cpu", "text_encoder"), ("openvino", "text_encoder"),
                                          ("openvino", "vae_encoder")}
                continue
            graph = entry.targets[target]
            assert {p: n for p, n in graph.fused.items() if p in ATTENTION_PASSES} == \
                {p: expected for p in passes if p in ATTENTION_PASSES}, (name, target)
            ops = _op_counts(engines[kind] / graph.file)
            assert ops["Attention"] == (0 if set(passes) & set(ATTENTION_PASSES) else expected)
            if "MultiHeadAttention" in passes:
                assert ops["MultiHeadAttention"] == expected
            # parity at export: rewritten graph vs the PyTorch module, same tolerance as the standard one
            assert graph.parity_max_abs <= entry.parity_tolerance
        counts[name] = expected
    if kind == "eps":  # the built-in tiny: 4 CLIP layers, 6 transformer blocks (self + cross), 1 + 1 VAE
        assert counts == {"text_encoder": 4, "unet": 12, "vae_decoder": 1, "vae_encoder": 1}


def _winograd_layers(checkpoint, component, side: int = winograd.REFERENCE_SIDE) -> int:
    """How many Conv2d modules the Winograd pass must rewrite, from PyTorch: 3x3, stride 1, dilation
    1, one group, padding 1, output at least MIN_SIDE on each side, at latent side SIDE (default 64:
    512 px), found by running it."""
    import torch

    pipe = _torch_pipe(checkpoint)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent = torch.zeros(1, pipe.vae.config.latent_channels, side, side)
    module = _torch_module(pipe, component)
    args = {
        "unet": (torch.zeros(1, pipe.unet.config.in_channels, side, side), torch.tensor([1.0]),
                 torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)),
        "vae_decoder": (latent,),
        "vae_encoder": (torch.zeros(1, 3, side * f, side * f),),
        "text_encoder": (torch.zeros(1, 77, dtype=torch.long),),
    }[component]
    found = []

    def hook(m, inputs, out):
        if (m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
                and m.padding == (1, 1) and min(out.shape[2:]) >= winograd.MIN_SIDE):
            found.append(m)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        module(*args)
    for h in handles:
        h.remove()
    return len(found)


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_winograd_rewrites_exactly_the_eligible_convolutions(engines, checkpoints, kind):
    manifest = Manifest.read(engines[kind])
    counts = {}
    for name, entry in manifest.components.items():
        expected = _winograd_layers(checkpoints[kind], name)
        graph = entry.targets.get("onnxruntime-cpu")
        got = graph.fused["WinogradConv"] if graph else 0
        assert got == expected, name
        if graph:
            assert _op_counts(engines[kind] / graph.file)["DepthToSpace"] == expected
            assert graph.parity_max_abs <= entry.parity_tolerance
        counts[name] = got
    if kind == "eps":  # tiny's UNet has two levels (64 and 32 at 512 px), its VAE one and a 2x one
        assert counts == {"text_encoder": 0, "unet": 27, "vae_decoder": 25, "vae_encoder": 14}


def test_cpu_size_chooses_the_winograd_layers_for_that_size(checkpoints, tmp_path):
    """`sdrt export --cpu-size 256`: the layers eligible at a 32-latent, counted from PyTorch; the
    choice is recorded; a size the VAE can't produce is refused."""
    from sdrt.export import export

    m = export(str(checkpoints["eps"]), tmp_path / "e", progress=False, cpu_size=256)
    for name, entry in m.components.items():
        graph = entry.targets.get("onnxruntime-cpu")
        got = graph.fused["WinogradConv"] if graph else 0
        assert got == _winograd_layers(checkpoints["eps"], name, side=32), name
        assert any("Winograd layers chosen for 256 px" in o for o in entry.optimizations) == bool(got)
    assert m.components["unet"].targets["onnxruntime-cpu"].fused["WinogradConv"] < 27  # fewer than at 512 px
    with pytest.raises(InputError, match="--cpu-size 300: need a positive multiple of the VAE scale factor"):
        export(str(checkpoints["eps"]), tmp_path / "bad", progress=False, cpu_size=300)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_optimized_engines_match_standard_end_to_end(engines, kind):
    w, h = SIZES[kind]
    args = dict(prompt="a red cube on a table", negative_prompt="blurry", steps=4, seed=3, width=w, height=h,
                num_images=2, sampler="dpmpp_2m_karras")
    plain = sdrt.Pipeline.load(engines[kind], optimized=False)
    fused = sdrt.Pipeline.load(engines[kind])
    assert fused.engine("unet").path.name == "model.onnxruntime-cpu.onnx"
    assert fused.engine("text_encoder").path.name == "model.onnxruntime.onnx"  # no convolutions: no cpu graph
    assert plain.engine("unet").path.name == "model.onnx"
    a, b = plain(**args).pixels, fused(**args).pixels
    assert np.abs(a - b).max() < 2e-3


def test_cpu_falls_back_to_the_onnxruntime_graph(engines, tmp_path):
    """Engines exported before the onnxruntime-cpu target existed still get their fused attention."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(engines["eps"], old)
    manifest = Manifest.read(old)
    for c in manifest.components.values():
        if "onnxruntime-cpu" in c.targets:
            (old / c.targets.pop("onnxruntime-cpu").file).unlink()
    manifest.files = {}  # such exports recorded no file hashes either
    manifest.write(old)
    pipe = sdrt.Pipeline.load(old)
    assert pipe.engine("unet").path.name == "model.onnxruntime.onnx"
    assert sdrt.Pipeline.load(old, provider="cpu", optimized=False).engine("unet").path.name == "model.onnx"
