"""`--precision fp16` for GPU targets: fp32 graphs -> fp16 weights and compute, fp32 inputs/outputs.

The conversion is ONNX Runtime's `float16.convert_float_to_float16`, with the precision-sensitive
ops kept in fp32: GroupNormalization (a mean and variance over up to a million fp16 values) and, in
the decomposed attention of the TensorRT graph, QK^T and the softmax (sdrt.kernels.attention; SD
2.x overflows there in fp16, which is why diffusers has `upcast_attention`).

This CPU's ONNX Runtime has no fp16 kernels, so fp16 graphs are executed with ONNX's reference
evaluator (NumPy, in fp16) where no GPU is present: the tests do that on `tiny`, and export uses it
for the VAE decoder's overflow probe when the decoder is small enough to run it in reasonable time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FP32_OPS = ("GroupNormalization",)
REFERENCE_EVALUATOR_MAX_BYTES = 64 * 2**20  # beyond this the NumPy evaluator takes minutes per call


def convert(src: Path, dst: Path) -> None:
    """Write SRC (fp32, any size) as an fp16 graph at DST with its weights in DST.data."""
    import onnx
    from onnxruntime.transformers import float16

    from sdrt.kernels.graph import toposort

    model = onnx.load(str(src))
    model = float16.convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS))
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
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)


def _drop_repeated_casts(graph) -> None:
    """The converter casts a weight kept in fp32 once per consumer, each Cast with the same name and
    output: a weight shared by several GroupNormalizations (an exporter dedups equal constants) then
    has several nodes writing one value, which ONNX Runtime refuses to load ("two nodes with same node
    name"; found on a GPU, where these graphs first ran in ONNX Runtime). Keep the first of each."""
    first: dict[str, object] = {}
    kept = []
    for node in graph.node:
        repeat = [first[o] for o in node.output if o in first]
        if repeat:
            if len(repeat) != len(node.output) or any(r != node for r in repeat):
                raise ValueError(f"fp16 conversion: {node.name} writes an existing value differently")
            continue
        first.update({o: node for o in node.output})
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def run_fp16(path: Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray] | None:
    """Execute an fp16 graph: ONNX Runtime's CUDA provider if present, else ONNX's reference
    evaluator if the model is small enough; None when neither can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        return session.run(output_names, feeds)
    size = sum(p.stat().st_size for p in path.parent.iterdir())  # the graph and the weights it shares
    if size > REFERENCE_EVALUATOR_MAX_BYTES:
        return None
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        return None  # contrib ops (MultiHeadAttention): ONNX Runtime only
    return ReferenceEvaluator(model).run(output_names, feeds)


def overflows(path: Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> bool | None:
    """True if the fp16 graph yields NaN/inf on FEEDS; None if it can't be executed here."""
    out = run_fp16(path, feeds, output_names)
    if out is None:
        return None
    return not all(np.isfinite(o).all() for o in out)
