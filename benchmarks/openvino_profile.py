"""Where a UNet step's time goes on OpenVINO: its per-node profile (PERF_COUNT) summed by node type
and kernel, and the slowest nodes; then what bounds the largest of them, self-attention, on this CPU:
one attention call at the 64x64 level (batch 2, 8 heads, 4,096 tokens) at several head sizes. If the
time stays flat as the head grows, the two GEMMs are not what bounds it; the softmax between them is.
Writes JSON.

    python benchmarks/openvino_profile.py --engines engines/sd15-int8 --size 512 \\
        --out benchmarks/results/cpu-vs-optimum-xeon/openvino_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrt.manifest import Manifest  # noqa: E402
from sdrt.runtime.backends import openvino  # noqa: E402

HEAD_SIZES = (40, 64, 80)  # SD 1.5's is 40


class Profiled(openvino.OpenVinoBackend):
    properties = {"PERF_COUNT": "YES"}

    def profile(self) -> list:
        """The last call's per-node profile (OpenVINO's ProfilingInfo)."""
        _, request, _ = next(reversed(self.compiled.values()))
        return request.get_profiling_info()


def timed(fn, calls: int) -> list[float]:
    fn()  # compiles (static shapes) and warms up: not kept
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def unet_profile(engines: Path, provider: str, size: int, calls: int, top: int) -> dict:
    m = Manifest.read(engines)
    c = m.components["unet"]
    side = size // m.dims.vae_scale_factor
    feeds = c.spec.sample_inputs({"B": 2, "h": side, "w": side})
    backend = Profiled(engines / c.files[0], c.spec, provider)
    times = timed(lambda: backend.run(feeds), calls)
    nodes = [p for p in backend.profile() if p.real_time.total_seconds() > 0]
    precision = backend.precision
    backend.close()
    groups = defaultdict(lambda: [0.0, 0])
    for p in nodes:
        g = groups[f"{p.node_type} ({p.exec_type})"]
        g[0] += p.real_time.total_seconds()
        g[1] += 1
    total = sum(s for s, _ in groups.values())
    slowest = sorted(nodes, key=lambda p: -p.real_time.total_seconds())[:top]
    return {"engine_precision": c.precision, "inference_precision": precision, "batch": 2, "size": size,
            "step_s": times, "profiled_s": total,
            "by_kind": {k: {"s": s, "nodes": n, "share": s / total}
                        for k, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "slowest": [{"node": p.node_name, "type": p.node_type, "kernel": p.exec_type,
                         "s": p.real_time.total_seconds()} for p in slowest]}


def attention_graph(path: Path, head: int, batch: int, heads: int, tokens: int) -> None:
    """One ONNX Attention op (opset 23, what sdrt's standard graphs hold), scaled as SD 1.5's."""
    import onnx
    from onnx import TensorProto, helper

    shape = [batch, heads, tokens, head]
    ios = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkvy"}
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], scale=float(40 ** -0.5))
    graph = helper.make_graph([node], "attention", [ios[n] for n in "qkv"], [ios["y"]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, str(path))


def attention_probe(provider: str, head_sizes=HEAD_SIZES, batch: int = 2, heads: int = 8, tokens: int = 4096,
                    calls: int = 5) -> dict:
    import openvino as ov

    out = {"batch": batch, "heads": heads, "tokens": tokens, "by_head_size": {}}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for head in head_sizes:
            path = Path(d) / f"attention{head}.onnx"
            attention_graph(path, head, batch, heads, tokens)
            compiled = ov.Core().compile_model(str(path), "CPU", {
                "INFERENCE_PRECISION_HINT": openvino.OPENVINO_PRECISION[provider], "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            feeds = {n: rng.standard_normal([batch, heads, tokens, head]).astype(np.float32) for n in "qkv"}
            t = statistics.median(timed(lambda r=request, f=feeds: r.infer(f), calls))
            flops = 4 * batch * heads * tokens * tokens * head  # QK^T and PV
            out["by_head_size"][head] = {"s": t, "gemm_gflops": flops / t / 1e9}
            print(f"attention, head size {head}: {t:.3f} s ({flops / t / 1e9:.0f} GFLOP/s in its GEMMs)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--provider", default="openvino", choices=list(openvino.OPENVINO_PRECISION))
    ap.add_argument("--size", type=int, default=512, help="image side in px")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=15, help="how many of the slowest nodes to keep")
    ap.add_argument("--tokens", type=int, default=4096, help="the attention probe's tokens (64x64 latents: 4096)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from sdrt.runtime.backends import cpu_features

    unet = unet_profile(args.engines, args.provider, args.size, args.calls, args.top)
    print(f"UNet step: {np.round(unet['step_s'], 2).tolist()} s; by kind:", flush=True)
    for kind, v in list(unet["by_kind"].items())[:8]:
        print(f"  {v['s']:.3f} s {100 * v['share']:4.1f}% {v['nodes']:4d} x {kind}")
    out = {"engines": str(args.engines), "provider": args.provider, "cpu_features": cpu_features(), "unet": unet,
           "attention": attention_probe(args.provider, tokens=args.tokens)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
