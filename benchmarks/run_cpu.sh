#!/usr/bin/env bash
# The committed CPU results: random-sd15 (full SD 1.5 architecture, seeded random weights) at 512 and
# 256 px, sdrt engines (ONNX Runtime fp32; OpenVINO, bf16 where the CPU has it) against eager PyTorch,
# in one run. About 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=${ENGINES:-engines/sd15}
OUT=${OUT:-benchmarks/results/cpu-2core}
[ -f "$ENGINES/manifest.json" ] || sdrt export random-sd15 "$ENGINES"
sdrt bench "$ENGINES" --sizes 512 256 --repeats 3 --warmup 1 --steps 10 --providers cpu openvino --out "$OUT"
