"""The int8 UNet on ONNX Runtime: which graph, and what a generation adds around it.

Times the standard QDQ graph, the MultiHeadAttention-rewritten one and the CPU graph (that plus
Winograd for the 64x64 and 32x32 3x3 convolutions, in fp32: what `--provider cpu` runs; engines
exported before it lack it) alone, batch 2 (CFG) at 256 and 512 px, 3 calls after one; then,
inside generations of the same engine dir (`Pipeline`, `--provider cpu`), the time between the
starts of consecutive UNet calls, which is the step's UNet call plus the sampler's and the
pipeline's work between calls.

    python benchmarks/int8_unet_graphs.py --engines engines/sd15-int8 \\
        --out benchmarks/results/cpu-vs-optimum/int8_unet_graphs.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

GRAPHS = ("model.int8.onnx", "model.int8.onnxruntime.onnx", "model.int8.onnxruntime-cpu.onnx")
SIZES = (256, 512)
STEPS = {256: 10, 512: 4}  # a generation's steps at each size (others: 4)


def graph_times(engines: Path, side: int, graph: str, calls: int = 3) -> list[float]:
    from sdrt.runtime.backends.onnxruntime import session as ort_session

    session = ort_session(engines / "unet" / graph)  # the CPU provider, as sdrt's own sessions
    width = {i.name: i.shape[-1] for i in session.get_inputs()}["encoder_hidden_states"]
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, side, side)).astype(np.float32),
             "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, width)).astype(np.float32)}
    session.run(None, feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times


def step_gaps(engines: Path, sizes=SIZES) -> dict:
    from sdrt.runtime.pipeline import Pipeline

    out = {}
    with Pipeline.load(engines, provider="cpu") as pipe:
        for size in sizes:
            steps = STEPS.get(size, 4)
            starts = []
            pipe.engine("unet").observers.append(lambda feeds, starts=starts: starts.append(time.perf_counter()))
            pipe("a castle", steps=steps, width=size, height=size, seed=0)  # warm-up
            del starts[:]
            t0 = time.perf_counter()
            pipe("a castle", steps=steps, width=size, height=size, seed=0)
            out[f"generate@{size}"] = {"steps": steps, "total_s": time.perf_counter() - t0,
                                       "unet_call_gaps_s": np.diff(starts).tolist()}
            pipe.engine("unet").observers.clear()
            print(f"generate {size} px: UNet call gaps {np.round(np.diff(starts), 2).tolist()}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, required=True, help="an engine dir exported with --precision int8")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes in px")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from sdrt.manifest import Manifest

    factor = Manifest.read(args.engines).dims.vae_scale_factor
    out = {}
    for size in args.sizes:
        for graph in [g for g in GRAPHS if (args.engines / "unet" / g).exists()]:
            out[f"{graph}@{size}"] = times = graph_times(args.engines, size // factor, graph)
            print(f"{graph} at {size} px: {np.round(times, 2).tolist()} s", flush=True)
    out.update(step_gaps(args.engines, args.sizes))
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
