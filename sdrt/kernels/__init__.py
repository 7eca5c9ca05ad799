"""Graph rewrites per target: which fusions an engine gets depends on what will run it.

A target's passes run on the exported (standard ONNX) graph and produce a second graph file beside
it that shares its weights file. Each pass returns how many nodes it rewrote; `optimize` returns
those counts, which the manifest and `sdrt info` show.

Which passes a target gets is decided by measurement (docs/kernels.md):
- onnxruntime (CUDA provider; the CPU provider where there is no onnxruntime-cpu graph): fused
  MultiHeadAttention.
- onnxruntime-cpu (CPU provider): that, plus 3x3 convolutions as Winograd F(4x4, 3x3)
  (sdrt.kernels.winograd), and each GEGLU projection as two linear layers, one per half, instead of
  one and a Split (sdrt.kernels.split_linear). Not for CUDA: cuDNN picks its own Winograd /
  implicit-GEMM kernels, and the split was never timed on a GPU.
- tensorrt: attention decomposed into MatMul/Softmax/MatMul, the pattern its builder fuses.
- onnxruntime-cuda (CUDA provider, fp16 exports): ONNX Runtime's own Stable Diffusion fusions plus
  sdrt's where it falls short, then fp16; built by sdrt.kernels.cuda from the fp32 graph with its own
  weights, so it is not one of TARGETS' graph-only rewrites.
- openvino (OpenVINO's CPU plugin): an int8 UNet's attention inputs as symmetric int8, which OpenVINO
  runs on its int8 kernels (sdrt.kernels.int8_attention), every upsampler (nearest 2x + 3x3 Conv)
  as four 2x2 convolutions of the small map (sdrt.kernels.upsample), and the GEGLU projections split
  as above. Attention and GroupNormalization stay ONNX's ops: OpenVINO fuses opset-23 Attention and
  GroupNormalization itself.
GroupNormalization is left as ONNX's op on every target: the rewrites tried on ONNX Runtime's CPU
provider (InstanceNormalization, LayerNormalization forms) made whole components slower or no faster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdrt.kernels.attention import decompose_attention, fuse_multihead_attention
from sdrt.kernels.graph import Graph, load_graph_only, save_graph_only
from sdrt.kernels.int8_attention import symmetric_int8_attention
from sdrt.kernels.split_linear import split_linear
from sdrt.kernels.upsample import upsample_conv
from sdrt.kernels.winograd import REFERENCE_SIDE, winograd_conv

# each pass: (graph, latent side the layer choice is made for) -> nodes rewritten
PASSES: dict[str, Callable[[Graph, int], int]] = {
    "MultiHeadAttention": lambda graph, side: fuse_multihead_attention(graph),
    "DecomposedAttention": lambda graph, side: decompose_attention(graph),
    "WinogradConv": winograd_conv,
    "SymmetricInt8Attention": lambda graph, side: symmetric_int8_attention(graph),
    "UpsampleConv": lambda graph, side: upsample_conv(graph),
    "SplitLinear": lambda graph, side: split_linear(graph),
}
TARGETS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("MultiHeadAttention",),
    "onnxruntime-cpu": ("MultiHeadAttention", "WinogradConv", "SplitLinear"),
    "tensorrt": ("DecomposedAttention",),
    "openvino": ("SymmetricInt8Attention", "UpsampleConv", "SplitLinear"),
}


def target_file(model_file: str, target: str) -> str:
    """unet/model.onnx -> unet/model.onnxruntime.onnx"""
    stem, _, ext = model_file.rpartition(".")
    return f"{stem}.{target}.{ext}"


def same_graph_as(target: str, counts: dict[str, int]) -> str | None:
    """The target whose graph TARGET's equals, given what TARGET's passes rewrote: one whose passes
    are a subset of TARGET's when the rest rewrote nothing (the export then writes only that one)."""
    for other, passes in TARGETS.items():
        extra = set(TARGETS[target]) - set(passes)
        if other != target and set(passes) < set(TARGETS[target]) and not any(counts[p] for p in extra):
            return other
    return None


def apply(graph: Graph, passes: tuple[str, ...], latent_side: int = REFERENCE_SIDE) -> dict[str, int]:
    return {name: PASSES[name](graph, latent_side) for name in passes}


def optimize(src: Path, target: str, latent_side: int = REFERENCE_SIDE) -> tuple[Path, dict[str, int]]:
    """Write SRC's graph rewritten for TARGET beside it; return (path, nodes rewritten per pass).
    LATENT_SIDE: the latent side size-dependent choices are made for (Winograd layers)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    model = load_graph_only(src)
    counts = apply(Graph(model), TARGETS[target], latent_side)
    dst = src.parent / target_file(src.name, target)
    save_graph_only(model, dst)
    return dst, counts
