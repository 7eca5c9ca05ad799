"""Time to first image from a cold start, and the process's peak RSS: run in a fresh process.

    python -m sdrt.bench.cold {sdrt|eager|diffusers-onnx} ENGINE_DIR PROVIDER OPTIMIZED(1|0) SIZE STEPS SAMPLER
    -> one JSON line
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main(kind: str, engine_dir: str, provider: str, optimized: str, size: str, steps: str, sampler: str) -> None:
    t0 = time.perf_counter()
    from sdrt.manifest import Manifest

    if kind == "sdrt":
        from sdrt.bench.paths import EnginePath

        path = EnginePath(Path(engine_dir), provider, optimized == "1")
    elif kind == "diffusers-onnx":
        from sdrt.bench.peer import DiffusersOnnxPath

        path = DiffusersOnnxPath(Path(engine_dir), Manifest.read(engine_dir), provider)
    else:
        from sdrt.bench.paths import EagerPath

        path = EagerPath(Manifest.read(engine_dir), Path(engine_dir))
    loaded = time.perf_counter()
    path.generate("a photo of an astronaut riding a horse", int(steps), int(size), 1, sampler, 0)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - t0, "first_image_s": done - t0, "generate_s": done - loaded,
                      "peak_rss_mb": peak_rss_kib() / 1024}))


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
    main(*sys.argv[1:8])
