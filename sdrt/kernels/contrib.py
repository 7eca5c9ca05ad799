"""ONNX Runtime's contrib ops (com.microsoft) as ONNX reference-evaluator ops, from sdrt's NumPy
references: a fused graph of any target runs where its kernels don't, e.g. the CUDA-only ops of the
onnxruntime-cuda graph on a machine without a GPU (export parity, tests).

Each op computes in float64 and returns the input's dtype, so an fp16 graph still rounds every
tensor between ops to fp16 as the GPU does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx.reference.op_run import OpRun

from sdrt.kernels import reference as ref


class _Contrib(OpRun):
    op_domain = "com.microsoft"


def _like(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(y).astype(x.dtype)


class GroupNorm(_Contrib):
    def _run(self, x, gamma, beta, activation=0, channels_last=1, epsilon=1e-5, groups=32):
        return (_like(x, ref.group_norm(x, gamma, beta, groups, epsilon, bool(activation), bool(channels_last))),)


class SkipGroupNorm(_Contrib):
    def _run(self, x, gamma, beta, skip, bias=None, activation=0, channels_last=1, epsilon=1e-5, groups=32):
        y, s = ref.skip_group_norm(x, gamma, beta, skip, bias, groups, epsilon, bool(activation))
        return _like(x, y), _like(x, s)


class BiasSplitGelu(_Contrib):
    def _run(self, x, bias):
        return (_like(x, ref.bias_split_gelu(x, bias)),)


class BiasAdd(_Contrib):
    def _run(self, x, bias, skip):
        return (_like(x, np.asarray(x, np.float64) + bias + skip),)


class SkipLayerNormalization(_Contrib):
    def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-12):
        y, mean, inv_std, s = ref.skip_layer_norm(x, skip, gamma, beta, bias, epsilon)
        return tuple(_like(x, t) for t in (y, mean, inv_std, s))


class NhwcConv(_Contrib):
    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=1, kernel_shape=None, pads=None,
             strides=None):
        if group != 1 or any(d != 1 for d in dilations or ()) or auto_pad not in (None, "NOTSET", b"NOTSET"):
            raise NotImplementedError("NhwcConv reference: one group, no dilation, explicit pads")
        return (_like(x, ref.conv2d_nhwc(x, w, b, strides or (1, 1), pads or (0, 0, 0, 0))),)


class MultiHeadAttention(_Contrib):
    def _run(self, query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
             *past, num_heads=1, scale=None, mask_filter_value=None, unidirectional=0):
        if bias is not None or key_padding_mask is not None or any(p is not None for p in past) or unidirectional:
            raise NotImplementedError("MultiHeadAttention reference: no bias, padding mask, past or causal flag")
        out = ref.packed_attention(query, key, value, num_heads, attention_bias, scale)
        return (_like(query, out),)


class QuickGelu(_Contrib):
    def _run(self, x, alpha=1.702):
        x64 = np.asarray(x, np.float64)
        return (_like(x, x64 / (1.0 + np.exp(-alpha * x64))),)


class Resize(OpRun):
    """ONNX Resize, the nearest-neighbour upsampling torch exports (asymmetric, floor) only. The
    evaluator's own fails on it (ONNX 1.23: an empty `roi` input)."""
    op_domain = ""

    def _run(self, x, roi=None, scales=None, sizes=None, mode=b"nearest", coordinate_transformation_mode=b"",
             nearest_mode=b"", axes=None, **_):
        text = {k: v.decode() if isinstance(v, bytes) else v for k, v in
                (("mode", mode), ("ctm", coordinate_transformation_mode), ("nearest", nearest_mode))}
        if text != {"mode": "nearest", "ctm": "asymmetric", "nearest": "floor"} or axes is not None:
            raise NotImplementedError(f"Resize reference: nearest/asymmetric/floor only, not {text}")
        if sizes is not None and len(sizes):
            scales = np.asarray(sizes, np.float64) / x.shape
        out = np.asarray(x)
        for axis, scale in enumerate(np.asarray(scales, np.float64)):
            n = int(np.floor(x.shape[axis] * scale + 1e-9))
            out = np.take(out, np.minimum(np.floor(np.arange(n) / scale).astype(np.int64), x.shape[axis] - 1), axis)
        return (out,)


OPS = [Resize, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, SkipLayerNormalization, NhwcConv, MultiHeadAttention,
       QuickGelu]


def evaluate(model: str | Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
    """Run MODEL (a path; external weights beside it) with ONNX's reference evaluator and these ops."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(model))
    for i, node in enumerate(model.graph.node):  # the evaluator stores an unused output "" as a value,
        for j, name in enumerate(node.output):   # which later optional inputs "" would then read
            if not name:
                node.output[j] = f"sdrt_unused_{i}_{j}"
    return ReferenceEvaluator(model, new_ops=OPS).run(output_names, feeds)
