"""The GEMM peaks of this CPU in each precision the engines could use: fp32 and bf16 (torch), and
int8 (an int8 QDQ MatMul compiled by OpenVINO, the kernels sdrt's int8 UNet runs on; and ONNX
Runtime's). What a UNet step can reach in each precision is bounded by these. Writes JSON.

    python benchmarks/gemm_probe.py --out benchmarks/results/cpu-vs-optimum/gemm_peaks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_peak(n: int, dtype) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best(lambda: a @ b) / 1e9


def qdq_matmul(n: int, path: Path) -> None:
    """Y = dequant(quant(X)) @ dequant(W_int8): the pattern ONNX Runtime's quantizer writes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).integers(-127, 127, size=(n, n), dtype=np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.02), "sw"),
             numpy_helper.from_array(np.float32(0.05), "sx"), numpy_helper.from_array(np.uint8(128), "zx")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # what ONNX Runtime and OpenVINO read
    onnx.save(model, str(path))


def int8_peaks(n: int) -> dict:
    out = {}
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "qdq.onnx"
        qdq_matmul(n, path)
        try:
            import openvino as ov

            compiled = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            out["int8_openvino"] = 2 * n**3 / best(lambda: request.infer({"x": x})) / 1e9
        except ImportError:
            pass
        from sdrt.runtime.backends.onnxruntime import session

        sess = session(path)
        out["int8_onnxruntime"] = 2 * n**3 / best(lambda: sess.run(None, {"x": x})) / 1e9
    return out


def main() -> None:
    import torch

    from sdrt.bench.measure import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    peaks = {"fp32_torch": torch_peak(args.n, torch.float32), "bf16_torch": torch_peak(args.n, torch.bfloat16),
             **int8_peaks(args.n)}
    result = {"machine": machine(), "n": args.n, "gflops": peaks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))


if __name__ == "__main__":
    main()
