#!/usr/bin/env bash
# The committed CPU results, random-sd15 (full SD 1.5 architecture, seeded random weights), each
# in one run against eager PyTorch:
#   cpu-2core/             512 and 256 px, components, 10-step generations and cold starts: ONNX
#                          Runtime fp32, OpenVINO (bf16 where the CPU has it), diffusers'
#                          OnnxStableDiffusionPipeline (the peer ONNX path). About 31 minutes on
#                          2 cores. Compare a re-run with: python benchmarks/compare.py A B
#   cpu-2core-precisions/  512 px components and cold starts: also the standard graphs without
#                          sdrt.kernels rewrites (sdrt-plain) and the int8 UNet on both runtimes.
#                          About 15 minutes, plus 5 for the int8 export.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=${ENGINES:-engines/sd15}
INT8=${INT8:-engines/sd15-int8}
[ -f "$ENGINES/manifest.json" ] || sdrt export random-sd15 "$ENGINES"
[ -f "$INT8/manifest.json" ] || sdrt export random-sd15 "$INT8" --precision int8
sdrt bench "$ENGINES" --sizes 512 256 --repeats 3 --warmup 1 --steps 10 --providers cpu openvino \
    --out benchmarks/results/cpu-2core
sdrt bench "$ENGINES" --sizes 512 --repeats 3 --warmup 1 --steps 10 --providers cpu openvino --plain \
    --also "$INT8" --no-peer --no-end-to-end --out benchmarks/results/cpu-2core-precisions
# cpu-2core-throughput/: images per minute at batch 1, 2 and 4 (256 px, 10 steps), every precision.
# About 20 minutes.
sdrt bench "$ENGINES" --sizes 256 --batches 1 2 4 --repeats 2 --warmup 1 --steps 10 --providers cpu openvino \
    --also "$INT8" --no-peer --no-cold --out benchmarks/results/cpu-2core-throughput
# cpu-vs-optimum/: sdrt against optimum-intel's OVStableDiffusionPipeline (the CPU peer, reshaped to
# static shapes), eager fp32 and sdrt with feature caching every 3 steps: 512 px, 20 steps, the int8
# engine dir (int8 UNet and VAE decoder) on what --provider auto picks for it on this CPU (ONNX
# Runtime without VNNI or AMX, OpenVINO with them). Needs optimum-intel in an environment of its own
# (docs/benchmarks.md): OPTIMUM_PYTHON=optimum-env/bin/python. About 50 minutes on 2 cores. One
# optimum-intel worker at a time beside eager: two (static and dynamic) and eager did not fit in
# 24 GB. Then the GEMM peaks the UNet's speed is bounded by.
sdrt bench "$INT8" --sizes 512 --steps 20 --providers auto --cache-intervals 3 --optimum static \
    --optimum-python "${OPTIMUM_PYTHON:?set OPTIMUM_PYTHON}" --no-peer --repeats 2 --warmup 1 --cold-steps 2 \
    --out benchmarks/results/cpu-vs-optimum
python benchmarks/gemm_probe.py --out benchmarks/results/cpu-vs-optimum/gemm_peaks.json
python benchmarks/openvino_shapes.py --engines "$INT8" --size 512 --out benchmarks/results/cpu-vs-optimum/openvino_shapes.json
python benchmarks/int8_unet_graphs.py --engines "$INT8" --out benchmarks/results/cpu-vs-optimum/int8_unet_graphs.json
python benchmarks/openvino_profile.py --engines "$INT8" --size 512 --out benchmarks/results/cpu-vs-optimum/openvino_profile.json
# how fast the image could be if the UNet's attention cost nothing (the bound on the eager ratio)
python benchmarks/attention_bound.py --engines "$INT8" --size 512 --rounds 4 --out benchmarks/results/cpu-vs-optimum/attention_bound.json
python benchmarks/feature_cache_error.py --engines "$INT8" --provider openvino --intervals 3 --size 256 \
    --out benchmarks/results/cpu-vs-optimum/feature_cache_error.json
