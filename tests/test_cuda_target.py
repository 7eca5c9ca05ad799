"""The onnxruntime-cuda target without a GPU: each contrib op's NumPy reference against ONNX
Runtime's CPU kernels (where it has one) or standard ONNX ops, exact fusion counts per component of
`tiny`, the fused graphs against the standard ones (run by the references), the fp16 export's
manifest, and the CUDA run path (IO binding, CUDA graphs and their fallback) on stand-ins."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from sdrt.kernels import contrib, cuda, reference
from sdrt.manifest import Manifest

OP_TOL = 1e-5
F = TensorProto.FLOAT


def _ort(nodes, inputs: dict, outputs: list[str], ms: bool = False) -> list[np.ndarray]:
    """Run NODES on ONNX Runtime's CPU provider."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, F, list(v.shape)) for k, v in inputs.items()],
                          [helper.make_tensor_value_info(o, F, None) for o in outputs])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(g, opset_imports=opsets, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, inputs)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_reference_equals_onnx_group_normalization(silu):
    x, gamma, beta = _rand(2, 64, 5, 7), _rand(64, seed=1), _rand(64, seed=2)
    nodes = [helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], num_groups=8, epsilon=1e-5)]
    if silu:
        nodes += [helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["y", "s"], ["z"])]
    (want,) = _ort(nodes, {"x": x, "g": gamma, "b": beta}, ["z" if silu else "y"])
    got = reference.group_norm(x.transpose(0, 2, 3, 1), gamma, beta, 8, 1e-5, silu).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() < OP_TOL
    skip, bias = _rand(2, 5, 7, 64, seed=3), _rand(64, seed=4)
    y, s = reference.skip_group_norm(x.transpose(0, 2, 3, 1), gamma, beta, skip, bias, 8, 1e-5, silu)
    (want2,) = _ort(nodes, {"x": (x.transpose(0, 2, 3, 1) + skip + bias).transpose(0, 3, 1, 2), "g": gamma,
                            "b": beta}, ["z" if silu else "y"])
    assert np.abs(y.transpose(0, 3, 1, 2) - want2).max() < OP_TOL


def test_skip_layer_norm_reference_equals_onnx_runtime_kernel():
    x, skip = _rand(2, 9, 32), _rand(2, 9, 32, seed=1)
    gamma, beta, bias = _rand(32), _rand(32, seed=2), _rand(32, seed=3)
    node = helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y", "", "", "sum"],
                            domain="com.microsoft", epsilon=1e-5)
    want_y, want_sum = _ort([node], {"x": x, "s": skip, "g": gamma, "b": beta, "bias": bias}, ["y", "sum"], ms=True)
    y, _, _, s = reference.skip_layer_norm(x, skip, gamma, beta, bias, 1e-5)
    assert np.abs(y - want_y).max() < OP_TOL and np.abs(s - want_sum).max() < OP_TOL


def test_bias_split_gelu_reference_equals_standard_ops():
    x, bias = _rand(2, 6, 16), _rand(16, seed=1)
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]),
             helper.make_node("Split", ["a"], ["l", "r"], axis=2, num_outputs=2),
             helper.make_node("Gelu", ["r"], ["g"]), helper.make_node("Mul", ["l", "g"], ["y"])]
    (want,) = _ort(nodes, {"x": x, "b": bias}, ["y"])
    assert np.abs(reference.bias_split_gelu(x, bias) - want).max() < OP_TOL


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_nhwc_conv_reference_equals_onnx_conv(kernel, stride, pad):
    x, w, b = _rand(2, 8, 9, 11), _rand(6, 8, kernel, kernel, seed=1), _rand(6, seed=2)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[stride] * 2, pads=[pad] * 4)
    (want,) = _ort([node], {"x": x, "w": w, "b": b}, ["y"])
    got = reference.conv2d_nhwc(x.transpose(0, 2, 3, 1), w.transpose(0, 2, 3, 1), b, (stride, stride), (pad,) * 4)
    assert np.abs(got.transpose(0, 3, 1, 2) - want).max() < 1e-4


@pytest.mark.parametrize("layout", ["qkv", "kv"])
def test_packed_attention_reference_equals_onnx_runtime_unpacked(layout):
    b, s, n, h = 2, 7, 4, 8
    q, k, v = _rand(b, s, n * h), _rand(b, s, n * h, seed=1), _rand(b, s, n * h, seed=2)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=n)
    (want,) = _ort([node], {"q": q, "k": k, "v": v}, ["y"], ms=True)
    heads = [t.reshape(b, s, n, h) for t in (q, k, v)]
    if layout == "qkv":
        got = reference.packed_attention(np.stack(heads, axis=3), None, None, n)
    else:
        got = reference.packed_attention(q, np.stack(heads[1:], axis=3), None, n)
    assert np.abs(got - want).max() < OP_TOL


def test_quick_gelu_and_resize_references_equal_onnx_runtime():
    x = _rand(2, 3, 4, 5)
    node = helper.make_node("QuickGelu", ["x"], ["y"], domain="com.microsoft", alpha=1.702)
    (want,) = _ort([node], {"x": x}, ["y"], ms=True)
    (got,) = contrib.QuickGelu._run(None, x, alpha=1.702)
    assert np.abs(got - want).max() < OP_TOL
    sizes = np.array([2, 3, 8, 10], np.int64)
    g = helper.make_graph([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                                            coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
                          "g", [helper.make_tensor_value_info("x", F, list(x.shape))],
                          [helper.make_tensor_value_info("y", F, None)],
                          [onnx.numpy_helper.from_array(sizes, "sizes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (got,) = ReferenceEvaluator(model, new_ops=contrib.OPS).run(None, {"x": x})
    assert np.array_equal(got, want)


# -- the target on tiny's graphs ------------------------------------------------------------------

COUNTS = {  # per component of `tiny` (2 down / 2 up blocks, 1 transformer block each, 32 groups)
    "unet": {"MultiHeadAttention": 12, "PackedQKV": 6, "PackedKV": 6, "GroupNorm": 8, "SkipGroupNorm": 23,
                    "BiasSplitGelu": 6, "BiasAdd": 6, "SkipLayerNormalization": 12, "NhwcConv": 47},
    "text_encoder": {"MultiHeadAttention": 4, "SkipLayerNormalization": 8},
    "vae_decoder": {"MultiHeadAttention": 1, "GroupNorm": 14, "SkipGroupNorm": 7, "NhwcConv": 27},
    "vae_encoder": {"MultiHeadAttention": 1, "GroupNorm": 10, "SkipGroupNorm": 3, "NhwcConv": 19},
}


@pytest.fixture(scope="module")
def cuda_graphs(engines, tmp_path_factory):
    """{component: its fused graph in fp32} built from the fp32 tiny engines (the fp16 ones are the
    fp16 export's, checked at export and in tests/test_precision.py)."""
    out = tmp_path_factory.mktemp("cuda-target")
    manifest = Manifest.read(engines["eps"])
    built = {}
    for name, c in manifest.components.items():
        built[name] = out / f"{name}.onnx"
        assert cuda.build(engines["eps"] / c.files[0], built[name], fp16=False, pack=True) == COUNTS[name], name
    return manifest, built


@pytest.mark.parametrize("name", list(COUNTS))
def test_fused_graph_equals_the_standard_graph(cuda_graphs, engines, name):
    """In fp32 the fusions change nothing but rounding."""
    from sdrt.export.onnx_export import parity_sizes

    manifest, built = cuda_graphs
    spec = manifest.components[name].spec
    feeds = spec.sample_inputs(parity_sizes(spec), seed=3)
    names = [t.name for t in spec.outputs]
    want = ort.InferenceSession(str(engines["eps"] / manifest.components[name].files[0]),
                                providers=["CPUExecutionProvider"]).run(names, feeds)
    scale = max(1.0, max(float(np.abs(w).max()) for w in want))
    got = contrib.evaluate(built[name], feeds, names)
    assert max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want)) < 1e-5 * scale
    ops = [n.op_type for n in onnx.load(str(built[name]), load_external_data=False).graph.node]
    assert "Attention" not in ops  # all fused; GroupNormalization only on the VAE attention's 3-D input
    assert ops.count("GroupNormalization") == (name.startswith("vae") and 1)


def test_upcast_attention_keeps_attention_in_fp32(engines, tmp_path):
    manifest = Manifest.read(engines["eps"])
    dst = tmp_path / "unet.onnx"
    cuda.build(engines["eps"] / manifest.components["unet"].files[0], dst, fp32_attention=True)
    model = onnx.load(str(dst), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert mha and all(types.get(n.output[0], F) == F for n in mha)
    assert all(n.input[1] and n.input[2] for n in mha)  # unpacked: the fp32 kernels take no packed input
    assert any(n.op_type == "Cast" for n in model.graph.node)


# -- the CUDA run path on stand-ins ---------------------------------------------------------------

def _cpu_session(engines, name="unet"):
    manifest = Manifest.read(engines["eps"])
    c = manifest.components[name]
    return ort.InferenceSession(str(engines["eps"] / c.files[0]), providers=["CPUExecutionProvider"]), c.spec


def test_io_binder_equals_session_run_and_keeps_read_only_inputs(engines):
    from sdrt.runtime.backends.binding import IoBinder

    sess, spec = _cpu_session(engines)
    feeds = spec.sample_inputs({"B": 2, "h": 8, "w": 8, "S": 77}, seed=4)
    feeds["encoder_hidden_states"].setflags(write=False)
    binder = IoBinder(sess, spec, device="cpu")
    want = sess.run(None, feeds)
    assert np.array_equal(binder.run(feeds)[0], want[0])
    buf = next(iter(binder._buffers.values()))
    copies = []

    class Spy:  # counts copies into the conditioning's buffer
        def __init__(self, value):
            self.value = value

        def update_inplace(self, a):
            copies.append(a)
            self.value.update_inplace(a)

    buf.inputs["encoder_hidden_states"] = Spy(buf.inputs["encoder_hidden_states"])
    feeds2 = dict(feeds, sample=feeds["sample"] * 0.5)
    assert np.array_equal(binder.run(feeds2)[0], sess.run(None, feeds2)[0])
    assert copies == []  # read-only and the same array: not copied again
    feeds3 = dict(feeds2, encoder_hidden_states=feeds["encoder_hidden_states"] + 1)
    assert np.array_equal(binder.run(feeds3)[0], sess.run(None, feeds3)[0]) and len(copies) == 1
    other = spec.sample_inputs({"B": 1, "h": 8, "w": 16, "S": 77}, seed=5)  # a second shape: its own buffers
    assert np.array_equal(binder.run(other)[0], sess.run(None, other)[0]) and len(binder._buffers) == 2


@pytest.mark.parametrize("fails_at", ["load", "run"])
def test_cuda_graph_capture_failure_falls_back_to_io_binding(engines, monkeypatch, caplog, fails_at):
    """The CUDA provider's path with ONNX Runtime's CPU provider standing in for it: a session with
    CUDA graphs that fails at creation or at its first (capturing) run is replaced by a plain one."""
    from sdrt.runtime.backends import binding
    from sdrt.runtime.backends import onnxruntime as backend

    sess, spec = _cpu_session(engines)
    made = []

    def fake_session(path, provider, *, cuda_graph=False, **kw):
        made.append(cuda_graph)
        if cuda_graph and fails_at == "load":
            raise RuntimeError("This session cannot use the CUDA Graph feature: nodes on CPU")
        return sess

    real_run = binding.IoBinder.run

    def run(self, feeds):
        if self.graphs and fails_at == "run":
            raise RuntimeError("CUDA graph capture failed")
        return real_run(self, feeds)

    monkeypatch.setattr(backend, "check_ort_provider", lambda provider: None)
    monkeypatch.setattr(backend, "ort_provider_name", lambda provider: "CPUExecutionProvider")
    monkeypatch.setattr(backend, "session", fake_session)
    monkeypatch.setattr(binding.IoBinder, "run", run)
    monkeypatch.setattr(backend, "BINDING_DEVICE", "cpu")
    with caplog.at_level(logging.WARNING):
        engine = backend.OrtBackend(engines["eps"] / "unet" / "model.onnx", spec, "cuda")
        feeds = spec.sample_inputs({"B": 2, "h": 8, "w": 8, "S": 77}, seed=6)
        got = engine.run(feeds)
    assert made == [True, False]
    assert "no CUDA graphs" in caplog.text and not engine._binder.graphs
    assert np.array_equal(got[0], sess.run(None, feeds)[0])


def test_cuda_graphs_are_for_the_unet_and_can_be_turned_off(monkeypatch):
    from sdrt.runtime.backends.onnxruntime import cuda_graphs_wanted

    assert cuda_graphs_wanted("unet") and not cuda_graphs_wanted("vae_decoder")
    monkeypatch.setenv("SDRT_CUDA_GRAPHS", "0")
    assert not cuda_graphs_wanted("unet")


@pytest.mark.parametrize("opset,rewritten", [(21, 1), (18, 0)])
def test_group_norm_rewrite_needs_per_channel_scales(opset, rewritten):
    """GroupNormalization-18 scales per group, -21 per channel as GroupNorm does: only the latter is
    rewritten (with SiLU fused)."""
    from sdrt.kernels.graph import Graph

    nodes = [helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], num_groups=4),
             helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["y", "s"], ["z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 8, 4, 4])],
                          [helper.make_tensor_value_info("z", F, None)],
                          [onnx.numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("g", "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    assert cuda.group_norm_nhwc(Graph(model)) == rewritten
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["Transpose", "GroupNorm", "Transpose"] if rewritten else ["GroupNormalization", "Sigmoid", "Mul"])
