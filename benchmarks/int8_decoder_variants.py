"""Which VAE decoder layers `--precision int8` keeps in fp32: PSNR and decode time of each choice.

From an fp32 engine dir: the export's calibration generations (sdrt.export.quantize) give the
calibration latents, two more generations at --size give the test latents. Each variant quantizes
the decoder with a different set of layers kept in fp32, and is timed on ONNX Runtime's CPU
provider at --size against the fp32 graph, with the PSNR of its images against fp32's
(docs/kernels.md, "int8").

    python benchmarks/int8_decoder_variants.py --engines engines/sd15 --size 512 \\
        --out benchmarks/results/int8_decoder_variants.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.export import quantize

VARIANTS = {  # name: (ops quantized, weight-name parts kept in fp32)
    "every layer": (("Conv", "MatMul"), ()),
    "attention, first and last convs fp32": (("Conv",), ("post_quant_conv", "conv_in", "conv_out")),
    "+ shortcuts fp32": (("Conv",), ("post_quant_conv", "conv_in", "conv_out", "conv_shortcut")),
    "+ upsamplers fp32": (("Conv",), ("post_quant_conv", "conv_in", "conv_out", "upsamplers")),
    "sdrt's choice": (quantize.DECODER_OPS, quantize.DECODER_KEEP_FP32),
}
TEST_PROMPTS = ("a red fox in the snow", "a city skyline at night, neon")


def latents(engines: Path, size: int) -> tuple[list[dict], list[dict]]:
    """(calibration feeds as the export records them, test feeds at SIZE)."""
    from sdrt.manifest import Manifest
    from sdrt.runtime.pipeline import Pipeline

    calibration = quantize.calibration_feeds(engines, quantize.calibration_size(Manifest.read(engines)))
    with Pipeline.load(engines, optimized=False) as pipe:
        test = quantize.record_inputs(pipe.engine("vae_decoder"))
        for i, prompt in enumerate(TEST_PROMPTS):
            pipe(prompt, steps=8, sampler="dpmpp_2m", seed=100 + i, width=size, height=size)
    return calibration["vae_decoder"], test


def timed(session, feeds: list[dict]) -> tuple[list[np.ndarray], float]:
    """The outputs for FEEDS and the median of their call times (after one untimed call)."""
    session.run(None, feeds[0])
    outs, times = [], []
    for f in feeds:
        t0 = time.perf_counter()
        outs.append(session.run(None, f)[0])
        times.append(time.perf_counter() - t0)
    return outs, float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    from sdrt.manifest import Manifest
    from sdrt.runtime.backends.onnxruntime import session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, required=True, help="an fp32 engine dir")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    entry = Manifest.read(args.engines).components["vae_decoder"]
    src = args.engines / entry.files[0]
    fp32_graph = args.engines / (entry.targets["onnxruntime-cpu"].file if "onnxruntime-cpu" in entry.targets
                                 else entry.files[0])
    calibration, test = latents(args.engines, args.size)
    reference, fp32_s = timed(session(fp32_graph), test)
    out = {"size": args.size, "fp32_graph": fp32_graph.name, "fp32_s": fp32_s, "variants": {}}
    print(f"fp32 ({fp32_graph.name}): {fp32_s:.2f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (ops, keep)) in enumerate(VARIANTS.items()):
            dst = Path(tmp) / f"v{i}.onnx"
            layers = quantize.quantize(src, dst, calibration, ops, keep)
            images, seconds = timed(session(dst), test)
            db = min(quantize.psnr(r, x) for r, x in zip(reference, images))
            out["variants"][name] = {"ops": list(ops), "kept_fp32": list(keep), "layers": layers, "psnr_db": db,
                                     "seconds": seconds}
            print(f"{name}: {layers} layers, {db:.1f} dB, {seconds:.2f} s", flush=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
