"""OpenVINO's static-shape compilation against its dynamic-shape one, per component, alternating
rounds in one process (sdrt.runtime.backends.openvino). Writes JSON.

    python benchmarks/openvino_shapes.py --engines engines/sd15-int8 --size 512 \
        --out benchmarks/results/cpu-vs-optimum/openvino_shapes.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrt.manifest import Manifest  # noqa: E402
from sdrt.runtime.backends import openvino  # noqa: E402

WORKLOADS = (("unet", 2), ("vae_decoder", 1))  # a guided UNet step; one image's decode


def backend(path: Path, spec, provider: str, mode: str):
    os.environ[openvino.SHAPES_ENV] = mode
    return openvino.OpenVinoBackend(path, spec, provider)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--provider", default="openvino")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    m = Manifest.read(args.engines)
    side = args.size // m.dims.vae_scale_factor
    out = {"engines": args.engines, "provider": args.provider, "size": args.size, "workloads": {}}
    for name, batch in WORKLOADS:
        c = m.components[name]
        feeds = c.spec.sample_inputs({"B": batch, "h": side, "w": side})
        runs = {mode: backend(Path(args.engines) / c.files[0], c.spec, args.provider, mode)
                for mode in ("static", "dynamic")}
        times = {mode: [] for mode in runs}
        for r in range(args.rounds + 1):  # the first round compiles (static) and warms up: not kept
            for mode in (list(runs) if r % 2 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[mode].run(feeds)
                if r:
                    times[mode].append(time.perf_counter() - t0)
        for b in runs.values():
            b.close()
        out["workloads"][f"{name}_b{batch}"] = {mode: {"median": statistics.median(t), "samples": t}
                                               for mode, t in times.items()}
        print(name, {mode: round(statistics.median(t), 2) for mode, t in times.items()}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
