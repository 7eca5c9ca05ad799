"""sdrt.kernels: every op a pass emits vs its NumPy reference, exact rewrite counts per component,
and rewritten engines vs the standard ones and vs PyTorch."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import sdrt
from sdrt.kernels import TARGETS, reference
from sdrt.kernels.attention import decompose_attention, fuse_multihead_attention
from sdrt.kernels.graph import MS_DOMAIN, Graph
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


def _attention_modules(checkpoint, component):
    """How many attention calls the PyTorch module makes: what each pass must rewrite, exactly."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    module = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae.decoder,
              "vae_encoder": pipe.vae.encoder}[component]
    names = {"Attention", "CLIPAttention", "CLIPSdpaAttention"}
    return sum(type(m).__name__ in names for m in module.modules())


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_every_attention_is_rewritten_for_every_target(engines, checkpoints, kind):
    manifest = Manifest.read(engines[kind])
    counts = {}
    for name, entry in manifest.components.items():
        expected = _attention_modules(checkpoints[kind], name)
        assert expected > 0
        for target, passes in TARGETS.items():
            graph = entry.targets[target]
            assert graph.fused == {p: expected for p in passes}, (name, target)
            ops = collections.Counter(n.op_type for n in
                                      onnx.load(engines[kind] / graph.file, load_external_data=False).graph.node)
            assert ops["Attention"] == 0
            if target == "onnxruntime":
                assert ops["MultiHeadAttention"] == expected
            # parity at export: rewritten graph vs the PyTorch module, same tolerance as the standard one
            assert graph.parity_max_abs <= entry.parity_tolerance
        counts[name] = expected
    if kind == "eps":  # the built-in tiny: 4 CLIP layers, 6 transformer blocks (self + cross), 1 + 1 VAE
        assert counts == {"text_encoder": 4, "unet": 12, "vae_decoder": 1, "vae_encoder": 1}


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_optimized_engines_match_standard_end_to_end(engines, kind):
    w, h = SIZES[kind]
    args = dict(prompt="a red cube on a table", negative_prompt="blurry", steps=4, seed=3, width=w, height=h,
                num_images=2, sampler="dpmpp_2m_karras")
    plain = sdrt.Pipeline.load(engines[kind], optimized=False)
    fused = sdrt.Pipeline.load(engines[kind])
    assert fused.engine("unet").path.name == "model.onnxruntime.onnx"
    assert plain.engine("unet").path.name == "model.onnx"
    a, b = plain(**args).pixels, fused(**args).pixels
    assert np.abs(a - b).max() < 2e-3
