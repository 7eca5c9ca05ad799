"""`--precision fp16` for GPU targets: fp32 graphs -> fp16 weights and compute, fp32 inputs/outputs.

The conversion is ONNX Runtime's `float16.convert_float_to_float16`, with the precision-sensitive
ops kept in fp32: GroupNormalization (a mean and variance over up to a million fp16 values) and, in
the decomposed attention of the TensorRT graph, QK^T and the softmax (sdrt.kernels.attention; SD
2.x overflows there in fp16, which is why diffusers has `upcast_attention`).

Export runs each fp16 graph to check it (parity, and the VAE decoder's overflow probe): on ONNX
Runtime's CUDA provider where there is one, else on its CPU provider, which runs an op without an
fp16 kernel in fp32 between Casts, so every tensor between ops is rounded to fp16 and values past
fp16's range (65504) become inf as they would on a GPU. Checked against ONNX's reference evaluator
on `tiny` (tests) and against the CUDA provider on an H100 (benchmarks/results/gpu-h100).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FP32_OPS = ("GroupNormalization",)


def convert(src: Path, dst: Path) -> None:
    """Write SRC (fp32, any size) as an fp16 graph at DST with its weights in DST.data."""
    import onnx

    model = convert_model(onnx.load(str(src)))
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)


def convert_model(model, fp32_ops: tuple[str, ...] = ()):
    """MODEL (an fp32 ModelProto) in fp16, FP32_OPS and FP32_OPS kept in fp32; returns the model."""
    from onnxruntime.transformers import float16

    from sdrt.kernels.graph import toposort

    model = float16.convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS) + list(fp32_ops))
    _drop_repeated_casts(model.graph)
    toposort(model.graph)  # the converter appends its input Casts at the end
    # it also leaves value_info that contradicts the graph (weights declared fp32 though stored fp16, a
    # shared weight's Cast declared once per consumer): keep only single entries for computed values
    seen = {}
    for v in model.graph.value_info:
        seen[v.name] = seen.get(v.name, 0) + 1
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if seen[v.name] == 1 and v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def _drop_repeated_casts(graph) -> None:
    """The converter casts a weight kept in fp32 once per consumer, each Cast with the same name and
    output: a weight shared by several GroupNormalizations (an exporter dedups equal constants) then
    has several nodes writing one value, which ONNX Runtime refuses to load ("two nodes with same node
    name"; found on a GPU, where these graphs first ran in ONNX Runtime). Keep the first of each."""
    first: dict[str, object] = {}
    kept = []
    for node in graph.node:
        repeat = [first[o] for o in node.output if o and o in first]
        if repeat:
            if len(repeat) != len([o for o in node.output if o]) or any(r != node for r in repeat):
                raise ValueError(f"fp16 conversion: {node.name} writes an existing value differently")
            continue
        first.update({o: node for o in node.output if o})
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def run_fp16(path: Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
    """Execute an fp16 graph (or any graph with CUDA-only ops): ONNX Runtime's CUDA provider if
    present, else its CPU provider, or ONNX's reference evaluator with sdrt's NumPy ops where the
    graph has CUDA-only ops."""
    from sdrt.kernels import contrib
    from sdrt.kernels.cuda import has_cuda_only_ops
    from sdrt.runtime.backends.onnxruntime import has_cuda, session

    gpu = has_cuda()
    if not gpu and has_cuda_only_ops(path):
        log.info("%s: CUDA-only ops and no CUDA here: run with NumPy references (sdrt.kernels.contrib)", path)
        return contrib.evaluate(path, feeds, output_names)
    return session(path, "cuda" if gpu else "cpu", providers=["CUDAExecutionProvider" if gpu else
                                                              "CPUExecutionProvider"]).run(output_names, feeds)


def overflows(path: Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> bool:
    """True if the fp16 graph yields NaN/inf on FEEDS."""
    return not all(np.isfinite(o).all() for o in run_fp16(path, feeds, output_names))
