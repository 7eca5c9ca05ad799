"""The CPU choices: OpenVINO's static-shape compilation per (batch, size), and `--provider auto`."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import sdrt
from sdrt.errors import InputError
from sdrt.manifest import Manifest
from sdrt.runtime import backends
from sdrt.runtime.backends import openvino
from tests.conftest import SIZES

KIND = "eps"


def _image(pipe, size, **kw):
    w, h = size
    return pipe("a lighthouse at dusk", steps=3, seed=5, width=w, height=h, **kw).pixels


def test_openvino_static_shapes_equal_dynamic_and_are_kept_per_shape(engines, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install sdrt[openvino])")
    small = SIZES[KIND]
    other = (small[0] + 16, small[1])
    monkeypatch.setenv(openvino.SHAPES_ENV, "dynamic")
    with sdrt.Pipeline.load(engines[KIND], provider="openvino-fp32") as dynamic:
        dynamic.share_guided = False  # the plain graph for every batch: one engine to inspect
        want = [_image(dynamic, s) for s in (small, other)]
        assert list(dynamic.engines["unet"].compiled) == [None]  # one compilation, any shape
    monkeypatch.setenv(openvino.SHAPES_ENV, "static")
    with sdrt.Pipeline.load(engines[KIND], provider="openvino-fp32") as static:
        static.share_guided = False
        got = [_image(static, s) for s in (small, other)]
        unet = static.engines["unet"]
        assert [dict(k)["sample"] for k in unet.compiled] == [(2, 4, small[1] // 8, small[0] // 8),
                                                               (2, 4, other[1] // 8, other[0] // 8)]
        _image(static, small, guidance_scale=1.0)  # batch 1: a third shape; the oldest goes
        assert len(unet.compiled) == openvino.STATIC_SHAPES
        assert dict(next(reversed(unet.compiled)))["sample"][0] == 1
        again = _image(static, small)  # compiled again for it: the same image
        cached = _image(static, small, cache_interval=2)  # the feature-caching pair compiles per shape too
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(again, got[0])
    assert np.isfinite(cached).all() and np.abs(cached - got[0]).max() > 0


def test_openvino_graphs_equal_onnx_runtime_at_even_and_odd_latent_sides(engines, monkeypatch):
    """The openvino graphs (upsamplers as four phases: sdrt.kernels.upsample) give ONNX Runtime's image
    where the UNet's upsampling is exactly 2x (latent 8x6: the phases) and where it is not (9x6: its
    If keeps the original layers), compiled per shape or once."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install sdrt[openvino])")
    sizes = [(64, 48), SIZES[KIND]]
    assert SIZES[KIND] == (72, 48)  # latent width 9: a 5-wide level upsampled to 9
    with sdrt.Pipeline.load(engines[KIND]) as cpu:
        want = [_image(cpu, s) for s in sizes]
    for mode in ("static", "dynamic"):
        monkeypatch.setenv(openvino.SHAPES_ENV, mode)
        with sdrt.Pipeline.load(engines[KIND], provider="openvino-fp32") as ov:
            assert {ov.engine(c).path.name for c in ("unet", "vae_decoder")} == {"model.openvino.onnx"}
            got = [_image(ov, s) for s in sizes]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_bad_openvino_shapes_setting_is_named(engines, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install sdrt[openvino])")
    monkeypatch.setenv(openvino.SHAPES_ENV, "fixed")
    with sdrt.Pipeline.load(engines[KIND], provider="openvino-fp32") as p:
        with pytest.raises(InputError, match="SDRT_OPENVINO_SHAPES='fixed': choose static or dynamic"):
            _image(p, SIZES[KIND])


@pytest.mark.parametrize("features,int8,installed,want", [
    (["avx512_bf16", "avx512_vnni", "avx512f"], False, True, "openvino"),
    (["amx_bf16", "avx512f"], False, True, "openvino"),
    ([], False, True, "cpu"),  # AVX2 only: OpenVINO would run fp32, no faster than ONNX Runtime's graphs
    (["avx512_vnni", "avx512f"], True, True, "openvino"),  # an int8 UNet and VNNI: OpenVINO's int8 kernels
    (["amx_int8", "amx_bf16"], True, True, "openvino"),
    ([], True, True, "cpu"),  # an int8 UNet on AVX2 alone: ONNX Runtime's int8 kernels
    (["avx512_bf16"], True, False, "cpu"),  # no OpenVINO
])
def test_auto_provider_choice(engines, monkeypatch, features, int8, installed, want):
    import onnxruntime as ort

    manifest = Manifest.read(engines[KIND])
    if int8:
        unet = manifest.components["unet"]
        manifest.components["unet"] = dataclasses.replace(unet, precision="int8")
    monkeypatch.setattr(backends, "cpu_features", lambda: features)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    if not installed:
        monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    elif want == "openvino":
        pytest.importorskip("openvino")
    provider, why = backends.resolve_provider("auto", manifest)
    assert provider == want and why
    if not installed:
        assert "OpenVINO is not installed" in why
    assert backends.resolve_provider("cpu", manifest) == ("cpu", "given")


def test_auto_provider_loads_and_says_why(engines):
    with sdrt.Pipeline.load(engines[KIND], provider="auto") as p:
        assert p.provider in backends.PROVIDERS and p.provider_choice != "given"
        assert np.isfinite(_image(p, SIZES[KIND])).all()
