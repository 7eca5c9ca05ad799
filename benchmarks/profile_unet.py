"""Where an ONNX Runtime CPU UNet call spends its time, by operator type (ONNX Runtime's profiler).

    python benchmarks/profile_unet.py ENGINE_DIR [--size 512 --batch 2 --runs 2]

Writes benchmarks/results/unet_profile.json: per op type, total ms and share of the call, for the
last run (the first warms up), with the graph the CPU provider runs (its first target graph present, PROVIDER_TARGETS).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from sdrt.manifest import Manifest
from sdrt.runtime.backends import PROVIDER_TARGETS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_dir")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/unet_profile.json")
    args = ap.parse_args()
    m = Manifest.read(args.engine_dir)
    unet = m.components["unet"]
    path = Path(args.engine_dir) / unet.file_for(PROVIDER_TARGETS["cpu"])
    side = args.size // m.dims.vae_scale_factor
    feeds = unet.spec.sample_inputs({"B": args.batch, "h": side, "w": side}, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "unet")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(args.runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"]
    by_op, total = collections.Counter(), 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"]["op_name"]] += e["dur"] / 1000
            total += e["dur"] / 1000
    result = {"graph": str(path), "batch": args.batch, "size": args.size, "call_ms": runs[-1]["dur"] / 1000,
              "kernels_ms": total,
              "by_op": {k: {"ms": round(v, 1), "share": round(v / total, 4)} for k, v in by_op.most_common()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in list(result["by_op"].items())[:12]:
        print(f"{k:<28} {v['ms']:>9.1f} ms  {100 * v['share']:5.1f}%")
    print(f"call {result['call_ms']:.0f} ms; wrote {args.out}")


if __name__ == "__main__":
    main()
