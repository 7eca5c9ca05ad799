"""Where a UNet step's time goes on OpenVINO: the per-node profile (PERF_COUNT) of the graph the
provider runs, summed by node type and kernel, and the slowest nodes; with --int8-attention, the
standard int8 graph against the openvino target's (int8 attention inputs). Then what bounds the
largest of them, self-attention, on this CPU: one attention call at the 64x64 level (batch 2, 8
heads, 4,096 tokens) at several head sizes, fused as OpenVINO runs it and unfused (OpenVINO's
profile then splits the time between the two MatMuls and the softmax), with int8 q, k and v, and by
sdrt's AMX kernel (sdrt/runtime/backends/amx_attention.py) where it runs.
If the time stays flat as the head grows, the two GEMMs are not what bounds it. Writes JSON.

    python benchmarks/openvino_profile.py --engines engines/sd15-int8 --size 512 \\
        --out benchmarks/results/cpu-vs-optimum-xeon/openvino_profile.json
    python benchmarks/openvino_profile.py --attention-only --out attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrt.kernels import reference  # noqa: E402
from sdrt.kernels.graph import Graph, load_graph_only, save_graph_only  # noqa: E402
from sdrt.kernels.int8_attention import symmetric_int8_attention  # noqa: E402
from sdrt.manifest import Manifest  # noqa: E402
from sdrt.runtime.backends import PROVIDER_TARGETS, amx_attention, openvino  # noqa: E402

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
    backend = Profiled(engines / c.file_for(PROVIDER_TARGETS[provider]), c.spec, provider)  # what the provider runs
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


def attention_graph(path: Path, head: int, batch: int, heads: int, tokens: int,
                    int8_scales: dict[str, float] | None = None) -> None:
    """One ONNX Attention op (opset 23, what sdrt's standard graphs hold), scaled as SD 1.5's. With
    INT8_SCALES, q, k and v pass a QuantizeLinear / DequantizeLinear pair (int8, per tensor) first, as
    an int8 attention would read them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = [batch, heads, tokens, head]
    ios = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkvy"}
    nodes, inits, reads = [], [], {n: n for n in "qkv"}
    for n, scale in (int8_scales or {}).items():
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{n}_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{n}_zero")]
        nodes += [helper.make_node("QuantizeLinear", [n, f"{n}_scale", f"{n}_zero"], [f"{n}_q"]),
                  helper.make_node("DequantizeLinear", [f"{n}_q", f"{n}_scale", f"{n}_zero"], [f"{n}_dq"])]
        reads[n] = f"{n}_dq"
    nodes.append(helper.make_node("Attention", [reads[n] for n in "qkv"], ["y"], scale=float(40 ** -0.5)))
    graph = helper.make_graph(nodes, "attention", [ios[n] for n in "qkv"], [ios["y"]], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, str(path))


def attention_reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The probe's attention by sdrt.kernels.reference, one (batch, head) at a time (the scores of all
    of them at once: 2 GiB in float64)."""
    q, k, v = (feeds[n] for n in "qkv")
    out = np.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = reference.attention(q[b, h], k[b, h], v[b, h], scale=40 ** -0.5)
    return out


def relative_rms(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - reference) ** 2) / np.mean(reference ** 2)))


def attention_variant(path: Path, provider: str, feeds: dict, reference: np.ndarray, calls: int,
                      fused: bool = True, rounded: np.ndarray | None = None) -> dict:
    """One attention graph's median time, its relative RMS error against REFERENCE (and against
    ROUNDED, the attention of the int8-rounded inputs, where given), and its profile summed by node
    type. FUSED=False turns off OpenVINO's Snippets (SNIPPETS_MODE), which fuse the two MatMuls and
    the softmax into one subgraph; the profile then splits the time between them."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": openvino.OPENVINO_PRECISION[provider], "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": "YES", "SNIPPETS_MODE": "ENABLE" if fused else "DISABLE"})
    request = compiled.create_infer_request()
    t = statistics.median(timed(lambda: request.infer(feeds), calls))
    y = np.array(request.infer(feeds)[0])
    by_type = defaultdict(float)
    for p in request.get_profiling_info():
        by_type[f"{p.node_type} ({p.exec_type})"] += p.real_time.total_seconds()
    row = {"s": t, "relative_rms_error": relative_rms(y, reference),
           "by_node_s": {k: v for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]) if v > 0}}
    if rounded is not None:
        row["relative_rms_error_on_rounded_inputs"] = relative_rms(y, rounded)
    return row


def attention_probe(provider: str, head_sizes=HEAD_SIZES, batch: int = 2, heads: int = 8, tokens: int = 4096,
                    calls: int = 5) -> dict:
    """One self-attention at each head size: fused (as the UNet runs it) and unfused (its MatMuls and
    softmax timed apart); at SD 1.5's head size also with int8 q, k and v."""
    out = {"batch": batch, "heads": heads, "tokens": tokens, "by_head_size": {}}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for head in head_sizes:
            path = Path(d) / f"attention{head}.onnx"
            attention_graph(path, head, batch, heads, tokens)
            feeds = {n: rng.standard_normal([batch, heads, tokens, head]).astype(np.float32) for n in "qkv"}
            reference = attention_reference(feeds)
            flops = 4 * batch * heads * tokens * tokens * head  # QK^T and PV
            row = attention_variant(path, provider, feeds, reference, calls)
            row |= {"gemm_gflops": flops / row["s"] / 1e9,
                    "unfused": attention_variant(path, provider, feeds, reference, calls, fused=False)}
            if head == head_sizes[0]:
                scales = {n: float(np.abs(feeds[n]).max() / 127) for n in "qkv"}
                attention_graph(path, head, batch, heads, tokens, int8_scales=scales)
                rounded = attention_reference({n: np.round(feeds[n] / scales[n]) * np.float32(scales[n])
                                               for n in "qkv"})
                row["int8_qkv"] = attention_variant(path, provider, feeds, reference, calls, rounded=rounded)
            if amx_attention.available()[0] and head <= amx_attention.MAX_HEAD:  # what sdrt runs instead
                qkv = [feeds[n] for n in "qkv"]
                t = statistics.median(timed(lambda qkv=qkv: amx_attention.attention(*qkv, 40 ** -0.5), calls))
                y = amx_attention.attention(*qkv, 40 ** -0.5)
                row["amx_kernel"] = {"s": t, "relative_rms_error": relative_rms(y, reference)}
            out["by_head_size"][head] = row
            amx = f", {row['amx_kernel']['s']:.3f} s sdrt's AMX kernel" if "amx_kernel" in row else ""
            print(f"attention, head size {head}: {row['s']:.3f} s fused ({row['gemm_gflops']:.0f} GFLOP/s in its "
                  f"GEMMs), {row['unfused']['s']:.3f} s unfused{amx}", flush=True)
    return out


def symmetric_qkv(src: Path, dst: Path) -> int:
    """Write SRC, an int8 QDQ UNet, as DST with the openvino target's pass applied (its q, k and v
    pairs as symmetric int8: sdrt.kernels.int8_attention), whatever the engine dir holds. DST reads
    SRC's weights file (hard-linked or copied beside it); returns how many pairs changed."""
    model = load_graph_only(src)
    changed = symmetric_int8_attention(Graph(model))
    save_graph_only(model, dst)
    for data in src.parent.glob(f"{src.name}.data"):  # OpenVINO reads no weights file through a symlink
        try:
            os.link(data, dst.parent / data.name)
        except OSError:  # another file system
            shutil.copyfile(data, dst.parent / data.name)
    return changed


def int8_attention(engines: Path, provider: str, size: int, calls: int) -> dict:
    """The int8 UNet's standard graph (q, k and v rounded in uint8) against its openvino target's
    (symmetric int8; rebuilt here by symmetric_qkv, so engine dirs exported before that target work
    too), alternating calls: step times, the attention subgraphs' time in each one's last profile,
    and how far apart their outputs are, next to how far the standard graph's output moves when
    OpenVINO merely picks other kernels (Snippets off): the floor of such differences."""
    m = Manifest.read(engines)
    c = m.components["unet"]
    side = size // m.dims.vae_scale_factor
    feeds = c.spec.sample_inputs({"B": 2, "h": side, "w": side})
    with tempfile.TemporaryDirectory() as d:
        src = engines / c.files[0]
        dst = Path(d) / src.name.replace(".onnx", ".symmetric-qkv.onnx")
        changed = symmetric_qkv(src, dst)
        graphs = {"uint8_qkv": Profiled(src, c.spec, provider), "int8_qkv": Profiled(dst, c.spec, provider)}
        outs = {k: b.run(feeds)[0] for k, b in graphs.items()}  # compiles and warms up
        times = {k: [] for k in graphs}
        for _ in range(calls):
            for k, b in graphs.items():
                t0 = time.perf_counter()
                b.run(feeds)
                times[k].append(time.perf_counter() - t0)
        attention = {k: sum(p.real_time.total_seconds() for p in b.profile() if "attention" in p.node_name)
                     for k, b in graphs.items()}
        for b in graphs.values():
            b.close()

        class Unfused(Profiled):
            properties = {"SNIPPETS_MODE": "DISABLE"}

        unfused = Unfused(src, c.spec, provider)
        floor = relative_rms(unfused.run(feeds)[0], outs["uint8_qkv"])
        unfused.close()
    return {"pairs_changed": changed, "step_s": times, "attention_s": attention,
            "output_relative_rms_apart": relative_rms(outs["int8_qkv"], outs["uint8_qkv"]),
            "same_graph_other_kernels_apart": floor}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, help="an int8 engine dir (not needed with --attention-only)")
    ap.add_argument("--provider", default="openvino", choices=list(openvino.OPENVINO_PRECISION))
    ap.add_argument("--size", type=int, default=512, help="image side in px")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=15, help="how many of the slowest nodes to keep")
    ap.add_argument("--tokens", type=int, default=4096, help="the attention probe's tokens (64x64 latents: 4096)")
    ap.add_argument("--attention-only", action="store_true", help="skip the UNet's profile")
    ap.add_argument("--int8-attention", action="store_true",
                    help="also time the UNet with symmetric int8 q, k and v (OpenVINO's int8 attention)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not (args.engines or args.attention_only):
        ap.error("--engines is required unless --attention-only")
    from sdrt.runtime.backends import cpu_features

    out = {"engines": str(args.engines) if args.engines else None, "provider": args.provider,
           "cpu_features": cpu_features()}
    if not args.attention_only:
        unet = out["unet"] = unet_profile(args.engines, args.provider, args.size, args.calls, args.top)
        print(f"UNet step: {np.round(unet['step_s'], 2).tolist()} s; by kind:", flush=True)
        for kind, v in list(unet["by_kind"].items())[:8]:
            print(f"  {v['s']:.3f} s {100 * v['share']:4.1f}% {v['nodes']:4d} x {kind}")
    if args.int8_attention and not args.attention_only:
        out["int8_attention"] = int8_attention(args.engines, args.provider, args.size, args.calls)
        print(f"int8 q, k, v: {out['int8_attention']}", flush=True)
    out["attention"] = attention_probe(args.provider, tokens=args.tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
