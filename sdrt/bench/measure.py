"""Timing protocol: warm up, then rounds in which every path runs the workload once, the order
rotating each round, so that each round gives one ratio per pair of paths under the same conditions."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sdrt.components import ComponentSpec

log = logging.getLogger(__name__)

# (workload name, component, batch): text B=2 is prompt + negative prompt; UNet B=2 is one step with
# classifier-free guidance
COMPONENT_WORKLOADS = (("text_encoder", "text_encoder", 2), ("unet_b1", "unet", 1), ("unet_b2", "unet", 2),
                       ("vae_decode", "vae_decoder", 1), ("vae_encode", "vae_encoder", 1))


@dataclass
class Workload:
    name: str  # e.g. "unet_b2@512"
    component: str | None  # None for a whole generation
    feeds: dict | None = None
    size: int = 0
    batch: int = 1


def component_workloads(specs: dict[str, ComponentSpec], sizes: list[int], scale_factor: int) -> list[Workload]:
    out = []
    for size in sizes:
        for name, component, batch in COMPONENT_WORKLOADS:
            if component not in specs:
                continue
            if component == "text_encoder" and size != sizes[0]:
                continue  # no spatial dims: once is enough
            dims = {"B": batch, "h": size // scale_factor, "w": size // scale_factor}
            feeds = specs[component].sample_inputs({k: v for k, v in dims.items() if k in specs[component].dims})
            label = name if component == "text_encoder" else f"{name}@{size}"
            out.append(Workload(label, component, feeds, size, batch))
    return out


def rounds(paths: list, run, warmup: int, repeats: int, progress=None,
           kept: dict | None = None, warm=None) -> dict[str, list[float]]:
    """Seconds of run(path) for each path: `warmup` untimed rounds (of warm(path) if given, e.g. a
    shorter generation of the same shapes), then `repeats` timed ones with the order rotated each
    round. A failing path is dropped from the remaining rounds (logged). KEPT, if given, gets each
    path's last timed result."""
    samples = {p.name: [] for p in paths}
    alive = list(paths)
    for r in range(warmup + repeats):
        order = alive[r % len(alive):] + alive[: r % len(alive)] if alive else []
        for p in order:
            t0 = time.perf_counter()
            try:
                result = (warm or run)(p) if r < warmup else run(p)
            except Exception as e:  # keep the other paths and what was measured
                log.warning("%s failed and is skipped from here on: %s", p.name, e)
                alive.remove(p)
                samples.pop(p.name, None)
                continue
            if r >= warmup:
                samples[p.name].append(time.perf_counter() - t0)
                if kept is not None:
                    kept[p.name] = result
            if progress:
                progress()
    return samples


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB of pixels in [0, 1] (inf where equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "samples": times}


def pair_ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """baseline time / path time, round by round (rounds are aligned: same index, same round)."""
    out = {}
    for name, times in samples.items():
        if name == baseline or baseline not in samples:
            continue
        per_round = [b / t for b, t in zip(samples[baseline], times)]
        if per_round:
            out[name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                         "per_round": per_round}
    return out


def gemm_peak(n: int = 2048, repeats: int = 3, device: str = "cpu") -> dict:
    """Measured matmul rate on this machine: the 'peak' figures are fractions of it. fp32 on the CPU;
    on a CUDA GPU (device "cuda") fp16, the precision GPU engines run in."""
    dtype = "float32"
    if device == "cuda":
        import torch

        n, dtype = max(n, 8192), "float16"  # big enough to fill a GPU
        a = torch.randn(n, n, device="cuda", dtype=torch.float16)

        def mm():
            a @ a
            torch.cuda.synchronize()

        backend = f"torch {torch.__version__} on {torch.cuda.get_device_name()}"
    else:
        try:
            import torch

            a, b = torch.randn(n, n), torch.randn(n, n)
            mm, backend = (lambda: a @ b), f"torch {torch.__version__}"
        except ImportError:
            import numpy as np

            a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
            mm, backend = (lambda: a @ a), f"numpy {np.__version__}"
    mm()
    best = min(_timed(mm) for _ in range(repeats))
    return {"gflops": 2 * n**3 / best / 1e9, "n": n, "dtype": dtype, "backend": backend}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    from sdrt.runtime.backends import cpu_features

    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_features": cpu_features()}
    for module in ("numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, check=False)
        info["gpus"] = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return info


def cold_start(path, size: int, steps: int, sampler: str, timeout: int = 1800) -> dict:
    """Load + first image in a fresh process (so its peak RSS is this path's alone)."""
    cmd = [sys.executable, "-m", "sdrt.bench.cold", *path.cold_args(), str(size), str(steps), sampler]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cold start of {path.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
