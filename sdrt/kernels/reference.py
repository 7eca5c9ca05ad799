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
