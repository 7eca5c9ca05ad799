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
