"""Feature caching's error against full computation: per step, the UNet output of the cached graph
against the full UNet on the same input; per image, the PSNR of the cached generation against the
full-compute one (same seed). Writes JSON.

    python benchmarks/feature_cache_error.py --engines engines/tiny --intervals 2 3 5 --size 64 \
        --out benchmarks/results/feature-cache-error-tiny.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrt.bench.measure import psnr  # noqa: E402
from sdrt.runtime import feature_cache  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"


class Recording(feature_cache.CachedUNet):
    """The cached UNet that also runs the full graph on every shallow call's input, to measure the
    error there; it returns the cached output, so the trajectory is the cached generation's."""

    def __init__(self, cached: feature_cache.CachedUNet):
        super().__init__(cached.full, cached.shallow, cached.interval, cached.name)
        self.errors: list[dict] = []

    def __call__(self, sample, timestep, context):
        shallow = self.step % self.interval != 0 and self.feature is not None
        saved = self.feature
        out = super().__call__(sample, timestep, context)
        if shallow:
            names = [t.name for t in self.full.spec.inputs]
            full = self.full.run(dict(zip(names, (sample, timestep, context))))[0]
            self.feature = saved  # the reference run must not refresh the cache
            rel = float(np.linalg.norm(out - full) / np.linalg.norm(full))
            self.errors.append({"step": self.step, "relative_l2": rel, "max_abs": float(np.abs(out - full).max())})
        return out


def measure(pipe: Pipeline, interval: int, args) -> dict:
    kw = {"steps": args.steps, "seed": args.seed, "width": args.size, "height": args.size, "sampler": args.sampler}
    full = pipe(PROMPT, **kw).pixels
    made = []
    original = pipe.cached_unet

    def recording(n):
        made.append(Recording(original(n)))
        return made[-1]

    pipe.cached_unet = recording
    try:
        cached = pipe(PROMPT, cache_interval=interval, **kw).pixels
    finally:
        pipe.cached_unet = original
    errors = made[0].errors if made else []  # interval 1: the plain UNet
    return {"interval": interval, "psnr_vs_full_compute_db": psnr(cached, full), "shallow_steps": errors,
            "mean_relative_l2": float(np.mean([e["relative_l2"] for e in errors])) if errors else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m_karras")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with Pipeline.load(args.engines, provider=args.provider) as pipe:
        rows = [measure(pipe, n, args) for n in args.intervals]
        source = pipe.manifest.source.get("name")
    result = {"engines": args.engines, "source": source, "provider": args.provider, "size": args.size,
              "steps": args.steps, "sampler": args.sampler, "seed": args.seed, "intervals": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"interval {r['interval']}: PSNR {r['psnr_vs_full_compute_db']:.1f} dB against full compute; "
              f"shallow steps' UNet output off by {r['mean_relative_l2']:.3f} (relative L2, mean)")


if __name__ == "__main__":
    main()
