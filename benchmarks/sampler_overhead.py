"""How much time the sampler loop itself costs next to the UNet, per step.

Runs every sampler for 20 steps at 512x512 (latents 1x4x64x64) with classifier-free guidance, with a
UNet stand-in that costs nothing (returns zeros), so what is timed is the sampler function, the
denoiser's guidance / parameterization math and the schedule. Then times real UNet calls of an
engine dir (batch 2, 64x64 latents: one 512x512 step with guidance) in the same run.

    python benchmarks/sampler_overhead.py --engines engines/sd15   # ~1 minute with random-sd15
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from sdrt.manifest import Manifest
from sdrt.runtime import noise, samplers
from sdrt.runtime.denoiser import Denoiser
from sdrt.runtime.pipeline import Pipeline

STEPS = 20


class FreeUnet:
    def __call__(self, sample, timestep, context):
        return np.zeros_like(sample)


def sampler_seconds_per_step(name: str, config: dict, dims, repeats: int = 3) -> float:
    smp = samplers.get_sampler(name)
    shape = (1, dims.latent_channels, 64, 64)
    context = np.zeros((1, dims.text_length, dims.text_hidden), np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        schedule = smp.make_schedule(config, STEPS)
        denoise = Denoiser(FreeUnet(), schedule, "epsilon", context, context, 7.5)
        x = samplers.initial_state(smp, schedule, noise.randn([0], noise.INITIAL, shape))
        x = smp.fn(denoise, x, schedule, noise=noise.Noise("sdrt", [0]).sampler(), **smp.options)
        samplers.final_latents(smp, schedule, x)
        best = min(best, time.perf_counter() - t0)
    return best / STEPS


def unet_seconds(engines: Path, repeats: int = 3) -> list[float]:
    pipe = Pipeline.load(engines)
    dims = pipe.manifest.dims
    unet = pipe.engine("unet")
    feeds = unet.spec.sample_inputs({"B": 2, "h": 64, "w": 64})
    args = [feeds[t.name] for t in unet.spec.inputs]
    for _ in range(2):  # the first calls after session creation are slow (ONNX Runtime allocates on them)
        unet(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        unet(*args)
        times.append(time.perf_counter() - t0)
    del dims
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", required=True, type=Path, help="engine dir (random-sd15 for the real figure)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampler_overhead.json")
    args = ap.parse_args()
    manifest = Manifest.read(args.engines)
    per_step = {name: sampler_seconds_per_step(name, manifest.scheduler_config, manifest.dims)
                for name in samplers.SAMPLERS}
    unet = unet_seconds(args.engines)
    unet_median = statistics.median(unet)
    print(f"UNet call, batch 2, 64x64 latents ({args.engines}): median {unet_median:.3f} s of {unet}")
    print("\n| sampler | sampler work per step (ms) | fraction of one UNet call |\n|---|---|---|")
    for name, sec in per_step.items():
        print(f"| {name} | {sec * 1e3:.2f} | {sec / unet_median:.4%} |")
    worst = max(per_step, key=per_step.get)
    print(f"\nworst: {worst}, {per_step[worst] / unet_median:.4%} of a UNet call")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "engines": str(args.engines), "source": manifest.source.get("name"), "steps": STEPS,
        "unet_seconds": unet, "sampler_seconds_per_step": per_step,
        "fraction_of_unet": {k: v / unet_median for k, v in per_step.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
