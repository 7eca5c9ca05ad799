#!/usr/bin/env bash
# The GPU checks and results, on a machine with an NVIDIA GPU: onnxruntime-gpu (CUDA 13 build) and
# the export extra with a CUDA torch (`pip install -e ".[export,dev,gpu]"`). random-sd15 is exported
# in fp16 on that machine, so export's fp16 parity checks and the VAE decoder's overflow probe run on
# the GPU (ONNX Runtime's CUDA provider).
#   1. the tests that need a GPU (they skip elsewhere): fp16 graphs on CUDA, the pipeline on the CUDA
#      and TensorRT providers, TensorRT engines (where TensorRT is installed)
#   2. $OUT (default benchmarks/results/gpu/): 512 px components, 20-step generations and cold
#      starts, sdrt fp16 on ONNX Runtime's CUDA provider (with and without sdrt.kernels rewrites)
#      against eager diffusers fp16 on CUDA and diffusers' OnnxStableDiffusionPipeline on CUDA.
# Each step can be run alone: STEP=tests|export|bench.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=${ENGINES:-engines/sd15-fp16}
OUT=${OUT:-benchmarks/results/gpu}
STEP=${STEP:-all}
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
    python -m pytest -q -rs -o addopts="" tests/test_precision.py tests/test_pipeline.py tests/test_tensorrt.py \
        -k "fp16 or gpu or tensorrt"
fi
if [ "$STEP" = all ] || [ "$STEP" = export ]; then
    [ -f "$ENGINES/manifest.json" ] || sdrt export random-sd15 "$ENGINES" --precision fp16
    sdrt info "$ENGINES"
fi
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
    sdrt bench "$ENGINES" --sizes 512 --repeats 5 --warmup 2 --steps 20 --providers cuda --plain --out "$OUT"
fi
