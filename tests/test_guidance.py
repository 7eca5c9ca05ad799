"""The guided UNet graphs (sdrt.kernels.guidance): what both halves of a classifier-free guidance batch
share is computed once. The export's guided graphs, the pass on small graphs, the runtime's choice
of graph per call, and the server's step batcher keeping merged guided calls guided."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.kernels.graph import Graph
from sdrt.kernels.guidance import share_guided_prefix
from sdrt.manifest import Manifest
from sdrt.runtime.backends import PROVIDER_TARGETS
from sdrt.runtime.backends.guided import GuidedBackend, guided_halves
from sdrt.runtime.backends.onnxruntime import session
from sdrt.runtime.pipeline import Pipeline
from sdrt.serve.continuous import StepBatcher, _Call
from tests.conftest import SIZES

KIND = "eps"


def _guided_feeds(spec, n: int, seed: int):
    """(plain feeds: [x; x], [t; t] and 2N contexts; guided feeds: x, t and the same contexts)."""
    sizes = spec.sizes("min") | {"B": 2 * n}
    both = spec.sample_inputs(sizes, seed=seed)
    half = {k: v[:n] if k in ("sample", "timestep") else v for k, v in both.items()}
    plain = {k: np.concatenate([v, v]) if k in ("sample", "timestep") else v for k, v in half.items()}
    return plain, half


def test_export_writes_a_guided_graph_per_cpu_unet_graph_and_pair(engines):
    d = engines[KIND]
    unet = Manifest.read(d).components["unet"]
    graphs = {unet.file_for(PROVIDER_TARGETS[p]) for p in ("cpu", "openvino")}
    pairs = [unet.feature_cache[g] for g in graphs]
    assert set(unet.guided) == graphs | {f for p in pairs for f in (p.full, p.shallow)}
    for plain_file, guided_file in unet.guided.items():
        assert (d / guided_file).is_file() and guided_file in unet.graph_files()
        pair = next((p for p in pairs if p.shallow == plain_file), None)
        for n in (1, 2):
            plain, half = _guided_feeds(unet.spec, n, seed=n)
            if pair is not None:  # the shallow graph reads the full graph's feature
                feature = session(d / pair.full, optimize=False).run([pair.feature.name], plain)[0]
                plain, half = plain | {pair.feature.name: feature}, half | {pair.feature.name: feature}
            want = session(d / plain_file, optimize=False).run(None, plain)
            got = session(d / guided_file, optimize=False).run(None, half)
            for w, g in zip(want, got, strict=True):
                assert g.shape == w.shape and g.shape[0] == 2 * n
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
        model = onnx.load(str(d / guided_file), load_external_data=False)
        # the first layers read the single half of the latents; one Concat doubles it for the rest
        readers = [n.op_type for n in model.graph.node if "sample" in n.input]
        assert readers.count("Concat") == 1 and set(readers) - {"Concat", "Shape"}, readers


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_pass_computes_the_shared_part_once_and_keeps_batch_sizes_from_shapes():
    """sample -> Conv -> Relu is shared; the context is reshaped to the sample's shape (taken from
    the sample: the full batch's, not the half's) and multiplied in. The guided graph equals the plain
    one on doubled inputs, for 1 and 3 rows per half."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["sample", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Mul", ["timestep", "timestep"], ["t2"]),
             helper.make_node("Shape", ["sample"], ["shape"]),
             helper.make_node("Reshape", ["ctx", "shape"], ["ctx4"]),
             helper.make_node("Mul", ["r", "ctx4"], ["m"]),
             helper.make_node("Unsqueeze", ["t2", "axes"], ["t4"]),
             helper.make_node("Add", ["m", "t4"], ["out"])]
    axes = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")
    model = _model(nodes, [_value("sample", ["B", 3, 4, 4]), _value("timestep", ["B"]), _value("ctx", ["B", 48])],
                   [_value("out", None)], [w, axes])
    plain = model.SerializeToString()
    graph = Graph(model)
    assert share_guided_prefix(graph) == 4  # Conv, Relu, the timestep's Mul and Unsqueeze
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 1
    for n in (1, 3):
        x = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
        t = rng.uniform(0, 999, n).astype(np.float32)
        ctx = rng.standard_normal((2 * n, 48)).astype(np.float32)
        want = session(plain).run(None, {"sample": np.concatenate([x, x]), "timestep": np.concatenate([t, t]),
                                         "ctx": ctx})[0]
        got = session(model.SerializeToString()).run(None, {"sample": x, "timestep": t, "ctx": ctx})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_pass_keeps_values_subgraphs_read_at_the_full_batch():
    """An If branch reads a shared value: the If stays at the full batch and reads the original node's
    output (computed from the doubled inputs), while another reader gets the half's, doubled."""
    then = helper.make_graph([helper.make_node("Add", ["r", "ctx"], ["y"])], "then", [], [_value("y", None)])
    other = helper.make_graph([helper.make_node("Sub", ["r", "ctx"], ["z"])], "else", [], [_value("z", None)])
    nodes = [helper.make_node("Relu", ["sample"], ["r"]),
             helper.make_node("If", ["flag"], ["branch"], then_branch=then, else_branch=other),
             helper.make_node("Mul", ["r", "ctx"], ["m"]),
             helper.make_node("Mul", ["m", "timestep"], ["mt"]),
             helper.make_node("Add", ["branch", "mt"], ["out"])]
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    model = _model(nodes, [_value("sample", ["B", 3]), _value("timestep", ["B", 1]), _value("ctx", ["B", 3]), flag],
                   [_value("out", None)])
    plain = model.SerializeToString()
    assert share_guided_prefix(Graph(model)) == 1  # the Relu
    assert [n.op_type for n in model.graph.node].count("Relu") == 2  # the If still reads the original
    rng = np.random.default_rng(2)
    x, t, ctx = rng.standard_normal((2, 3)), rng.standard_normal((2, 1)), rng.standard_normal((4, 3))
    x, t, ctx = (a.astype(np.float32) for a in (x, t, ctx))
    for f in (True, False):
        want = session(plain).run(None, {"sample": np.concatenate([x, x]), "timestep": np.concatenate([t, t]),
                                         "ctx": ctx, "flag": np.array(f)})[0]
        got = session(model.SerializeToString()).run(None, {"sample": x, "timestep": t, "ctx": ctx,
                                                            "flag": np.array(f)})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_pass_leaves_a_graph_whose_first_layer_reads_the_context():
    nodes = [helper.make_node("Add", ["sample", "ctx"], ["a"]), helper.make_node("Mul", ["a", "timestep"], ["out"])]
    model = _model(nodes, [_value("sample", ["B", 4]), _value("timestep", ["B", 1]), _value("ctx", ["B", 4])],
                   [_value("out", None)])
    before = model.SerializeToString()
    assert share_guided_prefix(Graph(model)) == 0
    assert model.SerializeToString() == before
    no_timestep = _model(nodes[:1], [_value("sample", ["B", 4]), _value("ctx", ["B", 4])], [_value("a", None)])
    assert share_guided_prefix(Graph(no_timestep)) == 0


def test_guided_halves():
    x = np.arange(8.0).reshape(2, 4)
    assert guided_halves(np.concatenate([x, x]), np.array([5.0, 6.0, 5.0, 6.0])) == 2
    assert guided_halves(np.concatenate([x, x]), np.array([5.0, 6.0, 5.0, 7.0])) == 0
    assert guided_halves(np.concatenate([x, x + 1]), np.array([5.0, 6.0, 5.0, 6.0])) == 0
    assert guided_halves(x[:1], np.array([5.0])) == 0


def _image(pipe, **kw):
    w, h = SIZES[KIND]
    return pipe("a red fox in the snow", steps=4, seed=3, width=w, height=h, **kw).pixels


def test_pipeline_runs_the_guided_graph_for_guided_steps_only(engines):
    """Guided generations, with and without feature caching, give the plain graph's images and run
    only the guided graph; an unguided one loads and runs the plain graph."""
    with Pipeline.load(engines[KIND]) as plain:
        plain.share_guided = False
        want = [_image(plain), _image(plain, cache_interval=2)]
        assert not any(isinstance(e, GuidedBackend) for e in plain.engines.values())
    with Pipeline.load(engines[KIND]) as pipe:
        got = [_image(pipe), _image(pipe, cache_interval=2)]
        unet = pipe.engines["unet"]
        assert isinstance(unet, GuidedBackend) and unet.path.name == "model.onnxruntime-cpu.onnx"
        assert unet.guided_calls == 4 and list(unet.engines) == ["guided"]
        cached = [pipe.engines[k] for k in ("unet:full", "unet:shallow")]
        assert [e.guided_calls for e in cached] == [2, 2] and all(list(e.engines) == ["guided"] for e in cached)
        unguided = _image(pipe, guidance_scale=1.0)
        assert unet.guided_calls == 4 and sorted(unet.engines) == ["guided", "plain"]
        assert unet.engines["plain"].calls == 4 and np.isfinite(unguided).all()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_openvino_runs_the_guided_graph(engines):
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install sdrt[openvino])")
    with Pipeline.load(engines[KIND], provider="openvino-fp32") as plain:
        plain.share_guided = False
        want = _image(plain)
    with Pipeline.load(engines[KIND], provider="openvino-fp32") as pipe:
        got = _image(pipe)
        assert pipe.engines["unet"].guided_calls == 4
        assert pipe.engines["unet"].engines["guided"].path.name == "model.openvino.guided.onnx"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_step_batcher_merges_guided_calls_into_a_guided_batch():
    """Two generations' guided calls run as [their first halves; their second halves], itself a
    guided batch; each gets its own rows back. Mixed with an unguided call, they merge as they come."""
    rng = np.random.default_rng(1)

    def guided_call(n):
        x, t = rng.standard_normal((n, 4, 2, 2)), rng.uniform(0, 999, n)
        return _Call((np.concatenate([x, x]), np.concatenate([t, t]), rng.standard_normal((2 * n, 3, 5))))

    def unet(sample, timestep, context):  # row-wise, so each caller's rows can be checked alone
        seen.append((sample, timestep))
        return sample * context.sum(axis=(1, 2))[:, None, None, None] + timestep[:, None, None, None]

    batcher = StepBatcher()
    for calls, guided in (([guided_call(1), guided_call(2)], True),
                          ([guided_call(1), _Call((rng.standard_normal((1, 4, 2, 2)), rng.uniform(0, 999, 1),
                                                   rng.standard_normal((1, 3, 5))))], False)):
        seen = []
        batcher._run(unet, calls)
        assert len(seen) == 1 and bool(guided_halves(*seen[0])) == guided
        for c in calls:
            np.testing.assert_allclose(c.result, unet(*c.inputs))
