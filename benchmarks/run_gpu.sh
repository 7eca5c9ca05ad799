#!/usr/bin/env bash
# The GPU run of issue 19 as one script: onnxruntime-gpu from carried wheels, random-sd15 exported
# on the GPU in fp16 (with the onnxruntime-cuda graphs, parity measured on CUDA), then the bench:
# sdrt on ONNX Runtime's CUDA provider (onnxruntime-cuda graphs, IO binding, CUDA graphs) against
# eager diffusers fp16 (SDPA attention), diffusers' ONNX pipeline, and sdrt's standard graphs
# (--plain); components at 512 px with each one's share of the measured fp16 GEMM peak, and whole
# images at 20 and 50 steps. Everything lands in $OUT.
#
# Wheels: the GPU machine reaches no index, and a call carries at most 64 MiB, so
# `benchmarks/gpu_wheels.sh` (run here) downloads the wheels the machine's image lacks
# (onnxruntime-gpu for its Python, diffusers) and splits them into parts under .gpu-wheels/<n>/;
# each device call carries one part (carry: [".gpu-wheels/<n>"]) and appends it under
# $WHEEL_STORE, which stays while the machine is warm; this script installs from there.
#
# Budget (15 minutes of device time, start included): GPU tests ~2 min, export ~5 min, bench ~4 min
# (STEP=tests|export|bench runs one step).
# Locally, without a GPU, the same flow on `tiny` and the CPU provider checks the script itself:
#   PROVIDER=cpu SOURCE=tiny SIZE=64 OUT=/tmp/gpu-dry benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROVIDER=${PROVIDER:-cuda}
SOURCE=${SOURCE:-random-sd15}
SIZE=${SIZE:-512}
OUT=${OUT:-benchmarks/results/gpu}
ENGINES=${ENGINES:-/tmp/sdrt-engines/$SOURCE-fp16}
WHEEL_STORE=${WHEEL_STORE:-/tmp/sdrt-wheels}
STEP=${STEP:-all}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
stamp() { echo "== $(date +%T) $*"; }

if [ "$STEP" = all ] || [ "$STEP" = install ]; then
    stamp install
    if compgen -G "$WHEEL_STORE/*.part*" > /dev/null; then  # reassemble the carried parts
        for first in "$WHEEL_STORE"/*.part000; do
            whl=${first%.part000}
            cat "$whl".part* > "$whl" && rm -f "$whl".part*
        done
    fi
    if compgen -G "$WHEEL_STORE/*.whl" > /dev/null; then
        python3 -m pip uninstall -y -q onnxruntime || true  # the image's CPU build would shadow the GPU one
        python3 -m pip install -q --no-index --no-deps "$WHEEL_STORE"/*.whl
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
        || python3 -m pip install -q --no-deps -e .
    python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); \
print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
fi
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
    stamp tests  # the tests that need a GPU (they skip elsewhere): fp16 on CUDA, the CUDA provider, Philox vs CUDA
    python3 -m pytest -q -rs -o addopts="" -p no:cacheprovider tests/test_precision.py tests/test_pipeline.py \
        tests/test_noise.py -k "cuda or gpu" 2>&1 | tee "$OUT/tests.txt" || true
fi
if [ "$STEP" = all ] || [ "$STEP" = export ]; then
    stamp export
    [ -f "$ENGINES/manifest.json" ] || sdrt export "$SOURCE" "$ENGINES" --precision fp16
    sdrt info "$ENGINES" | tee "$OUT/engines.txt"
fi
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
    stamp bench
    sdrt bench "$ENGINES" --sizes "$SIZE" --repeats 3 --warmup 1 --steps 20 50 --batches 1 \
        --providers "$PROVIDER" --plain --no-cold --out "$OUT"
    SDRT_CUDA_GRAPHS=0 sdrt bench "$ENGINES" --sizes "$SIZE" --repeats 3 --warmup 1 --steps 20 50 \
        --providers "$PROVIDER" --no-eager --no-peer --no-cold --out "$OUT/no-cuda-graphs"
fi
stamp done
