#!/usr/bin/env bash
# Run here (PyPI reachable) before a GPU session: the wheels benchmarks/run_gpu.sh installs there,
# for the GPU machine's Python (3.12 in its image), split into parts small enough to carry
# (a device call carries at most 64 MiB, the working tree included) under .gpu-wheels/<n>/.
# Each call then carries one folder and appends it to the wheel store on the warm machine:
#   run(carry=[".gpu-wheels/0"], command="mkdir -p /tmp/sdrt-wheels && cp .gpu-wheels/0/* /tmp/sdrt-wheels/")
#   ... and the last call: cp the last part, then benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-312}
PART_MB=${PART_MB:-56}
rm -rf .gpu-wheels && mkdir -p .gpu-wheels/dl
grep -qx "/.gpu-wheels/" .git/info/exclude 2>/dev/null || echo "/.gpu-wheels/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --platform manylinux_2_28_x86_64 \
    -d .gpu-wheels/dl "onnxruntime-gpu==${ORT_VERSION:-1.31.1}" "diffusers==${DIFFUSERS_VERSION:-0.42.1}"
n=0
size=0
mkdir -p .gpu-wheels/$n
for whl in $(ls -S .gpu-wheels/dl/*.whl); do  # largest first: the small wheels share the last part
    (cd "$(dirname "$whl")" && split -b "${PART_MB}M" -d -a 3 "$(basename "$whl")" "$(basename "$whl").part")
    for part in "$whl".part*; do
        bytes=$(stat -c %s "$part")
        if [ $((size + bytes)) -gt $((PART_MB * 1024 * 1024)) ]; then n=$((n + 1)); size=0; mkdir -p .gpu-wheels/$n; fi
        mv "$part" .gpu-wheels/$n/
        size=$((size + bytes))
    done
done
rm -rf .gpu-wheels/dl
du -sh .gpu-wheels/*
