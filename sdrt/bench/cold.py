"""Time to first image from a cold start, and the process's peak RSS: run in a fresh process.

    python -m sdrt.bench.cold {sdrt|eager|diffusers-onnx|optimum-intel} ENGINE_DIR PROVIDER OPTIMIZED(1|0)
                              CACHE_INTERVAL SIZE STEPS SAMPLER
    (optimum-intel: PROVIDER is its mode, static or dynamic)
    -> one JSON line (peak_gpu_mb too for the cuda / tensorrt providers where nvidia-smi exists)
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from sdrt.bench import GPU_PROVIDERS


def main(kind: str, engine_dir: str, provider: str, optimized: str, interval: str, size: str, steps: str,
         sampler: str) -> None:
    gpu = GpuMemory() if provider in GPU_PROVIDERS and shutil.which("nvidia-smi") else None
    t0 = time.perf_counter()
    from sdrt.manifest import Manifest

    if kind == "sdrt":
        from sdrt.bench.paths import EnginePath

        path = EnginePath(Path(engine_dir), provider, optimized == "1")
        if int(interval) > 1:
            path = path.cached(int(interval))
    elif kind == "diffusers-onnx":
        from sdrt.bench.peer import DiffusersOnnxPath

        path = DiffusersOnnxPath(Path(engine_dir), Manifest.read(engine_dir), provider)
    elif kind == "optimum-intel":  # the worker's own peak, not this process's
        from sdrt.bench.optimum_peer import OptimumPath, find_python

        path = OptimumPath(Manifest.read(engine_dir), Path(engine_dir), provider, find_python(None))
    else:
        from sdrt.bench.paths import EagerPath

        path = EagerPath(Manifest.read(engine_dir), Path(engine_dir), provider)
    loaded = time.perf_counter()
    path.generate("a photo of an astronaut riding a horse", int(steps), int(size), 1, sampler, 0)
    done = time.perf_counter()
    peak = path.peak_rss_mb() if hasattr(path, "peak_rss_mb") else peak_rss_kib() / 1024
    path.close()
    out = {"load_s": loaded - t0, "first_image_s": done - t0, "generate_s": done - loaded, "peak_rss_mb": peak}
    if gpu is not None:
        out["peak_gpu_mb"] = gpu.stop()
    print(json.dumps(out))


class GpuMemory:
    """This process's peak GPU memory, polled from nvidia-smi (every framework's allocations, CUDA
    context included, which torch's own counters would miss for ONNX Runtime and TensorRT)."""

    def __init__(self, interval: float = 0.2):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        pid = str(os.getpid())
        while not self._stop.is_set():
            try:
                rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                      timeout=10, check=False).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                return
            for row in rows:
                fields = [f.strip() for f in row.split(",")]
                if len(fields) == 2 and fields[0] == pid and fields[1].isdigit():
                    self.peak = max(self.peak, float(fields[1]))
            self._stop.wait(interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=15)
        return self.peak


def peak_rss_kib() -> float:
    """This process image's peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so
    a child forked from a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    main(*sys.argv[1:9])
