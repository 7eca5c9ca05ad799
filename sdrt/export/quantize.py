"""`--precision int8`: the UNet and the VAE decoder as static QDQ int8 graphs for CPUs.

Calibration data are real sampler trajectories: the exported fp32 engines generate a few images
(fixed prompts and seeds) and every UNet call's inputs, and each decoded latent, are kept. ONNX
Runtime's `quantize_static` then writes the QDQ graph: int8 weights per output channel, uint8
activations with MinMax ranges, Conv, MatMul and Gemm quantized. QDQ is standard ONNX, so ONNX
Runtime (QLinearConv / QGEMM kernels) and OpenVINO (its int8 kernels) both run it.

Chosen by measurement on SD 1.5 (docs/kernels.md, "int8"): dynamic quantization leaves the convolutions,
most of the UNet's FLOPs, in fp32; static QDQ quantizes them too. Convolutions reading the raw
residual stream (skip shortcuts, down/upsamplers, attention proj_out) keep fp32: quantizing them
was most of the error.

The VAE decoder quantizes its convolutions alone; its attention (one block at 64x64), the first and
last convolutions, the skip shortcuts and the upsamplers keep fp32. Measured on random-sd15 at 512 px
(2 Zen 3 cores): every Conv and MatMul quantized, 23 dB PSNR against fp32; with these kept in fp32,
49 dB, 13.2 s against fp32's 17.2 s on ONNX Runtime (Winograd graph) and 11.0 s against 19.5 s on
OpenVINO. The export keeps the int8 decoder only where its image is within `MIN_PSNR_DB` of fp32's
on the calibration latents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# weights whose layers stay in fp32 (substring of the weight's initializer name, i.e. module path)
KEEP_FP32 = ("conv_shortcut", "proj_out", "downsamplers", "upsamplers")
CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, detailed, 85mm",
    "a bowl of ramen on a wooden table, studio lighting",
)
CALIBRATION_STEPS = 8
DECODER_OPS = ("Conv",)
DECODER_KEEP_FP32 = ("post_quant_conv", "conv_in", "conv_out", "conv_shortcut", "upsamplers")
MIN_PSNR_DB = 30.0  # the int8 decoder's image against fp32's, or the decoder stays fp32


def record_inputs(backend) -> list[dict[str, np.ndarray]]:
    """From now on, keep a copy of every feed BACKEND runs; returns the (growing) list."""
    feeds = []
    backend.observers.append(lambda f: feeds.append({k: np.array(v) for k, v in f.items()}))
    return feeds


def record_outputs(backend) -> list[list[np.ndarray]]:
    """From now on, keep a copy of every call's outputs BACKEND gives; returns the (growing) list."""
    outputs = []
    backend.finished.append(lambda feeds, out: outputs.append([np.array(o) for o in out]))
    return outputs


def calibration_size(manifest) -> int:
    """The image side calibration generations use: half the model's default size, at least the
    UNet's smallest."""
    smallest = manifest.components["unet"].spec.dims["h"][0] * manifest.dims.vae_scale_factor
    return max(manifest.default_image_size // 2, smallest)


def calibration_feeds(engine_dir: Path, size: int, prompts=CALIBRATION_PROMPTS,
                      steps: int = CALIBRATION_STEPS) -> dict[str, list]:
    """Inputs of every UNet and VAE decoder call while the fp32 engines in ENGINE_DIR generate one
    image per prompt (ONNX Runtime's CPU provider, standard graphs), by component; and under
    "decoded", the decoder's output for each of its inputs (the int8 decoder's PSNR reference)."""
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(engine_dir, optimized=False) as pipe:
        feeds = {name: record_inputs(pipe.engine(name)) for name in ("unet", "vae_decoder")}
        decoded = record_outputs(pipe.engine("vae_decoder"))
        for i, prompt in enumerate(prompts):
            pipe(prompt, steps=steps, sampler="euler", seed=i, width=size, height=size)
    return feeds | {"decoded": [out[0] for out in decoded]}


def quantize_unet(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> int:
    """Write the int8 QDQ UNet (DST + DST.data); return how many layers were quantized."""
    return quantize(src, dst, feeds, QUANTIZED_OPS, KEEP_FP32)


def quantize_decoder(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> int:
    """Write the int8 QDQ VAE decoder (DST + DST.data); return how many layers were quantized."""
    return quantize(src, dst, feeds, DECODER_OPS, DECODER_KEEP_FP32)


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of decoder outputs as images ([-1, 1] mapped to [0, 1] and clipped, as decoded)."""
    from sdrt.bench.measure import psnr as pixel_psnr
    from sdrt.runtime.images import from_model_output

    a, b = (from_model_output(np.asarray(x, np.float64)) for x in (reference, image))
    return pixel_psnr(b, a)


def quantize(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], ops: tuple[str, ...],
             keep_fp32: tuple[str, ...]) -> int:
    """Write SRC as a static QDQ graph (DST + DST.data), calibrated on FEEDS: OPS quantized except layers
    whose weight's name contains one of KEEP_FP32; return how many layers were quantized."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    graph = onnx.load(str(src), load_external_data=False).graph
    layers = [n for n in graph.node if n.op_type in ops and len(n.input) > 1]
    keep = [n.name for n in layers if any(k in n.input[1] for k in keep_fp32)]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on the root logger
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(ops), nodes_to_exclude=keep, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
    log.info("int8 %s: %d layers quantized, %d kept in fp32, from %d calibration inputs",
             src.parent.name, len(layers) - len(keep), len(keep), len(feeds))
    return len(layers) - len(keep)
