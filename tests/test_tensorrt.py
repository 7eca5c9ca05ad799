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
    assert unet["sample"] == ((2, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))  # CFG doubles the batch
    assert unet["timestep"] == ((2,), (2,), (8,))
    assert unet["encoder_hidden_states"] == ((2, 77, 768), (2, 77, 768), (8, 77, 768))
    assert shapes(specs["text_encoder"], p, 8)["input_ids"] == ((2, 77), (2, 77), (8, 77))
    assert shapes(specs["vae_decoder"], p, 8)["latent"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
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
    import time

    t0 = time.perf_counter()
    export(str(checkpoints["eps"]), tmp_path / "again", backend="tensorrt", precision="fp16", progress=False,
           trt_profile=Profile((1, 1, 2), (32, 64, 128)))
    assert (tmp_path / "again" / "unet" / "model.plan").read_bytes() == (out / "unet" / "model.plan").read_bytes()
    assert time.perf_counter() - t0 < 120
