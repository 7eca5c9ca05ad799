"""How far the lower-precision paths (and the graphs without rewrites) land from sdrt's fp32
engines on the same generation.

    python benchmarks/precision_quality.py FP32_ENGINE_DIR INT8_ENGINE_DIR [--size 512 --steps 20]

Paths: the fp32 engines' standard graphs (no sdrt.kernels rewrites), int8 engines on ONNX
Runtime's CPU provider and on OpenVINO, and the fp32 engines on OpenVINO in bf16. For each: PSNR
of the final image against sdrt fp32 on its rewritten graphs (same prompt, seed, sampler), and the
UNet's output error on the inputs the fp32 run actually fed it (relative RMS, at the first, middle
and last step). Writes benchmarks/results/precision_quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from sdrt.export.quantize import record_inputs
from sdrt.runtime.pipeline import Pipeline

PROMPT = "a photo of an astronaut riding a horse on mars"


def generate(engine_dir, provider, args, optimized=True):
    """(pixels, seconds, every UNet input of the run)."""
    with Pipeline.load(engine_dir, provider=provider, optimized=optimized) as pipe:
        feeds = record_inputs(pipe.engine("unet"))
        t0 = time.perf_counter()
        pixels = pipe(PROMPT, steps=args.steps, width=args.size, height=args.size, seed=0,
                      sampler=args.sampler).pixels
        return pixels, time.perf_counter() - t0, feeds


def unet_outputs(engine_dir, provider, feeds, optimized=True):
    with Pipeline.load(engine_dir, provider=provider, optimized=optimized) as pipe:
        return [pipe.engine("unet").run(f)[0] for f in feeds]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp32_dir")
    ap.add_argument("int8_dir")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m_karras")
    ap.add_argument("--out", default="benchmarks/results/precision_quality.json")
    args = ap.parse_args()

    ref, ref_s, feeds = generate(args.fp32_dir, "cpu", args)
    probe = [feeds[0], feeds[len(feeds) // 2], feeds[-1]]
    ref_unet = unet_outputs(args.fp32_dir, "cpu", probe)
    results = {"machine": platform.processor() or platform.machine(), "prompt": PROMPT, "size": args.size,
               "steps": args.steps, "sampler": args.sampler, "seed": 0,
               "reference": {"path": "sdrt fp32 (ONNX Runtime CPU, rewritten graphs)", "seconds": ref_s}, "paths": {}}
    for name, engine_dir, provider, optimized in (
            ("fp32 standard graphs (ONNX Runtime CPU, no rewrites)", args.fp32_dir, "cpu", False),
            ("int8 (ONNX Runtime CPU)", args.int8_dir, "cpu", True),
            ("int8 (OpenVINO)", args.int8_dir, "openvino", True),
            ("bf16 (OpenVINO, fp32 engines)", args.fp32_dir, "openvino", True)):
        pixels, seconds, _ = generate(engine_dir, provider, args, optimized)
        mse = float(np.mean((pixels.astype(np.float64) - ref) ** 2))
        outs = unet_outputs(engine_dir, provider, probe, optimized)
        rel = [float(np.sqrt(np.mean((o - r) ** 2) / np.mean(r ** 2))) for o, r in zip(outs, ref_unet)]
        results["paths"][name] = {"psnr_db": 10 * np.log10(1.0 / mse) if mse else float("inf"),
                                  "max_abs_pixel": float(np.abs(pixels - ref).max()), "seconds": seconds,
                                  "unet_rel_rms_first_mid_last": rel}
        print(name, json.dumps(results["paths"][name]))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
