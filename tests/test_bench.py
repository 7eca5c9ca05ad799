"""`sdrt bench` smoke run on a tiny engine dir: the output's structure and sanity, not speed."""

import json
import statistics

import pytest

from sdrt.cli import main
from sdrt.runtime.backends import amx_attention


@pytest.fixture(scope="module")
def results(engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["-q", "bench", str(engines["eps"]), "--sizes", "64", "--repeats", "2", "--steps", "2",
                 "--batches", "1", "2", "--providers", "cpu", "openvino", "--cache-intervals", "2", "--no-optimum",
                 "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), out


def test_outputs_written(results):
    data, out = results
    assert (out / "results.md").read_text().startswith("# sdrt bench")
    assert (out / "results.png").stat().st_size > 1000
    assert not (out / "results.partial.json").exists()  # removed once the full results are written
    assert data["paths"] == ["sdrt", "sdrt-openvino", "sdrt+cache2", "sdrt-openvino+cache2", "diffusers-onnx",
                             "eager"] and data["skipped"] == []
    attention = amx_attention.describe()  # which kernel runs OpenVINO's large attentions on this CPU
    assert data["providers"] == {"sdrt": "cpu (given)", "sdrt-openvino": f"openvino (given; {attention})"}
    assert (f"Providers: sdrt: cpu (given); sdrt-openvino: openvino (given; {attention})."
            in (out / "results.md").read_text())
    assert data["machine"]["cores"] >= 1 and data["gemm"]["gflops"] > 0


def test_every_figure_positive_and_ratios_consistent(results):
    data, _ = results
    entries = {**data["components"], **data["end_to_end"]}
    assert set(data["components"]) == {"text_encoder", "unet_b1@64", "unet_b2@64", "vae_decode@64", "vae_encode@64"}
    assert set(data["end_to_end"]) == {"generate_b1@64", "generate_b2@64"}
    for name, e in entries.items():
        cached = ("sdrt+cache2", "sdrt-openvino+cache2") if name in data["end_to_end"] else ()
        assert not set(cached) ^ (set(e["paths"]) & {"sdrt+cache2", "sdrt-openvino+cache2"})  # generations only
        for path in ("sdrt", "sdrt-openvino", "diffusers-onnx", "eager", *cached):
            s = e["paths"][path]
            assert len(s["samples"]) == 2 and all(t > 0 for t in s["samples"]), name
            assert s["min"] <= s["median"] <= s["max"]
        for path in ("sdrt", "sdrt-openvino", "diffusers-onnx", *cached):
            ratio = e["ratios"][path]
            per_round = [a / b for a, b in zip(e["paths"]["eager"]["samples"], e["paths"][path]["samples"])]
            assert ratio["per_round"] == pytest.approx(per_round)
            assert ratio["median"] == pytest.approx(statistics.median(per_round))
    for e in data["components"].values():
        assert e["flops"] > 0
        assert e["gflops"]["sdrt"] == pytest.approx(e["flops"] / e["paths"]["sdrt"]["median"] / 1e9)
    for e in data["end_to_end"].values():
        assert e["images_per_minute"]["sdrt"] == pytest.approx(60 * e["batch"] / e["paths"]["sdrt"]["median"])
    for e in data["end_to_end"].values():  # every path against eager fp32; cached ones against their own full compute
        psnr = e["psnr"]
        assert psnr["sdrt"]["vs_eager"] > 40 and "vs_full_compute" not in psnr["sdrt"]
        for path in ("sdrt+cache2", "sdrt-openvino+cache2"):
            assert 10 < psnr[path]["vs_full_compute"] < float("inf") and psnr[path]["vs_eager"] > 0
    assert set(data["cold_start"]) == {"sdrt", "sdrt-openvino", "diffusers-onnx", "eager", "sdrt+cache2",
                                       "sdrt-openvino+cache2"}
    for c in data["cold_start"].values():
        assert 0 < c["load_s"] <= c["first_image_s"] and c["peak_rss_mb"] > 50


def test_bad_settings_are_refused(engines, tmp_path, capsys):
    assert main(["bench", str(engines["eps"]), "--sizes", "60", "--out", str(tmp_path)]) == 2
    assert "not a multiple of the VAE scale factor 8" in capsys.readouterr().err
    assert main(["bench", str(engines["eps"]), "--sampler", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown sampler" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_eager_path_skipped_with_a_reason_when_source_is_gone(engines, tmp_path, capsys):
    """An engine dir whose source folder moved: the eager path is skipped (recorded), sdrt still measured."""
    import shutil

    moved = tmp_path / "engines"
    shutil.copytree(engines["eps"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["name"] = str(tmp_path / "moved-away")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert main(["-q", "bench", str(moved), "--sizes", "64", "--repeats", "1", "--warmup", "0", "--no-cold",
                 "--no-end-to-end", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["paths"] == ["sdrt", "diffusers-onnx"] and any(s.startswith("eager") for s in data["skipped"])
    assert data["components"]["unet_b2@64"]["paths"]["sdrt"]["median"] > 0


def test_plain_and_extra_engine_dirs_are_paths(engines, tmp_path):
    """--plain adds the un-rewritten graphs; --also another engine dir (a copy here)."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(engines["eps"], twin)
    out = tmp_path / "out"
    assert main(["-q", "bench", str(engines["eps"]), "--sizes", "64", "--repeats", "1", "--warmup", "0",
                 "--no-end-to-end", "--no-eager", "--no-peer", "--plain", "--also", str(twin), "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    # the twin's UNet is fp32 like the main one's: its precision would not tell them apart, its folder does
    assert data["paths"] == ["sdrt", "sdrt-plain", "sdrt-twin"]
    assert set(data["cold_start"]) == {"sdrt", "sdrt-plain", "sdrt-twin"}
    assert all(e["paths"]["sdrt-plain"]["median"] > 0 for e in data["components"].values())


def test_partial_results_survive_an_interrupted_run(engines, tmp_path):
    """Every finished workload is on disk (results.partial.json) before the next one starts."""
    from sdrt import bench
    from sdrt.bench import report

    calls = []

    def progress():  # dies in the middle of the third workload (UNet batch 2)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    settings = bench.Settings(sizes=[64], repeats=1, warmup=1, eager=False, peer=False, cold=False)
    with pytest.raises(KeyboardInterrupt):
        bench.run(engines["eps"], settings, progress=progress,
                  checkpoint=lambda r: report.write_partial(r, tmp_path))
    partial = json.loads((tmp_path / report.PARTIAL).read_text())
    assert list(partial["components"]) == ["text_encoder", "unet_b1@64"]
    assert partial["components"]["unet_b1@64"]["paths"]["sdrt"]["median"] > 0
    assert not (tmp_path / "results.json").exists()


def test_compare_states_the_spread_between_two_runs(results):
    """benchmarks/compare.py: every ratio of run A against run B and the largest relative difference."""
    import copy
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    data, _ = results
    lines, worst = compare.compare(data, data)
    assert worst == 0 and lines[-1].startswith("Largest relative difference of a ratio: 0%")
    other = copy.deepcopy(data)
    other["components"]["unet_b2@64"]["ratios"]["sdrt"]["median"] *= 1.25
    lines, worst = compare.compare(data, other)
    assert worst == pytest.approx(0.25)
    assert any(line.startswith("| unet_b2@64 | sdrt |") and line.endswith("| +25% |") for line in lines)


def test_gpu_figures_are_reported_where_measured(results, engines):
    """Peak GPU memory gets a column when a cold start measured it (cuda / tensorrt providers);
    eager PyTorch on the GPU is refused clearly by a torch without CUDA."""
    import copy

    import torch

    from sdrt.bench import report
    from sdrt.bench.paths import EagerPath
    from sdrt.errors import InputError
    from sdrt.manifest import Manifest

    data = copy.deepcopy(results[0])
    assert "peak GPU MB" not in report.markdown(data)
    data["cold_start"]["sdrt"]["peak_gpu_mb"] = 2345.0
    data["machine"]["gpus"] = ["NVIDIA H100 80GB HBM3, 81559 MiB, 560.35"]
    md = report.markdown(data)
    assert "| peak GPU MB |" in md and "2,345 |" in md and "GPU: NVIDIA H100" in md
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="has no CUDA device"):
            EagerPath(Manifest.read(engines["eps"]), engines["eps"], "cuda")


def test_a_model_source_is_exported_to_a_temporary_engine_dir_first(tmp_path):
    from pathlib import Path

    out = tmp_path / "out"
    assert main(["-q", "bench", "tiny", "--sizes", "64", "--repeats", "1", "--warmup", "0", "--no-cold",
                 "--no-end-to-end", "--no-peer", "--no-eager", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["paths"] == ["sdrt"] and data["source"]["name"] == "tiny"
    assert data["components"]["unet_b2@64"]["paths"]["sdrt"]["median"] > 0
    assert not Path(data["engine_dir"]).exists()  # the temporary export is gone


def test_several_step_counts_are_one_entry_each():
    """--steps 20 50: an end-to-end entry per (size, batch, steps), the first count keeping the plain key."""
    from sdrt import bench

    class Path:  # a stand-in path: records what it was asked to generate
        def __init__(self, name):
            self.name, self.calls = name, []

        def generate(self, prompt, steps, size, batch, sampler, seed):
            self.calls.append((steps, size, batch))

    paths = [Path("eager"), Path("sdrt")]
    settings = bench.Settings(sizes=[64], steps=20, more_steps=[50], batches=[1, 2], repeats=1, warmup=0)
    out = {}
    bench._end_to_end(paths, settings, None, out, lambda: None)
    assert {k: e["steps"] for k, e in out.items()} == {"generate_b1@64": 20, "generate_b1@64x50": 50,
                                                       "generate_b2@64": 20, "generate_b2@64x50": 50}
    assert paths[1].calls == [(20, 64, 1), (50, 64, 1), (20, 64, 2), (50, 64, 2)]


@pytest.mark.parametrize("providers, cuda, want", [
    (["cpu", "openvino"], True, "cpu"), (["cpu", "cuda"], False, "cuda"),
    (["auto"], True, "cuda"), (["auto"], False, "cpu"),  # auto: CUDA first where ONNX Runtime has it
])
def test_bench_device_follows_the_providers(monkeypatch, providers, cuda, want):
    import onnxruntime as ort

    from sdrt import bench

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider"] * cuda + ["CPUExecutionProvider"])
    assert bench.Settings(providers=providers).device == want


STUB_WORKER = """
import json, sys
import numpy as np
assert (__import__("pathlib").Path(sys.argv[1]) / "model_index.json").is_file()  # the source as a diffusers folder
print("noise on stdout is ignored")
print("SDRT " + json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    r = json.loads(line)
    if r["op"] == "rss":
        print("SDRT " + json.dumps({"peak_rss_mb": 123.0}), flush=True)
        continue
    assert r["scheduler"][0] == "DPMSolverMultistepScheduler" and sys.argv[3] in ("static", "dynamic")
    np.save(r["out"], np.full((r["batch"], r["size"], r["size"], 3), 0.5, np.float32))
    print("SDRT " + json.dumps({"ok": True, "seconds": 0.01}), flush=True)
"""


def test_optimum_intel_peer_protocol(engines, tmp_path, monkeypatch):
    """The optimum-intel paths as the bench drives them, with a stand-in for the worker (optimum-intel
    is not installed here): the source saved as a diffusers folder once, generations and ratios round
    by round against each configuration, PSNR against eager."""
    import sys

    from sdrt import bench
    from sdrt.bench import optimum_peer

    worker = tmp_path / "worker.py"
    worker.write_text(STUB_WORKER)
    monkeypatch.setattr(optimum_peer, "WORKER", worker)
    monkeypatch.setattr(optimum_peer, "find_python", lambda given: sys.executable)
    monkeypatch.setenv(optimum_peer.CACHE_ENV, str(tmp_path / "cache"))
    settings = bench.Settings(sizes=[64], steps=2, repeats=2, warmup=0, peer=False, cold=False)
    data = bench.run(engines["eps"], settings)
    assert data["paths"] == ["sdrt", "optimum-intel-static", "optimum-intel-dynamic", "eager"]
    e = data["end_to_end"]["generate_b1@64"]
    assert set(e["ratios_vs_peer"]) == {"optimum-intel-static", "optimum-intel-dynamic"}
    r = e["ratios_vs_peer"]["optimum-intel-static"]["sdrt"]
    per_round = [a / b for a, b in zip(e["paths"]["optimum-intel-static"]["samples"], e["paths"]["sdrt"]["samples"])]
    assert r["per_round"] == pytest.approx(per_round)
    assert 0 < e["psnr"]["optimum-intel-static"]["vs_eager"] < 30  # a flat grey image
    assert "optimum-intel-static" not in data["components"]["unet_b2@64"]["paths"]
    saved = list((tmp_path / "cache").glob("*/diffusers/model_index.json"))
    assert len(saved) == 1


def test_optimum_intel_skipped_with_the_reason(engines):
    import sys

    from sdrt import bench

    settings = bench.Settings(sizes=[64], steps=1, repeats=1, warmup=0, peer=False, cold=False, eager=False,
                              optimum=["static"], optimum_python=sys.executable)
    data = bench.run(engines["eps"], settings)
    assert data["paths"] == ["sdrt"]
    assert any("cannot import optimum.intel" in s and "--optimum-python" in s for s in data["skipped"])
