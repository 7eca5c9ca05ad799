"""Feature caching (DeepCache): the UNet's full and shallow graphs the export writes, and the sampler
loop's cache_interval, on the tiny engine dirs."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import onnx
import pytest

from sdrt.errors import InputError
from sdrt.kernels import deepcache
from sdrt.manifest import Manifest
from sdrt.runtime import feature_cache, samplers
from sdrt.runtime.backends.onnxruntime import session
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import SIZES

KIND = "eps"


@pytest.fixture(scope="module")
def pipe(engines):
    with Pipeline.load(engines[KIND]) as p:
        yield p


def _run(pipe, **kw):
    w, h = SIZES[KIND]
    args = {"steps": 6, "seed": 7, "width": w, "height": h, "sampler": "dpmpp_2m_karras"} | kw
    return pipe("a red fox in the snow", **args)


def test_export_writes_a_pair_per_unet_graph_sharing_its_weights(engines):
    d = engines[KIND]
    unet = Manifest.read(d).components["unet"]
    graphs = [unet.files[0]] + [t.file for k, t in unet.targets.items() if k not in ("tensorrt", "onnxruntime-cuda")]
    assert sorted(unet.feature_cache) == sorted(graphs)
    plain_nodes = len(onnx.load(str(d / unet.files[0]), load_external_data=False).graph.node)
    for graph, pair in unet.feature_cache.items():
        full = onnx.load(str(d / pair.full), load_external_data=False)
        shallow = onnx.load(str(d / pair.shallow), load_external_data=False)
        assert [o.name for o in full.graph.output] == ["out_sample", deepcache.FEATURE]
        weights = {t.name for t in shallow.graph.initializer}
        assert [i.name for i in shallow.graph.input if i.name not in weights] == [
            "sample", "timestep", "encoder_hidden_states", deepcache.FEATURE]
        assert [o.name for o in shallow.graph.output] == ["out_sample"]
        # the shallow graph is the UNet's outer layers only; both read the graph's own weights file
        assert len(shallow.graph.node) < 0.4 * plain_nodes
        data = {e.value for m in (full, shallow) for t in m.graph.initializer for e in t.external_data
                if e.key == "location"}
        assert data == {(d / graph).name + ".data"} or data == {(d / unet.files[0]).name + ".data"}
        assert pair.parity_max_abs is not None and pair.parity_max_abs <= 1e-5
        assert set(pair.shallow_weights) == {t.name for t in shallow.graph.initializer}
    assert not any(f.endswith(".data") and ("full" in f or "shallow" in f) for f in Manifest.read(d).files)


def test_shallow_graph_on_the_same_calls_feature_equals_the_unet(engines):
    """The cached-graph counts: the full graph's two outputs, and the shallow graph fed the feature of
    the same inputs giving the UNet's output (interval 1's invariant) within 1e-5."""
    d = engines[KIND]
    unet = Manifest.read(d).components["unet"]
    pair = unet.feature_cache[unet.file_for(("onnxruntime-cpu",))]
    feeds = unet.spec.sample_inputs({"B": 2, "h": 6, "w": 9}, seed=11)
    want = session(d / unet.file_for(("onnxruntime-cpu",))).run(None, feeds)
    out, feature = session(d / pair.full).run(None, feeds)
    assert len(want) == 1 and feature.shape == pair.feature.resolve({"B": 2, "h": 6, "w": 9})
    again = session(d / pair.shallow).run(None, feeds | {deepcache.FEATURE: feature})
    assert len(again) == 1
    np.testing.assert_allclose(out, want[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(again[0], want[0], rtol=0, atol=1e-5)


@contextlib.contextmanager
def _cached_at(pipe, interval):
    """The sampler loop on the cached UNet at INTERVAL (1 included, which requests treat as off)."""
    used = []

    def gate(unet):
        used.append(pipe.cached_unet(interval))
        return contextlib.nullcontext(used[-1])

    pipe.unet_gate = gate
    try:
        yield used
    finally:
        pipe.unet_gate = None


def test_interval_one_equals_the_plain_engines(pipe):
    plain = _run(pipe).pixels
    with _cached_at(pipe, 1) as used:
        cached = _run(pipe).pixels
    assert used[0].calls == {"full": 6, "shallow": 0}
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-5)


def _calls(pipe) -> dict[str, int]:
    return {k: pipe.engines[key].calls if key in pipe.engines else 0
            for k, key in (("full", feature_cache.FULL), ("shallow", feature_cache.SHALLOW))}


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_with_caching(pipe, name):
    """Interval 2: the full graph on even steps only (every call of those steps), the shallow one
    between; deterministic, finite and near the full-compute image."""
    plain = _run(pipe, sampler=name).pixels
    before = _calls(pipe)
    cached = _run(pipe, sampler=name, cache_interval=2).pixels
    calls = {k: v - before[k] for k, v in _calls(pipe).items()}
    np.testing.assert_array_equal(_run(pipe, sampler=name, cache_interval=2).pixels, cached)
    if calls["full"] + calls["shallow"] == 6:  # one UNet call a step: steps 0, 2, 4 full
        assert calls == {"full": 3, "shallow": 3}
    else:  # second-order samplers: two calls a step (the last step may have one)
        assert calls["full"] >= 3 and calls["shallow"] >= 3, calls
    assert np.isfinite(cached).all()
    assert 0 < np.abs(cached - plain).max() < 0.5


def test_requests_cli_and_metadata(pipe, engines, tmp_path):
    from sdrt.runtime.request import from_parameters

    result = _run(pipe, cache_interval=3)
    assert "Cache interval: 3" in result.parameters[0]
    assert from_parameters(result.parameters[0])["cache_interval"] == 3
    assert "Cache interval" not in _run(pipe).parameters[0]
    key = pipe.batch_key
    from sdrt.runtime.request import GenerateRequest

    assert key(GenerateRequest(prompt="x")) != key(GenerateRequest(prompt="x", cache_interval=2))
    with pytest.raises(InputError, match="cache_interval"):
        _run(pipe, cache_interval=0)


def test_cli_cache_interval_equals_the_python_api(pipe, engines, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    w, h = SIZES[KIND]
    out = tmp_path / "x.png"
    subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", "--engines", str(engines[KIND]),
                    "a red fox in the snow", "--steps", "6", "--seed", "7", "--width", str(w), "--height", str(h),
                    "--sampler", "dpmpp_2m_karras", "--cache-interval", "2", "-o", str(out)],
                   check=True, capture_output=True)
    want = _run(pipe, cache_interval=2).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_engine_dirs_without_the_graphs_say_so(engines, tmp_path):
    d = tmp_path / "old"
    shutil.copytree(engines[KIND], d)
    raw = json.loads((d / "manifest.json").read_text())
    for pair in raw["components"]["unet"].pop("feature_cache").values():
        for f in (pair["full"], pair["shallow"]):
            (d / f).unlink()
            raw["files"].pop(f)
    (d / "manifest.json").write_text(json.dumps(raw))
    with Pipeline.load(d) as p:
        with pytest.raises(InputError, match="feature-caching graphs.*re-export"):
            _run(p, cache_interval=2)
        assert not p.engines  # refused before any engine ran
        assert _run(p).pixels.shape[0] == 1


def test_server_batching_bypasses_merged_calls(pipe):
    """A server's step batcher merges UNet calls through unet_gate; a cached generation runs its own."""
    def gate(unet):
        raise AssertionError("the gate merged a cached generation's calls")

    pipe.unet_gate = gate
    try:
        assert np.isfinite(_run(pipe, cache_interval=2).pixels).all()
    finally:
        pipe.unet_gate = None


def test_unload_closes_the_pair(pipe):
    _run(pipe, cache_interval=2)
    assert feature_cache.FULL in pipe.engines and feature_cache.SHALLOW in pipe.engines
    pipe.unload("unet")
    assert not {"unet", feature_cache.FULL, feature_cache.SHALLOW} & set(pipe.engines)


def test_error_benchmark_runs(engines, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "error.json"
    subprocess.run([sys.executable, "benchmarks/feature_cache_error.py", "--engines", str(engines[KIND]), "--size",
                    "64", "--steps", "6", "--intervals", "1", "3", "--out", str(out)], check=True, capture_output=True)
    rows = {r["interval"]: r for r in json.loads(out.read_text())["intervals"]}
    assert rows[1]["psnr_vs_full_compute_db"] == float("inf") and rows[1]["shallow_steps"] == []
    assert [e["step"] for e in rows[3]["shallow_steps"]] == [1, 2, 4, 5]
    assert all(0 < e["relative_l2"] < 1 for e in rows[3]["shallow_steps"])
    assert 20 < rows[3]["psnr_vs_full_compute_db"] < float("inf")
