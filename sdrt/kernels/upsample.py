"""Nearest 2x upsampling followed by a 3x3 convolution, computed on the small map (the openvino
target's `UpsampleConv` pass).

Every upsampler of the SD UNet and VAE decoder is `Conv3x3(Resize2x(x))` (diffusers' Upsample2D).
Each pixel of the upsampled map repeats one of x's, so the 3x3 window of an output pixel covers only
2x2 distinct pixels of x, and which of the 9 taps land on which of them depends only on the output
pixel's row and column parity, its phase (a, b). Along one axis, with taps w[-1], w[0], w[1]:

    even output row 2i:  w[-1] x[i-1] + (w[0] + w[1]) x[i]
    odd output row 2i+1: (w[-1] + w[0]) x[i] + w[1] x[i+1]

So the layer is four 2x2 convolutions of x, one per phase (kernels R_a w R_b^T; padding 1 on the side
the phase's window reaches past x), interleaved by DepthToSpace: 16 multiplies per channel pair and
input pixel instead of 36, 2.25x less work, and the same sum up to rounding (the combined taps are
added once, in the graph's precision). The phase kernels are computed in the graph from the layer's
own weight, so the graph keeps sharing its weights file; OpenVINO folds them at compilation.

Which layers: a Resize (nearest, asymmetric, floor: torch's `F.interpolate(scale_factor=2)`) read
only by a 3x3 Conv with padding 1, stride 1, dilation 1, one group and a constant float weight.
- Scales [1, 1, 2, 2] (the VAE decoder): rewritten outright.
- Output sizes from the skip connection (sdrt's UNet export asks for them so that odd latent sides
  work): the upsampled map is exactly 2x where the skip's side is even and one row (or column) short
  where it is odd, e.g. the 65-wide level of a 520 px image. The phases' 2x map is cropped to the
  size and its last row and column corrected (`_cropped`): the same nodes for every size, no If.
  This takes the sizes to be 2h or 2h - 1, as a skip connection's are (the stride-2 downsampling
  between them rounds up); diffusers' Upsample2D asks for no other.

Measured on 2 cores of a Xeon with AMX, OpenVINO bf16, one layer alone (docs/kernels.md): the UNet's
three upsamplers at 512 px, batch 2, 0.326 s against 0.181 s; the VAE decoder's three 1.73 s against
1.20 s. On ONNX Runtime's CPU provider the Winograd pass already computes the larger of these layers
with less work, so the onnxruntime-cpu target does not take this pass.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sdrt.kernels.graph import Builder, Constants, Graph, attrs, run_pass

# rows (phase a, tap p) of R: which of a 3x3 kernel's rows each 2-tap phase kernel sums (the formulas above)
R = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # DepthToSpace's DCR order: channel block 2a + b
FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _scales(graph: Graph, resize) -> np.ndarray | None:
    name = resize.input[2] if len(resize.input) > 2 else ""
    return numpy_helper.to_array(graph.initializers[name]) if name in graph.initializers else None


def _sizes(resize) -> str:
    return resize.input[3] if len(resize.input) > 3 else ""


def _match(graph: Graph, resize):
    """The 3x3 Conv that alone reads RESIZE's 2x nearest upsampling, and its weight's dtype; None if
    the pair is not one this pass computes exactly."""
    a = attrs(resize)
    if (a.get("mode", b"nearest") != b"nearest" or a.get("coordinate_transformation_mode") != b"asymmetric"
            or a.get("nearest_mode") != b"floor" or a.get("antialias", 0) or "axes" in a):
        return None
    scales, sizes = _scales(graph, resize), _sizes(resize)
    if not (sizes or (scales is not None and scales.tolist() == [1, 1, 2, 2])):
        return None
    conv = graph.only_consumer(resize.output[0], "Conv")
    weight = graph.initializers.get(conv.input[1]) if conv is not None else None
    if weight is None or weight.data_type not in FLOATS or list(weight.dims[2:]) != [3, 3]:
        return None
    c = attrs(conv)
    if (c.get("pads") != [1, 1, 1, 1] or c.get("strides", [1, 1]) != [1, 1] or c.get("group", 1) != 1
            or c.get("dilations", [1, 1]) != [1, 1] or c.get("auto_pad", b"NOTSET") != b"NOTSET"):
        return None
    return conv, FLOATS[weight.data_type]


def _phase_kernels(graph: Graph, k: Constants, w: str, dtype) -> tuple[list, list[str]]:
    """Nodes computing the four 2x2 phase kernels from the 3x3 weight W, and their names."""
    taps, kernel = graph.fresh("phase_taps"), graph.fresh("phase_kernels")
    rows, cols = (k.get(f"{n}_{dtype.__name__}", r.astype(dtype)) for n, r in (("rows", R), ("cols", R.T)))
    nodes = [helper.make_node("MatMul", [w, cols], [taps]),  # [O, I, 3, 4]: the columns summed
             helper.make_node("MatMul", [rows, taps], [kernel])]  # [O, I, 4, 4]: the rows too
    names = []
    for a, b in PHASES:  # block (a, b) of the 4x4 is a phase's kernel
        names.append(graph.fresh("phase_kernel"))
        nodes.append(helper.make_node("Slice", [kernel, k.ints(2 * a, 2 * b), k.ints(2 * a + 2, 2 * b + 2),
                                                k.ints(2, 3)], [names[-1]]))
    return nodes, names


def _phase_nodes(graph: Graph, x: str, kernels: list[str], bias: list[str], out: str) -> list:
    """Four 2x2 convolutions of X, one per phase, interleaved into OUT."""
    nodes, phases = [], []
    for (a, b), kernel in zip(PHASES, kernels, strict=True):
        phases.append(graph.fresh("phase"))
        nodes.append(helper.make_node("Conv", [x, kernel, *bias], [phases[-1]], kernel_shape=[2, 2],
                                      pads=[1 - a, 1 - b, a, b]))
    joined = graph.fresh("phases")
    return nodes + [helper.make_node("Concat", phases, [joined], axis=1),
                    helper.make_node("DepthToSpace", [joined], [out], blocksize=2, mode="DCR")]


def _cropped(graph: Graph, k: Constants, x: str, w: str, dtype, full: str, sizes: str, out: str) -> list:
    """Nodes that turn FULL, the phases' 2h x 2w map, into OUT, the original pair's map at SIZES.

    Where a side is odd (2h - 1), the original upsampling stops one row short of 2x, so its last
    upsampled row (the second copy of x's last row) is the convolution's zero padding instead. FULL
    counted it, through the 3x3 kernel's bottom row w[1, :], in its last kept row only. So that row
    loses w[1, :] applied to the upsampled last row of x (cropped to the kept width), and the same
    for an odd width with w[:, 1] and x's last column; where both are odd, the corner pixel of x was
    taken off twice and goes back once. Each correction is a convolution of one row or column of x,
    scaled by 0 or 1 (the side's parity), so any size takes the same nodes and no If (OpenVINO
    2026.4 computed an If here wrongly with dynamic shapes)."""
    op = Builder(graph, k)
    end = op.ints(2 ** 62)
    hw = op("Slice", sizes, op.ints(2), op.ints(4), op.ints(0))  # [H, W]
    last = op("Sub", hw, op.ints(1))
    odd = op("Cast", op("Sub", op("Mul", op("Shape", x, start=2), op.ints(2)), hw),
             to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))  # 1 where a side is 2h - 1, else 0
    odd_h, odd_w = (op("Gather", odd, k.get(f"index_{i}", np.array(i, np.int64))) for i in (0, 1))
    h_, w_ = (op("Slice", hw, op.ints(i), op.ints(i + 1), op.ints(0)) for i in (0, 1))
    last_h, last_w = (op("Slice", last, op.ints(i), op.ints(i + 1), op.ints(0)) for i in (0, 1))
    kept = op("Slice", full, op.ints(0, 0), hw, op.ints(2, 3))

    def edge(axis: int) -> str:  # w's far row (axis 2) or column (3) on x's last row or column, upsampled
        line = op("Slice", x, op.ints(-1), end, op.ints(axis))
        scales = k.get(f"scales_{axis}", np.array([1, 1, 1, 2] if axis == 2 else [1, 1, 2, 1], np.float32))
        up = op("Resize", line, "", scales, mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")
        taps = op("Slice", w, op.ints(2), op.ints(3), op.ints(axis))
        pads = [0, 1, 0, 1] if axis == 2 else [1, 0, 1, 0]
        along = op("Conv", up, taps, pads=pads, kernel_shape=[1, 3] if axis == 2 else [3, 1])
        return op("Slice", along, op.ints(0), w_ if axis == 2 else h_, op.ints(5 - axis))  # cropped as OUT

    row = op("Mul", edge(2), odd_h)  # [N, K, 1, W]
    corner = op("Conv", op("Slice", x, op.ints(-1, -1), op.ints(2 ** 62, 2 ** 62), op.ints(2, 3)),  # [N, K, 1, 1]
                op("Slice", w, op.ints(2, 2), op.ints(3, 3), op.ints(2, 3)), kernel_shape=[1, 1])
    corner = op("Pad", op("Mul", corner, odd_h), op("Concat", op.ints(0, 0), last_h, op.ints(0, 0, 0, 0, 0), axis=0))
    column = op("Mul", op("Sub", edge(3), corner), odd_w)  # [N, K, H, 1]
    fixed = op("Concat", op("Slice", kept, op.ints(0), last_h, op.ints(2)),
               op("Sub", op("Slice", kept, last_h, h_, op.ints(2)), row), axis=2)
    left, right = op("Slice", fixed, op.ints(0), last_w, op.ints(3)), op("Slice", fixed, last_w, w_, op.ints(3))
    op("Concat", left, op("Sub", right, column), output=out, axis=3)
    return op.nodes


def upsample_conv(graph: Graph) -> int:
    """Rewrite each nearest 2x upsampling + 3x3 Conv as its four phases; returns how many."""
    k = Constants(graph, "phase")

    def rewrite(resize):
        match = _match(graph, resize)
        if match is None:
            return None
        conv, dtype = match
        x, out, sizes = resize.input[0], conv.output[0], _sizes(resize)
        new, kernels = _phase_kernels(graph, k, conv.input[1], dtype)  # constants: OpenVINO folds them
        if not sizes:
            new += _phase_nodes(graph, x, kernels, list(conv.input[2:3]), out)
        else:
            full = graph.fresh("upsampled_2x")
            new += _phase_nodes(graph, x, kernels, list(conv.input[2:3]), full)
            new += _cropped(graph, k, x, conv.input[1], dtype, full, sizes, out)
        for node in new:  # the layer's module scope, for profiles and sdrt.kernels.deepcache
            node.metadata_props.extend(conv.metadata_props)
        return [resize, conv], new

    candidates = [n for n in graph.nodes if n.op_type == "Resize"]
    return run_pass(graph, candidates, rewrite, prune=True)
