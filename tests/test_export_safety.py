"""Engine dirs never lose data: a killed export (SIGKILL at a chosen stage, through the test-only hook
SDRT_FAULT, sdrt.export.outdir.fault) leaves OUT complete-old or complete-new; an export never deletes
what it did not write; leftovers are cleaned up; corrupt files and manifests are named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.errors import InputError
from sdrt.export.outdir import OutDir, remove_stale
from tests.test_cli import assert_refused


def _old_engine_dir(out: Path, files: int = 20) -> dict[str, str]:
    out.mkdir(parents=True)
    content = {f"part{i:02d}/file.bin": f"old {i}" for i in range(files)}
    for name, text in content.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    return content


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _write_new(staging: Path) -> dict[str, str]:
    content = {"manifest.json": "{}", "unet/model.onnx": "new unet", "text_encoder/model.onnx": "new te"}
    for name, text in content.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    return content


def _killed_publish(out: Path, stage: str, force: bool = True) -> subprocess.CompletedProcess:
    """A process that stages new contents for OUT and publishes them, SIGKILLed at STAGE."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from sdrt.export.outdir import OutDir
        from tests.test_export_safety import _write_new

        out = OutDir({str(out)!r}, force={force})
        with out as staging:
            _write_new(staging)
            out.publish()
    """)
    env = os.environ | {"SDRT_FAULT": stage}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def test_kill_while_the_old_dir_is_removed(tmp_path):
    out = tmp_path / "engines"
    _old_engine_dir(out)
    proc = _killed_publish(out, "removing-old")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _tree(out) == _write_new(tmp_path / "expected")  # the complete new dir, nothing of the old
    assert len(_leftovers(tmp_path)) == 1  # the half-removed old contents, with no live owner
    remove_stale(tmp_path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["staged", "published"])
def test_kill_around_the_swap(tmp_path, stage):
    out = tmp_path / "engines"
    old = _old_engine_dir(out)
    proc = _killed_publish(out, stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    want = old if stage == "staged" else _write_new(tmp_path / "expected")
    assert _tree(out) == want
    with OutDir(tmp_path / "other"):  # any later export into the same parent removes the leftovers
        pass
    assert _leftovers(tmp_path) == []


def test_kill_while_writing_components(tmp_path):
    """A real export killed after its first component: no OUT, the old OUT untouched with --force."""
    for force in (False, True):
        out = tmp_path / f"engines-{force}"
        old = _old_engine_dir(out) if force else None
        argv = [sys.executable, "-m", "sdrt.cli", "-q", "export", "tiny", str(out)] + (["--force"] if force else [])
        proc = subprocess.run(argv, env=os.environ | {"SDRT_FAULT": "component"}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert (_tree(out) == old) if force else not out.exists()
        # its staging folder, and only it: the second run removed the first's when it started
        assert [p.name.split(".partial-")[0] for p in _leftovers(tmp_path)] == [f".{out.name}"]
    remove_stale(tmp_path)
    assert _leftovers(tmp_path) == []


def test_out_created_during_the_export_is_left_alone(tmp_path):
    out = OutDir(tmp_path / "engines")
    with pytest.raises(InputError, match="it appeared while the export ran"):
        with out as staging:
            _write_new(staging)
            (tmp_path / "engines").mkdir()
            (tmp_path / "engines" / "mine.txt").write_text("a user's file")
            out.publish()
    assert _tree(tmp_path / "engines") == {"mine.txt": "a user's file"}
    assert _leftovers(tmp_path) == []


def test_file_added_to_out_during_a_forced_export_is_kept(tmp_path):
    out_dir = tmp_path / "engines"
    old = _old_engine_dir(out_dir)
    out = OutDir(out_dir, force=True)
    with pytest.raises(InputError, match="notes.txt appeared in it while the export ran"):
        with out as staging:
            _write_new(staging)
            (out_dir / "notes.txt").write_text("mine")
            out.publish()
    assert _tree(out_dir) == old | {"notes.txt": "mine"}
    assert _leftovers(tmp_path) == []


def test_two_concurrent_exports_into_one_dir(tmp_path):
    """Both start before either finishes: the first publishes, the second fails and deletes nothing."""
    first, second = OutDir(tmp_path / "engines"), OutDir(tmp_path / "engines")
    with first as a, second as b:
        _write_new(a)
        (b / "manifest.json").write_text("the second export")
        first.publish()
        with pytest.raises(InputError, match="appeared while the export ran"):
            second.publish()
    assert _tree(tmp_path / "engines") == _write_new(tmp_path / "expected")
    assert _leftovers(tmp_path) == []


def test_a_failed_export_removes_the_parents_it_made(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with OutDir(tmp_path / "a" / "b" / "engines") as staging:
            _write_new(staging)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# -- what a finished engine dir records, and what loading checks --------------------------------

def test_manifest_records_every_file(engines):
    m = json.loads((engines["eps"] / "manifest.json").read_text())
    on_disk = {str(p.relative_to(engines["eps"])) for p in engines["eps"].rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}
    for name, rec in m["files"].items():
        assert rec["size"] == (engines["eps"] / name).stat().st_size
    assert main(["-q", "verify", str(engines["eps"])]) == 0


def test_flipped_bytes_are_found(engines, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(engines["eps"], bad)
    data = bad / "unet" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["-q", "verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unet/model.onnx.data is corrupt" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "o.png"
    assert main(["-q", "generate", "x", "--engines", str(bad), "--verify", "-o", str(out)]) == 2
    assert "unet/model.onnx.data is corrupt" in capsys.readouterr().err and not out.exists()


def test_nan_weights_stop_the_generation(engines, tmp_path, capsys):
    bad = tmp_path / "nan"
    shutil.copytree(engines["eps"], bad)
    data = bad / "unet" / "model.onnx.data"
    data.write_bytes(np.full(data.stat().st_size // 4, np.nan, np.float32).tobytes())
    out = tmp_path / "o.png"
    rc = main(["-q", "generate", "x", "--engines", str(bad), "--steps", "2", "--width", "64", "--height", "64",
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "unet: its output out_sample has NaN or inf" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _edit(raw: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        raw = raw[p] if not isinstance(raw, list) else raw[int(p)]
    raw[int(last) if isinstance(raw, list) else last] = value


@pytest.mark.parametrize("path,value,message", [
    ("vae_scale_factor", 0, "vae_scale_factor must be a positive integer, got 0"),
    ("vae_scale_factor", "eight", "vae_scale_factor must be a positive integer, got 'eight'"),
    ("default_image_size", -512, "default_image_size must be a positive integer, got -512"),
    ("components.unet.inputs.0.name", "latents", "components.unet.inputs: names ['latents', 'timestep'"),
    ("scheduler_config.num_train_timesteps", 0, "scheduler_config.num_train_timesteps must be a positive integer"),
    ("vae_scaling_factor", "big", "vae_scaling_factor must be a positive number, got 'big'"),
    ("prediction_type", "noise", "prediction_type must be one of epsilon, v_prediction, sample, got 'noise'"),
])
def test_corrupt_manifest_fields_are_named(engines, tmp_path, capsys, path, value, message):
    bad = tmp_path / "bad"
    shutil.copytree(engines["eps"], bad)
    raw = json.loads((bad / "manifest.json").read_text())
    _edit(raw, path, value)
    (bad / "manifest.json").write_text(json.dumps(raw))
    assert_refused([["generate", "x", "--engines", str(bad)], ["info", str(bad)], ["verify", str(bad)]], message,
                   capsys)


def test_truncated_tokenizer_is_named(engines, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(engines["eps"], bad)
    tok = bad / "tokenizer" / "tokenizer.json"
    text = tok.read_text()
    tok.write_text(text[: len(text) // 2])
    raw = json.loads((bad / "manifest.json").read_text())
    raw["files"]["tokenizer/tokenizer.json"]["size"] = tok.stat().st_size  # past the size check
    (bad / "manifest.json").write_text(json.dumps(raw))
    assert main(["generate", "x", "--engines", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer files are corrupt" in err and len(err.strip().splitlines()) == 1
