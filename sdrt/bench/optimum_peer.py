"""The OpenVINO peer on CPUs: optimum-intel's OVStableDiffusionPipeline (what users pick instead of sdrt
there), driven in a worker process of the interpreter that has optimum-intel (sdrt.bench.optimum_worker).

optimum-intel pins its own transformers and torch, so it usually lives in an environment of its own:
`--optimum-python` (or SDRT_OPTIMUM_PYTHON) names that interpreter; by default this one is used if
it can import optimum.intel. The worker exports the very weights the engines came from: the engine
dir's source is rebuilt (built-in models from the same seeded modules; the sha256 is checked, as the
eager path does) and saved as a diffusers folder once per source hash, under SDRT_BENCH_CACHE
(default ~/.cache/sdrt/bench), beside optimum-intel's OpenVINO export of it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sdrt.errors import InputError
from sdrt.manifest import Manifest

log = logging.getLogger(__name__)

NAME = "optimum-intel"
MODES = ("static", "dynamic")  # reshaped to each (batch, size) and compiled for it; or dynamic shapes
PYTHON_ENV = "SDRT_OPTIMUM_PYTHON"
CACHE_ENV = "SDRT_BENCH_CACHE"
WORKER = Path(__file__).with_name("optimum_worker.py")


def find_python(given: str | None) -> str:
    """The interpreter with optimum-intel; InputError saying how to get one."""
    python = given or os.environ.get(PYTHON_ENV) or sys.executable
    probe = subprocess.run([python, "-c", "import optimum.intel, diffusers"], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        raise InputError(f"{NAME}: {python} cannot import optimum.intel; install it in an environment of its own "
                         f"(pip install torch==2.13.0 'optimum-intel[openvino]' diffusers; then pip uninstall -y "
                         f"torchvision) and pass --optimum-python ENV/bin/python or set {PYTHON_ENV}")
    return python


def source_folder(manifest: Manifest, engine_dir: Path) -> Path:
    """The engine dir's source as a diffusers folder, saved once per weights hash."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdrt" / "bench") / manifest.source["sha256"][:16]
    folder = root / "diffusers"
    if (folder / "model_index.json").is_file():
        return folder
    from sdrt.bench.paths import rebuild_source

    with tempfile.TemporaryDirectory(prefix="sdrt-bench-") as scratch:
        pipe = rebuild_source(manifest, Path(scratch), "optimum-intel path")
        tmp = root / "diffusers.partial"
        pipe.save_pretrained(tmp)
        tmp.replace(folder)
    return folder


class OptimumPath:
    """optimum-intel's pipeline in a worker process; end-to-end generations only (it has no component
    calls of the engines' form)."""

    components = False

    def __init__(self, manifest: Manifest, engine_dir: Path, mode: str, python: str):
        self.name = f"{NAME}-{mode}"
        self.manifest, self.engine_dir, self.mode, self.python = manifest, Path(engine_dir), mode, python
        folder = source_folder(manifest, self.engine_dir)
        self._scratch = tempfile.TemporaryDirectory(prefix="sdrt-optimum-")
        self.proc = subprocess.Popen([python, str(WORKER), str(folder), str(folder.parent / "openvino"), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reply()  # exported (first time) and loaded

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("SDRT "):
                reply = json.loads(line[5:])
                if "error" in reply:
                    raise RuntimeError(f"{self.name}: {reply['error']}")
                return reply
        raise RuntimeError(f"{self.name}: the worker exited (code {self.proc.wait()})")

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def cold_args(self) -> list[str]:
        os.environ[PYTHON_ENV] = self.python  # the cold-start process finds the interpreter there
        return [NAME, str(self.engine_dir), self.mode, "0", "1"]

    def generate(self, prompt: str, steps: int, size: int, batch: int, sampler: str, seed: int) -> np.ndarray:
        from sdrt.runtime.samplers import get_sampler

        out = Path(self._scratch.name) / "images.npy"
        self._ask({"op": "generate", "prompt": prompt, "steps": steps, "size": size, "batch": batch, "seed": seed,
                   "scheduler": list(get_sampler(sampler).diffusers_config()), "out": str(out)})
        return np.load(out)

    def peak_rss_mb(self) -> float:
        return float(self._ask({"op": "rss"})["peak_rss_mb"])

    def unload(self, component: str) -> None:
        pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._scratch.cleanup()
