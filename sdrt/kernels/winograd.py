"""Winograd convolution: 3x3 stride-1 Conv -> F(4x4, 3x3) as Conv / MatMul / DepthToSpace.

Winograd's minimal filtering (Lavin & Gray, 2015) computes each 4x4 output tile of a 3x3 convolution
from a 6x6 input tile with 36 multiplies per (input, output) channel pair instead of 144: the
convolution's GEMM work drops 4x, for three cheap linear transforms. ONNX Runtime's CPU provider
has no Winograd kernel (MLAS convolves directly), so the
pass writes the algorithm with standard ONNX ops, each of which ONNX Runtime runs well:

    x [N, C, H, W]
    -> Conv(x as [N*C, 1, H, W], B^T (x) B^T as 36 6x6 filters, stride 4)   gather + input transform
    -> [N, 36, C, T]                                                         (T = 4x4 tiles)
    -> MatMul(U [36, K, C], .)                                               36 GEMMs
    -> MatMul(A^T (x) A^T [16, 36], .) -> DepthToSpace(4)                    output transform
    -> crop to H x W, + bias

U = G g G^T is computed from the Conv's own weight inside the graph, per call: the rewritten graph
shares the original's weights file and costs no extra memory. G is an overridable initializer (also
a graph input), so ONNX Runtime does not fold U into a constant at session creation: folding is
hardly faster and costs 3x the rewritten layers' weights in memory. The output transform is MatMul +
DepthToSpace, faster than ConvTranspose. (The measurements: docs/kernels.md.)

Which layers: a 3x3 Conv with stride 1, dilation 1, one group, padding 1 on every side and a
constant fp32 weight (or an int8 one dequantized in a QDQ graph), whose output map at 512 px
(SD 1.5's size; another size with `sdrt export --cpu-size`) is at least `MIN_SIDE` on each side.
Where a layer's transformed tiles would take more than `MAX_TILE_BYTES` per image, it is computed in
row bands that each take at most that (`bands`; the input is sliced with one row of overlap, the
band outputs concatenated).
For SD 1.5 that is the UNet's 64x64 and 32x32 levels and every VAE level (the decoder's 128-512 px
levels in 2-10 bands). Smaller maps have too few tiles to pay for the transforms. Unbanded, the VAE
decoder's 128-512 px levels nearly doubled its peak memory.

In a QDQ graph (`--precision int8`) such a layer computes in fp32: it reads the activation before
its QuantizeLinear / DequantizeLinear pair and its dequantized int8 weight, and the fp32 layers after
it read its output unrounded too (quantized layers keep their int8 input); pairs nothing reads any
more are dropped. On AVX2 CPUs without VNNI, ONNX Runtime's int8 direct convolution was no faster
than fp32 Winograd for these layers (docs/kernels.md), and their activations are no longer rounded
to 8 bits.

Numerics: F(4x4, 3x3) in fp32 differs from direct convolution by about 1e-5 relative (the points
0, +-1, +-2 keep the transforms' entries small); sdrt.kernels.reference.winograd_conv is the NumPy
reference, and the export's parity check holds each rewritten component to its tolerance.
"""

from __future__ import annotations

import ast
import operator

import numpy as np
from onnx import TensorProto, helper

from sdrt.kernels.graph import Constants, Graph, attrs, run_pass

# F(4x4, 3x3) at the points 0, 1, -1, 2, -2 and infinity (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks", 2015, section 4.2)
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)
TILE, WINDOW = 4, 6  # output tile side, input tile side

REFERENCE_SIDE = 64  # latent side the shape annotations are evaluated at by default: 512 px
MIN_SIDE = 32  # rewrite layers whose output is at least 32x32 there
MAX_TILE_BYTES = 64 << 20  # a layer's transformed input tiles per image above this: row bands
QUANTIZED_LAYERS = ("Conv", "MatMul", "Gemm")  # a QDQ graph's layers whose int8 inputs stay as they are


def transforms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2-D transforms as matrices on row-major flattened tiles: (B^T (x) B^T [36, 36],
    G (x) G [36, 9], A^T (x) A^T [16, 36])."""
    return np.kron(BT, BT), np.kron(G, G), np.kron(AT, AT)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def eval_dim(dim, side: int) -> int | None:
    """A shape annotation (an int, or an expression of symbolic sides like '((h - 1)//2) + 1') at
    input side SIDE; None if it is not such an expression."""
    if isinstance(dim, int):
        return dim
    if not isinstance(dim, str):
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return side
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(dim)

    try:
        return ev(ast.parse(dim, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _attr(node, name, default):
    return attrs(node).get(name, default)


def float_constant(graph: Graph, name: str):
    """The initializer behind the fp32 value NAME: NAME itself, or the tensor a DequantizeLinear of
    initializers dequantizes to fp32 (a QDQ graph's int8 weight or int32 bias); None otherwise."""
    t = graph.initializers.get(name)
    if t is not None:
        return t if t.data_type == TensorProto.FLOAT else None
    dq = graph.parent_of(name, "DequantizeLinear")
    if dq is None or not all(i in graph.initializers for i in dq.input if i):
        return None
    return graph.initializers[dq.input[0]] if graph.initializers[dq.input[1]].data_type == TensorProto.FLOAT else None


def unquantized(graph: Graph, name: str) -> str:
    """X where NAME is DequantizeLinear(QuantizeLinear(X)), a QDQ graph's quantized activation; else NAME."""
    dq = graph.parent_of(name, "DequantizeLinear")
    q = graph.parent_of(dq.input[0], "QuantizeLinear") if dq is not None else None
    return q.input[0] if q is not None else name


def bypass_rounding(graph: Graph, value: str) -> None:
    """Where VALUE goes through QuantizeLinear / DequantizeLinear, the consumers that compute in fp32
    read VALUE itself; those that are quantized layers (Conv, MatMul, Gemm) keep the int8 input
    ONNX Runtime fuses into its QLinear kernels."""
    for q in [c for c in graph.consumers.get(value, []) if c.op_type == "QuantizeLinear"]:
        for dq in [c for c in graph.consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
            for c in graph.consumers.get(dq.output[0], []):
                if c.op_type not in QUANTIZED_LAYERS:
                    for i, name in enumerate(c.input):
                        if name == dq.output[0]:
                            c.input[i] = value


def eligible(graph: Graph, node, latent_side: int = REFERENCE_SIDE) -> bool:
    """Whether the pass rewrites NODE (the rule in the module docstring), for images whose latent
    side is LATENT_SIDE (`sdrt export --cpu-size`; default 64, i.e. 512 px)."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    w = float_constant(graph, node.input[1])
    if w is None or len(w.dims) != 4 or list(w.dims[2:]) != [3, 3]:
        return False
    if len(node.input) > 2 and node.input[2] and float_constant(graph, node.input[2]) is None:
        return False
    if (_attr(node, "group", 1) != 1 or list(_attr(node, "strides", [1, 1])) != [1, 1]
            or list(_attr(node, "dilations", [1, 1])) != [1, 1]
            or list(_attr(node, "pads", [0, 0, 0, 0])) != [1, 1, 1, 1]
            or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return False
    shape = graph.shapes.get(node.output[0])
    if not shape or len(shape) != 4:
        return False
    sides = [eval_dim(d, latent_side) for d in shape[2:]]
    return all(s is not None and s >= MIN_SIDE for s in sides)


def bands(graph: Graph, node, latent_side: int = REFERENCE_SIDE) -> int:
    """How many row bands eligible NODE is computed in, so that each band's transformed tiles take at
    most MAX_TILE_BYTES per image at LATENT_SIDE."""
    h, w = (eval_dim(d, latent_side) for d in graph.shapes[node.output[0]][2:])
    channels = int(float_constant(graph, node.input[1]).dims[1])
    return -(-WINDOW**2 * channels * -(-h // TILE) * -(-w // TILE) * 4 // MAX_TILE_BYTES)


def _rewrite(graph: Graph, k: Constants, node, n_bands: int) -> list:
    bt2, g2, at2 = transforms()
    x, w = unquantized(graph, node.input[0]), node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    K, C = (int(d) for d in float_constant(graph, w).dims[:2])
    f = lambda stem: graph.fresh(f"winograd_{stem}")  # noqa: E731
    i64 = lambda stem, v: k.get(stem, np.array(v, np.int64))  # noqa: E731
    name = node.name or f("conv")
    nodes = []

    def op(op_type, inputs, **attrs):
        out = f(op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"{name}/{op_type}_{len(nodes)}", **attrs))
        return out

    def tiles(x_band, top_pad: int, out_hw: str) -> str:
        """The convolution of the rows X_BAND (TOP_PAD zero rows above it), cropped to OUT_HW."""
        # input tiles, transformed: [N*C, 36, TH, TW] -> [N, 36, C, TH*TW]; the end pads make the last
        # tiles cover the last rows and columns (and an empty band one tile)
        x1 = op("Reshape", [x_band, i64("shape_planes", [-1, 1, 0, 0])])
        v0 = op("Conv", [x1, k.get("input_transform", bt2.reshape(36, 1, WINDOW, WINDOW).astype(np.float32))],
                strides=[TILE, TILE], pads=[top_pad, 1, TILE, TILE])
        v1 = op("Unsqueeze", [v0, i64("axis0", [0])])
        v2 = op("Reshape", [v1, i64(f"shape_tiles_{C}", [-1, C, 36, 0, 0])])
        v3 = op("Transpose", [v2], perm=[0, 2, 1, 3, 4])
        v = op("Reshape", [v3, i64("shape_flat_tiles", [0, 0, 0, -1])])
        m = op("MatMul", [u, v])  # [N, 36, K, T]
        # output transform: [N, 36, K*T] -> [N, 16 K, TH, TW] -> DepthToSpace -> [N, K, 4 TH, 4 TW]
        m1 = op("Reshape", [m, i64("shape_tile_major", [0, 36, -1])])
        y5 = op("MatMul", [k.get("output_transform", at2.astype(np.float32)), m1])
        blocks = op("Concat", [i64(f"shape_blocks_{K}", [0, 16 * K]), op("Shape", [v0], start=2)], axis=0)
        y1 = op("DepthToSpace", [op("Reshape", [y5, blocks])], blocksize=TILE, mode="DCR")
        return op("Slice", [y1, i64("zeros2", [0, 0]), out_hw, i64("axes_hw", [2, 3])])

    # filters, transformed: U = G g G^T as [36, K, C]
    g = k.overridable("filter_transform", g2.astype(np.float32))
    w9 = op("Reshape", [op("Transpose", [w], perm=[2, 3, 0, 1]), i64("shape_taps", [9, -1])])
    u = op("Reshape", [op("MatMul", [g, w9]), i64(f"shape_filters_{K}_{C}", [36, K, C])])
    if n_bands == 1:
        y = tiles(x, 1, op("Shape", [x], start=2))
    else:
        y = op("Concat", _banded(op, i64, x, n_bands, tiles), axis=2)
    if bias is not None:
        y = op("Add", [y, op("Unsqueeze", [bias, i64("axes_12", [1, 2])])])
    nodes[-1].output[0] = node.output[0]
    if node.output[0] not in graph.graph_outputs:
        bypass_rounding(graph, node.output[0])
    return nodes


def _banded(op, i64, x: str, n_bands: int, tiles) -> list[str]:
    """Each band's output: band b is output rows [cut b, cut b+1), cut b = max(1, H * b // N_BANDS),
    computed from the same input rows and one more on either side (the first band's upper one and the
    last band's lower one are padding)."""
    h, width = op("Shape", [x], start=2, end=3), op("Shape", [x], start=3)
    one, rows = i64("int_1", [1]), i64("axis_h", [2])
    cuts = [i64("zero1", [0])]
    for b in range(1, n_bands):
        share = op("Div", [op("Mul", [h, i64(f"int_{b}", [b])]), i64(f"int_{n_bands}", [n_bands])])
        cuts.append(op("Max", [one, share]))
    cuts.append(h)
    out = []
    for b in range(n_bands):
        band = op("Slice", [x, op("Sub", [cuts[b], one]) if b else cuts[0], op("Add", [cuts[b + 1], one]), rows])
        out_hw = op("Concat", [op("Sub", [cuts[b + 1], cuts[b]]), width], axis=0)
        out.append(tiles(band, 0 if b else 1, out_hw))
    return out


def winograd_conv(graph: Graph, latent_side: int = REFERENCE_SIDE) -> int:
    """Rewrite each eligible 3x3 Conv as F(4x4, 3x3) Winograd; return how many were rewritten."""
    k = Constants(graph, "winograd")
    layers = [n for n in graph.nodes if eligible(graph, n, latent_side)]
    quantized = any(unquantized(graph, n.input[0]) != n.input[0] for n in layers)
    return run_pass(graph, layers, lambda node: ([node], _rewrite(graph, k, node, bands(graph, node, latent_side))),
                    prune=quantized)
