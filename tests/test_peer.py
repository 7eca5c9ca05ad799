"""The bench's peer ONNX path: diffusers' OnnxStableDiffusionPipeline on sdrt's standard graphs,
through one- or two-node adapters to diffusers' ONNX layout. Checked against sdrt's own engines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.bench import peer
from sdrt.cli import main
from sdrt.errors import InputError
from sdrt.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def eps(engines):
    d = engines["eps"]
    return d, Manifest.read(d), Pipeline.load(d, optimized=False)


def test_adapted_graphs_compute_what_the_standard_graphs_do(eps):
    d, manifest, pipe = eps
    path = peer.DiffusersOnnxPath(d, manifest)
    scale = manifest.vae_scaling_factor
    for name, entry in manifest.components.items():
        feeds = entry.spec.sample_inputs({k: v for k, v in {"B": 2, "h": 6, "w": 9}.items() if k in entry.spec.dims})
        expected = pipe.engine(name).run(feeds)[0]
        if name == "text_encoder":
            expected = expected[-1]  # diffusers' pipeline takes the last layer
        if name == "vae_encoder":
            expected = expected / scale  # diffusers applies the scaling factor itself
        got = path._model(name)(**peer.diffusers_feeds(name, feeds, scale))[0]
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=name)
    # diffusers feeds the UNet a one-element timestep for the whole batch
    unet_feeds = manifest.components["unet"].spec.sample_inputs({"B": 2, "h": 6, "w": 9})
    unet_feeds["timestep"] = np.full(2, 321.0, np.float32)
    expected = pipe.engine("unet").run(unet_feeds)[0]
    got = path._model("unet")(**{**unet_feeds, "timestep": np.array([321.0], np.float32)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["eps", "vpred"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras", "pndm"])
def test_peer_generation_matches_sdrt(engines, kind, sampler):
    """Same latents, same deterministic sampler: diffusers' ONNX pipeline and sdrt give the same image."""
    manifest = Manifest.read(engines[kind])
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = peer.DiffusersOnnxPath(engines[kind], manifest).generate("a red cube", 4, 64, 1, sampler, 0,
                                                                  latents=latents)
    pipe = Pipeline.load(engines[kind], optimized=False)
    expected = pipe("a red cube", steps=4, width=64, height=64, sampler=sampler, latents=latents).pixels
    assert got.shape == expected.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_what_diffusers_onnx_pipeline_cannot_run_is_refused_clearly(engines):
    path = peer.DiffusersOnnxPath(engines["eps"], Manifest.read(engines["eps"]))
    with pytest.raises(InputError, match="cannot run sampler euler"):
        path.check_sampler("euler")
    with pytest.raises(InputError, match="cannot run sampler euler"):
        path.generate("x", 2, 64, 1, "euler", 0)
    with pytest.raises(InputError, match="VAE scale factor 4"):
        peer.DiffusersOnnxPath(engines["f4"], Manifest.read(engines["f4"]))
    with pytest.raises(InputError, match="not openvino"):
        peer.DiffusersOnnxPath(engines["eps"], Manifest.read(engines["eps"]), "openvino")


def test_bench_skips_the_peer_with_a_reason_and_measures_the_rest(engines, tmp_path):
    out = tmp_path / "out"
    assert main(["-q", "bench", str(engines["eps"]), "--sizes", "64", "--repeats", "1", "--warmup", "0",
                 "--steps", "2", "--sampler", "euler", "--no-cold", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["paths"] == ["sdrt", "eager"]
    assert any("cannot run sampler euler" in s for s in data["skipped"])
    assert data["end_to_end"]["generate_b1@64"]["paths"]["sdrt"]["median"] > 0
    assert "cannot run sampler euler" in (out / "results.md").read_text()
