"""NumPy references for the operators the rewrite passes emit (float64 inside).

Each is the op's documented semantics, written from its spec, and is what the parity tests hold
ONNX Runtime's kernels to.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
              scale: float | None = None) -> np.ndarray:
    """ONNX Attention-23 on 4-D inputs (B, heads, S, head_dim), float additive mask, no causal/softcap."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ np.swapaxes(k, -1, -2) * scale
    if mask is not None:
        logits = logits + mask
    return softmax(logits) @ v


def split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    b, s, d = x.shape
    return x.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def multi_head_attention(query: np.ndarray, key: np.ndarray, value: np.ndarray, num_heads: int,
                         attention_bias: np.ndarray | None = None, scale: float | None = None) -> np.ndarray:
    """com.microsoft.MultiHeadAttention with separate 3-D Q, K, V (B, S, heads*head_dim), optional
    additive attention_bias broadcastable to (B, heads, S, L); output (B, S, heads*head_dim_v)."""
    q, k, v = (split_heads(np.asarray(t, np.float64), num_heads) for t in (query, key, value))
    return merge_heads(attention(q, k, v, attention_bias, scale))


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, pad: int = 1) -> np.ndarray:
    """ONNX Conv, stride 1, one group, the same padding on every side: x (N, C, H, W), w (K, C, r, s)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    r, s = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, wd = xp.shape[2] - r + 1, xp.shape[3] - s + 1
    y = sum(np.einsum("nchw,kc->nkhw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j]) for i in range(r) for j in range(s))
    return y if b is None else y + np.asarray(b, np.float64)[:, None, None]


def nearest_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ONNX Resize, mode nearest, asymmetric coordinates, floor (torch's F.interpolate nearest) of x
    (N, C, H, W) to SIZE: output pixel i reads input pixel floor(i * H / size)."""
    rows = np.floor(np.arange(size[0]) * (x.shape[2] / size[0])).astype(int)
    cols = np.floor(np.arange(size[1]) * (x.shape[3] / size[1])).astype(int)
    return x[:, :, rows][:, :, :, cols]


def winograd_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, bt: np.ndarray, g: np.ndarray,
                  at: np.ndarray) -> np.ndarray:
    """A 3x3, stride-1, padding-1 Conv by Winograd's minimal filtering F(m x m, 3 x 3) with the 1-D
    transforms B^T (a x a), G (a x 3), A^T (m x a), a = m + 2: each m x m output tile is
    A^T [(G w G^T) * (B^T d B)] A for the a x a input tile d at stride m (the textbook algorithm,
    tile by tile; sdrt.kernels.winograd writes the same with ONNX ops)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    m, a = at.shape
    n, c, h, wd = x.shape
    th, tw = -(-h // m), -(-wd // m)
    xp = np.zeros((n, c, th * m + 2, tw * m + 2))
    xp[:, :, 1:h + 1, 1:wd + 1] = x
    u = np.einsum("ai,kcij,bj->kcab", g, w, g)  # G w G^T per (out, in) channel pair
    y = np.zeros((n, w.shape[0], th * m, tw * m))
    for ty in range(th):
        for tx in range(tw):
            d = xp[:, :, ty * m:ty * m + a, tx * m:tx * m + a]
            v = np.einsum("ai,ncij,bj->ncab", bt, d, bt)  # B^T d B
            mm = np.einsum("kcab,ncab->nkab", u, v)
            y[:, :, ty * m:(ty + 1) * m, tx * m:(tx + 1) * m] = np.einsum("ia,nkab,jb->nkij", at, mm, at)
    y = y[:, :, :h, :wd]
    return y if b is None else y + np.asarray(b, np.float64)[:, None, None]


# -- the com.microsoft ops of the onnxruntime-cuda target (ONNX Runtime's ContribOperators.md) --------

def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU."""
    from math import erf, sqrt

    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def group_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, epsilon: float,
               silu: bool = False, channels_last: bool = True) -> np.ndarray:
    """GroupNorm: x (N, H, W, C) channels last, else (N, C, H, W); SiLU after it with silu."""
    x = np.asarray(x, np.float64)
    if not channels_last:
        x = x.transpose(0, 2, 3, 1)
    n, h, w, c = x.shape
    g = x.reshape(n, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + epsilon)).reshape(n, h, w, c) * gamma + beta
    if silu:
        y = y / (1.0 + np.exp(-y))
    return y if channels_last else y.transpose(0, 3, 1, 2)


def skip_group_norm(x, gamma, beta, skip, bias, groups: int, epsilon: float, silu: bool):
    """SkipGroupNorm (channels last): s = x + skip [+ bias], skip (N, H, W, C), (N, 1, 1, C) or
    (N, C); returns (GroupNorm(s), s)."""
    skip = np.asarray(skip, np.float64)
    s = np.asarray(x, np.float64) + (skip[:, None, None, :] if skip.ndim == 2 else skip)
    if bias is not None:
        s = s + bias
    return group_norm(s, gamma, beta, groups, epsilon, silu), s


def bias_split_gelu(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """BiasSplitGelu: (x + bias) split in halves on the last axis, first * GELU(second)."""
    z = np.asarray(x, np.float64) + bias
    half = z.shape[-1] // 2
    return z[..., :half] * gelu(z[..., half:])


def skip_layer_norm(x, skip, gamma, beta, bias, epsilon: float):
    """SkipLayerNormalization: s = x + skip [+ bias]; returns (LayerNorm(s) * gamma [+ beta], mean,
    1 / std, s), the statistics over the last axis."""
    s = np.asarray(x, np.float64) + skip
    if bias is not None:
        s = s + bias
    mean = s.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt(s.var(axis=-1, keepdims=True) + epsilon)
    y = (s - mean) * inv_std * gamma
    return (y if beta is None else y + beta), mean, inv_std, s


def conv2d_nhwc(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides=(1, 1),
                pads=(0, 0, 0, 0)) -> np.ndarray:
    """NhwcConv (one group, no dilation): x (N, H, W, C), w (K, r, s, C), pads (top, left, bottom,
    right); output (N, H', W', K)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    r, s = w.shape[1:3]
    sh, sw = strides
    h = (xp.shape[1] - r) // sh + 1
    wd = (xp.shape[2] - s) // sw + 1
    y = sum(np.einsum("nhwc,kc->nhwk", xp[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (wd - 1) + 1:sw], w[:, i, j])
            for i in range(r) for j in range(s))
    return y if b is None else y + np.asarray(b, np.float64)


def packed_attention(query, key, value, num_heads: int, attention_bias=None, scale=None) -> np.ndarray:
    """MultiHeadAttention with any of its input layouts: separate 3-D Q, K, V; packed QKV as
    query (B, S, heads, 3, head_dim); Q with packed KV as key (B, L, heads, 2, head_dim)."""
    def merged(x):  # (B, S, heads, head_dim) -> (B, S, heads * head_dim)
        return x.reshape(*x.shape[:2], -1)

    if query.ndim == 5:
        query, key, value = (merged(query[:, :, :, i]) for i in range(3))
    elif key.ndim == 5:
        key, value = (merged(key[:, :, :, i]) for i in range(2))
    return multi_head_attention(query, key, value, num_heads, attention_bias, scale)
