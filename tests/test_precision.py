"""--precision fp16 (run by ONNX Runtime: CUDA where present, else its CPU provider through fp32
casts, cross-checked with ONNX's reference evaluator) and --precision int8 (static QDQ)."""

from __future__ import annotations

import collections
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import sdrt
from sdrt.bench.measure import psnr
from sdrt.export import build, onnx_export, quantize
from sdrt.export.fp16 import run_fp16
from sdrt.manifest import Manifest
from sdrt.runtime.backends.onnxruntime import session
from tests.conftest import SIZES

W, H = SIZES["eps"]


@pytest.fixture(scope="module")
def fp16_engines(checkpoints, tmp_path_factory):
    from sdrt.export import export

    out = tmp_path_factory.mktemp("fp16") / "eps"
    export(str(checkpoints["eps"]), out, precision="fp16", progress=False)
    return out


@pytest.fixture(scope="module")
def int8_engines(checkpoints, tmp_path_factory):
    from sdrt.export import export

    out = tmp_path_factory.mktemp("int8") / "eps"
    export(str(checkpoints["eps"]), out, precision="int8", progress=False)
    return out


def _graph(path):
    return onnx.load(str(path))


def test_fp16_export_converts_every_component(fp16_engines):
    m = Manifest.read(fp16_engines)
    for name, c in m.components.items():
        assert c.precision == "fp16", name
        # every graph ran in fp16 at export (CUDA, or ONNX Runtime's CPU provider), within tolerance
        for err in [c.parity_max_abs] + [t.parity_max_abs for t in c.targets.values()]:
            assert err is not None and err <= c.parity_tolerance, name
        for f in {c.files[0], *(t.file for t in c.targets.values())}:
            onnx.checker.check_model(str(fp16_engines / f))  # one node per value (SSA), names ONNX Runtime loads
        g = _graph(fp16_engines / c.files[0]).graph
        types = collections.Counter(t.data_type for t in g.initializer if len(t.dims) > 1)
        assert types[TensorProto.FLOAT16] > 0 and types[TensorProto.FLOAT] == 0, name  # weights in fp16
        assert all(i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64) for i in g.input)


def test_fp16_keeps_groupnorm_and_attention_softmax_in_fp32(fp16_engines):
    m = Manifest.read(fp16_engines)
    model = onnx.shape_inference.infer_shapes(_graph(fp16_engines / m.components["unet"].file_for("tensorrt")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    nodes = model.graph.node
    groupnorms = [n for n in nodes if n.op_type == "GroupNormalization"]
    softmaxes = [n for n in nodes if n.op_type == "Softmax"]
    assert groupnorms and softmaxes
    for n in groupnorms + softmaxes:
        assert types[n.output[0]] == TensorProto.FLOAT, n.name
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs)


def test_fp16_unet_matches_fp32(fp16_engines, engines):
    """The fp16 UNet graphs (standard, MultiHeadAttention, TensorRT's) at the test image size against
    the fp32 engine, run where export runs them (sdrt.export.fp16.run_fp16)."""
    import onnxruntime as ort

    m16, m32 = Manifest.read(fp16_engines), Manifest.read(engines["eps"])
    spec = m32.components["unet"].spec
    feeds = spec.sample_inputs({"B": 2, "h": H // 8, "w": W // 8, "S": 77}, seed=4)
    want = ort.InferenceSession(str(engines["eps"] / m32.components["unet"].files[0])).run(None, feeds)[0]
    for target in (None, "onnxruntime", "tensorrt", "onnxruntime-cuda"):  # cuda's: NumPy references
        got = run_fp16(fp16_engines / m16.components["unet"].file_for(target), feeds, ["out_sample"])[0]
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got.astype(np.float64) - want).max() < onnx_export.PARITY_TOLERANCE["fp16"] * scale


def test_fp16_export_writes_the_cuda_graphs_with_their_fused_ops(fp16_engines, capsys):
    """Every component gets an onnxruntime-cuda graph, counted in the manifest and by `sdrt info`
    (the counts themselves: tests/test_cuda_target.py), which the CUDA provider prefers."""
    from sdrt.cli import main
    from sdrt.runtime.backends import PROVIDER_TARGETS
    from tests.test_cuda_target import COUNTS

    m = Manifest.read(fp16_engines)
    for name, c in m.components.items():
        assert c.targets["onnxruntime-cuda"].fused == COUNTS[name], name
        assert c.file_for(PROVIDER_TARGETS["cuda"]) == f"{name}/model.onnxruntime-cuda.onnx"
    assert main(["info", str(fp16_engines)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-cuda graph: unet/model.onnxruntime-cuda.onnx (MultiHeadAttention x12, PackedQKV x6" in out


def test_fp16_vae_decoder_falls_back_to_fp32_where_it_overflows(fp16_engines, monkeypatch, caplog):
    """An image whose fp16 decode has NaN / inf is decoded by the fp32 decoder the export kept."""
    import logging

    from sdrt.errors import NonFiniteOutput
    from sdrt.runtime.pipeline import FP32_FALLBACK

    pipe = sdrt.Pipeline.load(fp16_engines)
    c = pipe.manifest.components["vae_decoder"]
    assert c.targets[FP32_FALLBACK].file == "vae_decoder/model.onnx"
    latent = np.random.default_rng(0).standard_normal((2, 4, H // 8, W // 8)).astype(np.float32)
    decoder = pipe.engine("vae_decoder")
    real = decoder.run
    calls = []

    def overflow_on_second(feeds):  # the second image overflows
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteOutput("vae_decoder: its output sample has NaN or inf")
        return real(feeds)

    monkeypatch.setattr(decoder, "run", overflow_on_second)
    with caplog.at_level(logging.WARNING):
        got = pipe.decode(latent)
    assert "decoding with the fp32 decoder" in caplog.text
    fp32 = sdrt.runtime.backends.load_backend(fp16_engines / "vae_decoder" / "model.onnx", c.spec, "onnx", "cpu")
    want = np.clip(fp32(latent[1:]) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.array_equal(got[1], want[0])


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_fp16_execution_matches_onnx_reference_evaluator(fp16_engines, name):
    """ONNX Runtime's CPU provider on an fp16 graph (an op without an fp16 kernel computes in fp32
    between Casts) against ONNX's reference evaluator (NumPy, in fp16): the CPU check export relies on
    is an fp16 execution."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    c = Manifest.read(fp16_engines).components[name]
    feeds = c.spec.sample_inputs({"B": 2, "h": H // 8, "w": W // 8, "S": 77}, seed=5)
    outs = [t.name for t in c.spec.outputs]
    path = str(fp16_engines / c.files[0])
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(outs, feeds)
    want = ReferenceEvaluator(onnx.load(path)).run(outs, feeds)
    for g, w in zip(got, want):
        scale = max(1.0, float(np.abs(w).max()))
        assert np.abs(g.astype(np.float64) - w).max() < 1e-2 * scale, name


def test_fp16_engines_generate_on_cuda_close_to_fp32(fp16_engines, engines):
    """The whole pipeline on ONNX Runtime's CUDA provider in fp16 against the fp32 CPU engines;
    fp32 engines on CUDA too (TF32 matmuls), txt2img and img2img."""
    from PIL import Image

    from sdrt.runtime.backends.onnxruntime import has_cuda

    if not has_cuda():
        pytest.skip("CUDAExecutionProvider not available: needs onnxruntime-gpu and an NVIDIA GPU")

    args = dict(prompt="a dog", seed=1, steps=4, width=W, height=H)
    with sdrt.Pipeline.load(engines["eps"]) as cpu:
        want = [cpu(**args).pixels, cpu(**args, image=Image.new("RGB", (W, H), "green"), strength=0.6).pixels]
    for path in (fp16_engines, engines["eps"]):
        with sdrt.Pipeline.load(path, provider="cuda") as gpu:
            got = [gpu(**args).pixels, gpu(**args, image=Image.new("RGB", (W, H), "green"), strength=0.6).pixels]
        for g, w in zip(got, want):
            assert np.isfinite(g).all()
            assert np.abs(g - w).max() < 2e-2, path


def test_fp16_engines_run_on_the_cpu_provider_with_a_warning(fp16_engines, engines, caplog):
    args = dict(prompt="a dog", seed=1, steps=4, width=W, height=H)
    with caplog.at_level("WARNING", logger="sdrt"), sdrt.Pipeline.load(fp16_engines) as cpu16:
        got = cpu16(**args).pixels
    assert caplog.text.count("fp16, made for GPUs") == 1 and "--precision fp32" in caplog.text
    with sdrt.Pipeline.load(engines["eps"]) as cpu32:
        want = cpu32(**args).pixels
    assert np.isfinite(got).all() and np.abs(got - want).max() < 2e-2


def test_vae_decoder_falls_back_to_fp32_when_fp16_overflows(checkpoints, tmp_path):
    """A decoder whose activations exceed fp16's range (65504) yields inf in fp16: it stays fp32."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdrt.export import export

    pipe = StableDiffusionPipeline.from_pretrained(checkpoints["eps"])
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e6)  # GroupNorm follows: the output stays sane in fp32
    pipe.save_pretrained(tmp_path / "ckpt")
    m = export(str(tmp_path / "ckpt"), tmp_path / "out", precision="fp16", optimize=False, progress=False)
    assert m.components["vae_decoder"].precision == "fp32"
    assert "overflowed" in m.components["vae_decoder"].optimizations[0]
    assert m.components["unet"].precision == "fp16"


def test_the_cuda_graph_takes_the_precision_the_component_got(monkeypatch, tmp_path):
    """A decoder kept in fp32 gets an fp32 CUDA graph and keeps its fp32 files; an fp16 component gets
    an fp16 one and its fp32 files go."""
    import dataclasses

    from sdrt.export import build

    made = {}
    monkeypatch.setattr(build, "cuda_stage",
                        lambda entry, pipe, staging, fp16: made.setdefault(entry.spec.name, fp16))
    for name, kept in (("vae_decoder", True), ("unet", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x")
        spec = type("Spec", (), {"name": name})()  # all the stage reads of it
        fp32 = build.ComponentEntry(spec, [f"{name}/model.onnx"], "onnx", "fp32")
        fp16 = fp32 if kept else dataclasses.replace(fp32, files=[f"{name}/model.fp16.onnx"], precision="fp16")
        monkeypatch.setattr(build, "fp16_stage", lambda entry, pipe, staging, out=fp16: out)
        entry, _ = build._precision_stages(fp32, None, tmp_path, optimize=True)
        assert made[name] is (not kept) and (tmp_path / name / "model.onnx").exists() is kept


def _quantized_layers(graph, ops):
    producers = {o: n for n in graph.node for o in n.output}
    return [n for n in graph.node if n.op_type in ops and
            getattr(producers.get(n.input[1]), "op_type", None) == "DequantizeLinear"]


@pytest.mark.parametrize("name, ops, fused", [
    ("unet", ("Conv", "MatMul", "Gemm"), {"MultiHeadAttention": 12}),
    ("vae_decoder", ("Conv",), {"MultiHeadAttention": 1}),
])
def test_int8_components_are_static_qdq(int8_engines, engines, name, ops, fused):
    m = Manifest.read(int8_engines)
    entry = m.components[name]
    assert entry.precision == "int8" and entry.files[0] == f"{name}/model.int8.onnx"
    assert {n for n, c in m.components.items() if c.precision == "int8"} == {"unet", "vae_decoder"}
    g = onnx.load(str(int8_engines / entry.files[0]), load_external_data=False).graph
    ops_count = collections.Counter(n.op_type for n in g.node)
    quantized = _quantized_layers(g, ("Conv", "MatMul", "Gemm"))
    assert {n.op_type for n in quantized} <= set(ops)  # the decoder's attention keeps fp32
    assert f"{len(quantized)} {'/'.join(ops)} layers" in entry.optimizations[0]
    layers = sum(ops_count[op] for op in ops)
    assert ops_count["QuantizeLinear"] > 0 and len(quantized) > (0.8 if name == "unet" else 0.5) * layers
    assert entry.targets["onnxruntime"].fused == fused
    # the CPU graph: the layers the fp32 engines' CPU graph computes by Winograd (but a last conv whose
    # output the quantizer left without a shape), in fp32
    fp32_layers = Manifest.read(engines["eps"]).components[name].targets["onnxruntime-cpu"].fused["WinogradConv"]
    cpu = entry.targets["onnxruntime-cpu"]
    geglus = 6 if name == "unet" else 0  # tiny's 6 transformer blocks (sdrt.kernels.split_linear)
    assert cpu.fused == fused | {"WinogradConv": cpu.fused["WinogradConv"], "SplitLinear": geglus}
    assert fp32_layers - 1 <= cpu.fused["WinogradConv"] <= fp32_layers
    assert cpu.parity_max_abs <= entry.parity_tolerance
    assert entry.parity_max_abs <= entry.parity_tolerance
    assert not (int8_engines / name / "model.onnx").exists()  # the fp32 graph is not shipped
    umask = os.umask(0)
    os.umask(umask)
    for f in (int8_engines / name).iterdir():  # onnxruntime writes 0600; export widens to the umask
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_int8_unet_has_an_openvino_graph_with_int8_attention_inputs(int8_engines):
    from sdrt.kernels.graph import Graph
    from sdrt.kernels.int8_attention import attention_pairs

    m = Manifest.read(int8_engines)
    unet = m.components["unet"]
    graph = unet.targets["openvino"]
    assert graph.file == "unet/model.int8.openvino.onnx" and graph.parity_max_abs <= unet.parity_tolerance
    pairs = {}
    for f in (unet.files[0], graph.file):
        g = Graph(onnx.load(str(int8_engines / f), load_external_data=False))
        pairs[f] = [onnx.numpy_helper.to_array(g.initializers[q.input[2]]) for q, _ in attention_pairs(g)]
    # tiny's UNet: 12 attention modules, each with its own q, k and v projection
    # and its upsamplers as four phases each (sdrt.kernels.upsample; upsamplers stay fp32 in int8 graphs)
    upsamplers = sum(n.op_type == "Resize" for n in onnx.load(str(int8_engines / unet.files[0]),
                                                               load_external_data=False).graph.node)
    # and each transformer block's GEGLU projection as two layers (sdrt.kernels.split_linear): no Split left
    ops = collections.Counter(n.op_type for n in onnx.load(str(int8_engines / graph.file),
                                                           load_external_data=False).graph.node)
    assert graph.fused == {"SymmetricInt8Attention": 36, "UpsampleConv": upsamplers, "SplitLinear": 6} and upsamplers
    assert ops["Split"] == 0
    assert len(pairs[graph.file]) == 36
    assert all(z.dtype == np.uint8 for z in pairs[unet.files[0]])  # the standard graph keeps uint8
    assert all(z.dtype == np.int8 and z == 0 for z in pairs[graph.file])
    assert graph.file in unet.feature_cache  # feature caching's pair for it, checked at export
    decoder = m.components["vae_decoder"].targets["openvino"]  # its attention stays fp32; its upsamplers go
    assert decoder.fused["SymmetricInt8Attention"] == 0 and decoder.fused["UpsampleConv"] > 0
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install sdrt[openvino])")
    args = dict(prompt="a photo of an astronaut riding a horse", steps=4, seed=1, width=W, height=H)
    with sdrt.Pipeline.load(int8_engines, provider="openvino") as pipe:
        got = pipe(**args).pixels
        assert pipe.engine("unet").path.name == "model.int8.openvino.onnx"
        assert pipe.engine("vae_decoder").path.name == "model.int8.openvino.onnx"
        cached = pipe(**args, cache_interval=2).pixels
    want = sdrt.Pipeline.load(int8_engines)(**args).pixels  # ONNX Runtime, its own graph
    for image in (got, cached):
        assert np.isfinite(image).all() and psnr(image, want) > 20


def test_int8_decoder_keeps_its_images(int8_engines, engines):
    """The decoder's note states its PSNR against fp32, at least quantize.MIN_PSNR_DB; checked here again
    on a latent the calibration never saw."""
    note = Manifest.read(int8_engines).components["vae_decoder"].optimizations[0]
    assert float(note.split(" dB PSNR")[0].rsplit(" ", 1)[1]) >= quantize.MIN_PSNR_DB
    latent = np.random.default_rng(7).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32) * 0.8
    fp32 = session(engines["eps"] / "vae_decoder" / "model.onnx").run(None, {"latent": latent})[0]
    int8 = session(int8_engines / "vae_decoder" / "model.int8.onnx").run(None, {"latent": latent})[0]
    assert quantize.psnr(fp32, int8) >= quantize.MIN_PSNR_DB - 3  # a random latent, not a trajectory's


def test_int8_decoder_stays_fp32_under_the_bar(engines, tmp_path, monkeypatch):
    """Under MIN_PSNR_DB the fp32 decoder is kept as it was, with the reason noted, and no int8 file left."""
    shutil.copytree(engines["eps"] / "vae_decoder", tmp_path / "vae_decoder")
    decoder = Manifest.read(engines["eps"]).components["vae_decoder"]
    monkeypatch.setattr(quantize, "MIN_PSNR_DB", 1000.0)
    rng = np.random.default_rng(0)
    feeds = [{"latent": rng.standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)} for _ in range(2)]
    entry = build.int8_decoder(decoder, None, tmp_path, feeds)
    assert entry.precision == "fp32" and entry.files == decoder.files and entry.targets == decoder.targets
    assert entry.optimizations[-1].startswith("fp32: its int8 graph was") and "under 1000 dB" in entry.optimizations[-1]
    assert sorted(p.name for p in (tmp_path / "vae_decoder").iterdir()) == sorted(
        p.name for p in (engines["eps"] / "vae_decoder").iterdir())


def test_decoder_psnr_maps_outputs_as_images():
    a = np.full((1, 3, 4, 4), 0.5, np.float32)
    assert quantize.psnr(a, a) == float("inf")
    assert quantize.psnr(a, a + 0.2) == pytest.approx(20.0)  # [-1, 1] -> [0, 1]: an error of 0.1
    assert quantize.psnr(a * 0 + 3, a * 0 + 2) == float("inf")  # both clip to white


def test_int8_decoder_psnr_reads_the_calibration_runs_fp32_outputs(engines, int8_engines):
    """At export the int8 decoder's PSNR takes the fp32 decoder's outputs from the calibration run
    instead of running the fp32 decoder again: they are its outputs for the recorded latents."""
    feeds = quantize.calibration_feeds(engines["eps"], W, prompts=("a red fox in the snow",), steps=2)
    assert len(feeds["decoded"]) == len(feeds["vae_decoder"]) == 1
    fp32 = engines["eps"] / "vae_decoder" / "model.onnx"
    want = session(fp32).run(None, feeds["vae_decoder"][0])[0]
    np.testing.assert_allclose(feeds["decoded"][0], want, rtol=0, atol=1e-6)
    int8 = int8_engines / "vae_decoder" / "model.int8.onnx"
    again = build._decoder_psnr(fp32, int8, feeds["vae_decoder"])
    assert build._decoder_psnr(fp32, int8, feeds["vae_decoder"], feeds["decoded"]) == pytest.approx(again, abs=1e-3)
    assert 0 < again < float("inf")


def test_int8_engine_generates_close_to_fp32(int8_engines, engines):
    args = dict(prompt="a photo of an astronaut riding a horse", steps=4, seed=1, width=W, height=H)
    a = sdrt.Pipeline.load(engines["eps"])(**args).pixels
    b = sdrt.Pipeline.load(int8_engines)(**args).pixels
    assert np.isfinite(b).all()
    db = psnr(b, a)
    assert db > 20, db  # random tiny weights: a loose bound; SD 1.5 numbers are in docs/kernels.md


def test_int8_graphs_benchmark_runs(int8_engines, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "graphs.json"
    subprocess.run([sys.executable, "benchmarks/int8_unet_graphs.py", "--engines", str(int8_engines), "--sizes",
                    str(W), "--out", str(out)], check=True, capture_output=True)
    got = json.loads(out.read_text())
    graphs = ("model.int8.onnx", "model.int8.onnxruntime.onnx", "model.int8.onnxruntime-cpu.onnx")
    assert {k for k in got if k.startswith("model.")} == {f"{g}@{W}" for g in graphs}
    assert all(len(t) == 3 and min(t) > 0 for k, t in got.items() if k.startswith("model."))
    gaps = got[f"generate@{W}"]["unet_call_gaps_s"]  # 4 steps with CFG at batch 2: one call a step
    assert len(gaps) == 3 and min(gaps) > 0


def test_openvino_profile_benchmark_runs(int8_engines, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, "benchmarks/openvino_profile.py", "--engines", str(int8_engines), "--size",
                    str(W), "--calls", "2", "--top", "4", "--tokens", "256", "--int8-attention", "--out", str(out)],
                   check=True, capture_output=True)
    got = json.loads(out.read_text())
    unet = got["unet"]
    assert len(unet["step_s"]) == 2 and min(unet["step_s"]) > 0 and len(unet["slowest"]) == 4
    shares = [v["share"] for v in unet["by_kind"].values()]
    assert shares == sorted(shares, reverse=True) and abs(sum(shares) - 1) < 1e-6
    assert sum(v["nodes"] for v in unet["by_kind"].values()) >= 4
    probe = got["attention"]["by_head_size"]
    assert list(probe) == ["40", "64", "80"] and all(v["s"] > 0 for v in probe.values())
    for row in probe.values():  # fused and unfused compute the same attention as NumPy's, in bf16 at worst
        assert row["relative_rms_error"] < 2e-2 and row["unfused"]["relative_rms_error"] < 2e-2
        assert any(k.startswith("MatMul") for k in row["unfused"]["by_node_s"])
    int8 = probe["40"]["int8_qkv"]  # its error is the rounding's: the attention on rounded inputs is close
    assert int8["relative_rms_error"] < 0.1 and int8["relative_rms_error_on_rounded_inputs"] < 2e-2
    sym = got["int8_attention"]  # tiny's UNet: 12 attention modules, a q, k and v pair each
    assert sym["pairs_changed"] == 36 and all(len(t) == 2 for t in sym["step_s"].values())
    assert all(s > 0 for s in sym["attention_s"].values())
    assert 0 < sym["output_relative_rms_apart"] < 0.2 and sym["same_graph_other_kernels_apart"] < 0.2


def test_openvino_attention_probe_alone_needs_no_engines(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, "benchmarks/openvino_profile.py", "--attention-only", "--tokens", "128",
                    "--out", str(out)], check=True, capture_output=True)
    got = json.loads(out.read_text())
    assert "unet" not in got and got["attention"]["tokens"] == 128
    bad = subprocess.run([sys.executable, "benchmarks/openvino_profile.py", "--out", str(out)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--engines is required" in bad.stderr


def test_int8_decoder_variants_benchmark_runs(engines, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "variants.json"
    subprocess.run([sys.executable, "benchmarks/int8_decoder_variants.py", "--engines", str(engines["eps"]),
                    "--size", "64", "--out", str(out)], check=True, capture_output=True)
    got = json.loads(out.read_text())
    variants = got["variants"]
    assert got["fp32_s"] > 0 and len(variants) == 5 and all(v["seconds"] > 0 for v in variants.values())
    choice = variants["sdrt's choice"]
    assert choice["kept_fp32"] == list(quantize.DECODER_KEEP_FP32) and choice["layers"] > 0
    assert choice["psnr_db"] >= quantize.MIN_PSNR_DB and choice["psnr_db"] > variants["every layer"]["psnr_db"]
