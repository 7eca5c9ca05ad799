"""TensorRT: profile shapes everywhere; engine build and parity only where TensorRT and a GPU exist."""

from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt.components import ModelDims, component_specs
from sdrt.export.tensorrt import Profile, shapes
from tests.conftest import SIZES

SD15 = ModelDims(text_length=77, text_hidden=768, text_layers=12, unet_in_channels=4, latent_channels=4,
                 vae_scale_factor=8)


def test_profile_shapes_follow_the_component_specs():
    specs = component_specs(SD15)
    p = Profile(batch=(1, 1, 4), pixels=(256, 512, 1024))
    unet = shapes(specs["unet"], p, 8)
    # CFG doubles the UNet's batch; guidance off (scale <= 1) runs one image at batch 1
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert unet["timestep"] == ((1,), (2,), (8,))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 3 * 77, 768))  # 1 to 3 chunks
    assert shapes(specs["text_encoder"], p, 8)["input_ids"] == ((1, 77), (1, 77), (4, 77))  # a prompt per call
    assert shapes(specs["vae_decoder"], p, 8)["latent"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
    wide = Profile(batch=(2, 2, 4), pixels=(256, 512, 1024))  # the decoder still gets one image per call
    assert shapes(specs["vae_decoder"], wide, 8)["latent"][0] == (1, 4, 32, 32)
    assert shapes(specs["vae_encoder"], p, 8)["image"] == ((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 1024, 1024))


def _gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU: sdrt[tensorrt])")
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess or count == 0:
        pytest.skip("no CUDA GPU")
    return trt


def test_tensorrt_engines_match_onnx_runtime(checkpoints, engines, tmp_path):
    _gpu()
    from sdrt.export import export

    w, h = SIZES["eps"]
    out = tmp_path / "trt"
    export(str(checkpoints["eps"]), out, backend="tensorrt", precision="fp16", progress=False,
           trt_profile=Profile((1, 1, 2), (32, 64, 128)))
    args = dict(prompt="a red cube", steps=4, seed=2, width=w, height=h)
    want = sdrt.Pipeline.load(engines["eps"])(**args).pixels
    got = sdrt.Pipeline.load(out, provider="tensorrt")(**args).pixels
    assert np.abs(got - want).max() < 2e-2
    # a second export of the same weights reuses the cached engines
    export(str(checkpoints["eps"]), tmp_path / "again", backend="tensorrt", precision="fp16", progress=False,
           trt_profile=Profile((1, 1, 2), (32, 64, 128)))
    assert (tmp_path / "again" / "unet" / "model.plan").read_bytes() == (out / "unet" / "model.plan").read_bytes()


# -- sdrt's side of TensorRT, against stand-ins (tests/fake_tensorrt.py) -------------------------

@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    from tests import fake_tensorrt

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    return fake_tensorrt.install(monkeypatch)


def test_tensorrt_export_and_runtime_with_stand_ins(checkpoints, engines, tmp_path, fake_trt):
    """Export with --backend tensorrt, then generate with --provider tensorrt, TensorRT and CUDA
    replaced by stand-ins that run each engine's ONNX graph with ONNX Runtime: the manifest wiring,
    profiles, buffers and CUDA graph capture/replay give the ONNX Runtime engines' image."""
    from sdrt.errors import InputError
    from sdrt.export import export

    trt, cuda = fake_trt
    w, h = SIZES["eps"]
    out = tmp_path / "trt"
    m = export(str(checkpoints["eps"]), out, backend="tensorrt", progress=False,
               trt_profile=Profile((1, 1, 2), (32, 64, 128)))
    assert trt.builds == 4
    for c in m.components.values():
        assert c.backend == "tensorrt" and c.files[0].endswith("model.plan") and (out / c.files[0]).is_file()
        assert any(o.startswith("TensorRT engine: batch (1, 1, 2), (32, 64, 128) px") for o in c.optimizations)

    args = dict(prompt="a red cube", steps=4, seed=2, width=w, height=h, sampler="euler")
    want = sdrt.Pipeline.load(engines["eps"])(**args).pixels
    with sdrt.Pipeline.load(out, provider="tensorrt") as pipe:
        got = pipe(**args).pixels
        unet = pipe.engines["unet"]
        # UNet call 1 runs, call 2 is captured and launched, calls 3 and 4 replay the graph; the text
        # encoder runs once (prompt and negative prompt in one call)
        assert (unet.context.runs, cuda.instantiated, cuda.launches) == (4, 1, 3)
        again = pipe(**args).pixels  # same prompts: cached embeddings, no text encoder call; the UNet
        # replays; the decoder captures
        assert (unet.context.runs, cuda.instantiated, cuda.launches) == (8, 2, 3 + 4 + 1)
        smaller = pipe(**(args | dict(width=w - 16, height=h - 16))).pixels  # smaller: no new buffers
        assert unet.context.runs == 12 and smaller.shape == (1, h - 16, w - 16, 3)
        assert pipe(**(args | dict(guidance_scale=1.0))).pixels.shape == got.shape  # UNet batch 1
        with pytest.raises(InputError, match=r"outside the TensorRT engine's profile .*--trt-sizes"):
            pipe(**(args | dict(width=256, height=256)))
    assert np.abs(got - want).max() < 1e-4
    assert np.array_equal(got, again)
    assert not (cuda.memory or cuda.streams or cuda.graphs or cuda.execs)  # close() released everything


def _component(engines, name):
    from sdrt.manifest import Manifest

    c = Manifest.read(engines["eps"]).components[name]
    return engines["eps"] / c.file_for("tensorrt"), [engines["eps"] / f for f in c.files if f.endswith(".data")], c.spec


def test_engine_and_timing_caches(engines, tmp_path, fake_trt):
    import shutil

    from sdrt.export.tensorrt import build_engine, cache_dir

    trt, _ = fake_trt
    onnx_file, weights, spec = _component(engines, "unet")
    p = Profile((1, 1, 2), (32, 64, 128))
    assert build_engine(onnx_file, weights, tmp_path / "a.plan", spec, p, 8) is False
    assert build_engine(onnx_file, weights, tmp_path / "b.plan", spec, p, 8) is True  # same key: a copy
    assert trt.builds == 1 and (tmp_path / "a.plan").read_bytes() == (tmp_path / "b.plan").read_bytes()
    assert build_engine(onnx_file, weights, tmp_path / "c.plan", spec, Profile((1, 1, 4), (32, 64, 128)), 8) is False
    moved = tmp_path / "moved"  # other weights (one byte more): another key
    moved.mkdir()
    for f in (onnx_file, *weights):
        shutil.copyfile(f, moved / f.name)
    with open(moved / weights[0].name, "ab") as f:
        f.write(b"\0")
    moved_weights = [moved / w.name for w in weights]
    assert build_engine(moved / onnx_file.name, moved_weights, tmp_path / "d.plan", spec, p, 8) is False
    assert trt.builds == 3
    assert len(list(cache_dir().glob("unet-*.plan"))) == 3
    # one timing cache per GPU and TensorRT version, read by each build and written back grown
    (timing,) = cache_dir().glob("timing-*.cache")
    assert timing.name == "timing-Fake_GPU_80GB-sm90-10.99.0-fake.cache"
    assert timing.read_bytes() == b"timing;" * 3


def test_engine_build_errors(engines, tmp_path, fake_trt):
    from sdrt.errors import SdrtError
    from sdrt.export.tensorrt import build_engine

    _, weights, spec = _component(engines, "unet")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(SdrtError, match=r"TensorRT cannot parse .*bad.onnx: ModelImporter"):
        build_engine(bad, [], tmp_path / "x.plan", spec, Profile(), 8)
    assert not (tmp_path / "x.plan").exists()


def test_cuda_graph_capture_failure_falls_back(engines, tmp_path, fake_trt):
    """An engine CUDA can't capture runs without graphs, with the same outputs."""
    from sdrt.export.tensorrt import build_engine
    from sdrt.runtime.backends.tensorrt import TensorRtBackend

    _, cuda = fake_trt
    onnx_file, weights, spec = _component(engines, "vae_decoder")
    build_engine(onnx_file, weights, tmp_path / "vae.plan", spec, Profile((1, 1, 2), (32, 64, 128)), 8)
    latent = np.random.default_rng(0).standard_normal((1, 4, 6, 9)).astype(np.float32)
    with TensorRtBackend(tmp_path / "vae.plan", spec, "tensorrt") as vae:
        first = vae(latent)
        cuda.capture_unsupported = True
        second = vae(latent)  # the capture fails: runs eagerly, and never tries again
        third = vae(latent * 2)[:, :, :8]
        assert (vae.graphs, vae.context.runs, cuda.instantiated, cuda.launches) == (False, 3, 0, 0)
        assert vae(latent * 2)[:, :, :8].shape == third.shape and vae.context.runs == 4
    assert np.array_equal(first, second) and first.shape == (1, 3, 48, 72) and not cuda.memory


def test_backend_cuda_calls_on_a_real_gpu(tmp_path, monkeypatch):
    """TensorRtBackend's CUDA side (buffers, copies, stream, graph capture, replay, release) through the
    real cuda-python bindings on a GPU; the engine is a stand-in kernel (tests/fake_tensorrt.py), as
    TensorRT itself could not be installed where this ran."""
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    pytest.importorskip("cupy", reason="the stand-in engine's kernel needs CuPy")
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess or count == 0:
        pytest.skip("no CUDA GPU")
    from sdrt.components import ComponentSpec, Dim, TensorSpec
    from sdrt.runtime.backends.tensorrt import TensorRtBackend
    from tests import fake_tensorrt

    engine = fake_tensorrt.DeviceEngine(fake_tensorrt.DataType.HALF, batch=(1, 4), length=(1, 1 << 22))
    fake_tensorrt.install_on_real_cuda(monkeypatch, engine)
    B, N = Dim("B"), Dim("N")
    spec = ComponentSpec("unet", (TensorSpec("x", "float32", (B, N)), TensorSpec("t", "float32", (B,))),
                         (TensorSpec("y", "float32", (B, N)),), {"B": (1, 2, 4), "N": (1, 1 << 20, 1 << 22)})
    (tmp_path / "e.plan").write_bytes(b"plan")
    rng = np.random.default_rng(0)
    free_before = runtime.cudaMemGetInfo()[1]
    backend = TensorRtBackend(tmp_path / "e.plan", spec, "tensorrt")
    calls = [(2, 1 << 20)] * 4 + [(1, 1000), (4, 1 << 21), (4, 1 << 21), (4, 1 << 21)]
    for i, (b, n) in enumerate(calls):
        x = rng.standard_normal((b, n)).astype(np.float32)
        t = rng.uniform(0, 999, b).astype(np.float32)
        (y,) = backend.run({"x": x, "t": t})
        # the backend casts x to the engine's fp16 and y back to fp32; the kernel adds in fp32 and rounds once
        want = (2 * x.astype(np.float16).astype(np.float32) + t[:, None]).astype(np.float16).astype(np.float32)
        assert y.dtype == np.float32 and np.array_equal(y, want), (i, np.abs(y - want).max())
        if i == 3:  # call 1 ran, call 2 was captured and launched, calls 3 and 4 replayed the graph
            assert engine.executes == 2 and backend.graph_exec is not None
    # (1, 1000) ran in the large buffers without a graph; (4, 2M) grew them, then captured and replayed
    assert engine.executes == 2 + 1 + 2 and backend.graphs
    assert sum(size for _, size in backend.buffers.values()) == 4 * (1 << 21) * 4 + 4 * 4
    backend.close()
    assert runtime.cudaMemGetInfo()[1] >= free_before - (4 << 20)  # the 32 MiB of buffers freed (the
    # H100 showed 2 MiB less free after close than before the backend: the stream and CuPy's launches)
