"""The `sdrt` command: the README's main job on `tiny`, `info`, `samplers`, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sdrt.cli import main


def _sdrt(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sdrt.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_export_tiny_and_generate(tmp_path):
    """The README's first command, through the console entry point."""
    out = tmp_path / "engines"
    proc = _sdrt("export", "tiny", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for c in manifest["components"].values():
        assert c["parity"]["max_abs_error"] <= c["parity"]["tolerance"]
    assert manifest["source"]["name"] == "tiny" and len(manifest["source"]["sha256"]) == 64
    png = tmp_path / "cat.png"
    proc = _sdrt("generate", "a cat on a sofa", "--engines", out, "-o", png, "--seed", "3",
                 "--negative-prompt", "blurry", "--sampler", "Euler a", "--steps", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(png)
    assert "step/s" in proc.stderr or "s/step" in proc.stderr  # the progress bar
    with Image.open(png) as im:
        assert im.size == (128, 128)  # tiny's default size
        params = im.text["parameters"]
    assert params.splitlines()[0] == "a cat on a sofa"
    assert params.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 5, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 128x128, Model hash: " in params
    assert manifest["source"]["sha256"][:10] in params


def test_info_and_samplers(engines, capsys):
    assert main(["info", str(engines["f4"])]) == 0
    text = capsys.readouterr().out
    assert "VAE scale factor 4" in text and "unet: onnx fp32" in text and "parity max abs error" in text
    assert "onnxruntime graph: unet/model.onnxruntime.onnx (MultiHeadAttention x12" in text
    assert "tensorrt graph: unet/model.tensorrt.onnx (DecomposedAttention x12" in text
    assert "onnxruntime-cpu graph: unet/model.onnxruntime-cpu.onnx (MultiHeadAttention x12, WinogradConv x27" in text
    assert "guided graphs (a guided batch's shared part computed once): unet/model.onnxruntime-cpu.guided.onnx" in text
    assert main(["info", "--json", str(engines["f4"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vae_scale_factor"] == 4
    assert info["components"]["unet"]["targets"]["onnxruntime"]["fused"] == {"MultiHeadAttention": 12}
    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dpmpp_2m_karras") and "DPM++ 2M Karras" in line for line in lines)
    assert any(line.startswith("euler_a") and "stochastic" in line for line in lines)


def _bad_engine_dirs(engines, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(engines["eps"], corrupt)
    (corrupt / "manifest.json").write_text("{not json")
    missing_file = tmp_path / "missing-file"
    shutil.copytree(engines["eps"], missing_file)
    (missing_file / "unet" / "model.onnx").unlink()
    return corrupt, missing_file


BAD_GENERATE = {
    "unknown sampler": (["--sampler", "k_euler_typo"], "unknown sampler 'k_euler_typo'"),
    "size not a multiple": (["--width", "60"], "width 60: must be a multiple of 8"),
    "size over the engines' maximum": (["--width", "4096"], "width 4096: must be a multiple of 8 (the VAE "
                                                               "scale factor) from 8 to 2048"),
    "too many steps": (["--steps", "100000"], "steps: 100000 is out of range (1 to 500)"),
    "too many images": (["--batch", "9"], "num_images: 9 is out of range (1 to 8)"),
    "zero steps": (["--steps", "0"], "steps: 0 is out of range (1 to 500)"),
    "strength too high": (["--init-image", "{image}", "--strength", "1.5"], "strength: 1.5 is out of range (0 to 1)"),
    "strength negative": (["--init-image", "{image}", "--strength", "-0.1"], "strength: -0.1 is out of range (0 to 1)"),
    "unreadable init image": (["--init-image", "{bad_image}"], "cannot read image"),
    "missing init image": (["--init-image", "{tmp}/nope.png"], "cannot read image"),
    "clip skip too large": (["--clip-skip", "9"], "clip_skip 9: this text encoder has 4 layers"),
    "not a png": (["-o", "{tmp}/out.jpg"], "must be a .png"),
    "schedule type the sampler lacks": (["--sampler", "ddim", "--schedule-type", "karras"],
                                        "sampler ddim does not take schedule type 'karras'"),
    "eta for a sampler without it": (["--sampler", "euler", "--eta", "0.5"], "eta applies to the ddim sampler only"),
    "eta out of range": (["--sampler", "ddim", "--eta", "2"], "eta: 2.0 is out of range (0 to 1)"),
    "unknown schedule type": (["--schedule-type", "cosine"], "invalid choice: 'cosine'"),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_generate_bad_input(engines, tmp_path, capsys, case):
    image = tmp_path / "init.png"
    Image.new("RGB", (64, 48), "red").save(image)
    bad_image = tmp_path / "bad.png"
    bad_image.write_text("not an image")
    extra, message = BAD_GENERATE[case]
    extra = [a.format(image=image, bad_image=bad_image, tmp=tmp_path) for a in extra]
    rc = main(["generate", "x", "--engines", str(engines["eps"]), "-o", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_bad_engine_dirs(engines, tmp_path, capsys):
    corrupt, missing_file = _bad_engine_dirs(engines, tmp_path)
    cases = {tmp_path / "nowhere": "does not exist", tmp_path: "no manifest.json",
             corrupt: "is corrupt", missing_file: "unet file unet/model.onnx is missing"}
    for directory, message in cases.items():
        assert_refused([["generate", "x", "--engines", str(directory)], ["info", str(directory)]], message, capsys)


def assert_refused(commands: list[list[str]], message: str, capsys) -> None:
    """Each command exits 2 with one line on stderr that says MESSAGE."""
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("graph,flags", [
    ("model.onnxruntime-cpu.guided.onnx", []),  # what the CPU provider runs for a guided generation
    ("model.onnxruntime-cpu.onnx", ["--guidance-scale", "1"]),  # and for an unguided one
])
def test_corrupt_onnx_file(engines, tmp_path, capsys, graph, flags):
    broken = tmp_path / "broken"
    shutil.copytree(engines["eps"], broken)
    target = broken / "unet" / graph
    args = ["generate", "x", "--engines", str(broken), "-o", str(tmp_path / "o.png"), *flags]
    data = target.read_bytes()
    target.write_bytes(b"\xff" * len(data))  # same size: only loading finds it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and f"unet/{graph}" in err and len(err.strip().splitlines()) == 1
    target.write_bytes(data[: len(data) // 3])  # truncated: the size check at load finds it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"unet/{graph} has" in err and "the manifest records" in err, err
    assert not (tmp_path / "o.png").exists()


def test_hub_id_without_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", "some-org/some-model", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "could not load 'some-org/some-model' from the Hugging Face hub" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_export_bad_sources(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    for source in (tmp_path / "folder", tmp_path / "file.txt", "no-such-model"):
        assert main(["export", str(source), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "is not a checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", "tiny", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A component over its parity tolerance fails the export (exit 1) and writes no engine dir."""
    from sdrt.export import onnx_export

    monkeypatch.setitem(onnx_export.PARITY_TOLERANCE, "fp32", 0.0)
    out = tmp_path / "engines"
    assert main(["-q", "export", "tiny", str(out)]) == 1
    assert "differs from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_export_without_tensorrt_fails_cleanly(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["export", "tiny", str(tmp_path / "out"), "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "--backend tensorrt needs TensorRT" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--trt-batch", "--trt-sizes"])
def test_bad_tensorrt_profile(tmp_path, capsys, flag):
    assert main(["export", "tiny", str(tmp_path / "out"), "--backend", "tensorrt", flag, "4", "2", "1"]) == 2
    assert f"{flag} 4 2 1: need 0 < MIN <= OPT <= MAX" in capsys.readouterr().err


def test_bad_cpu_size(tmp_path, capsys):
    assert main(["export", "tiny", str(tmp_path / "out"), "--cpu-size", "0"]) == 2
    assert "--cpu-size 0: need a positive image side in pixels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
