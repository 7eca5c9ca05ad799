"""sdrt's own attention kernel for OpenVINO's CPU plugin on CPUs with AMX (amx_attention.c).

OpenVINO runs SD's self-attention at the 64x64 level (4,096 tokens, head size 40) as one fused
kernel whose time is bound by its softmax (docs/benchmarks.md, `cpu-vs-optimum-xeon-5/`, "What
bounds it"): 38% of the int8 UNet's step on a Xeon with AMX. amx_attention.c computes
softmax(q k^T * scale) v for one 16-query block at a time: q k^T on AMX tiles in bf16 into an f32
row block; 2^x as a cubic in x - floor(x), scaled by 2^floor(x), rounded to bf16, with the first 64
keys' max in place of the row's (a row that then overflows is done again with its own); p v on AMX
tiles and the division by the row sum at the end (docs/kernels.md, "sdrt's AMX attention kernel").
Head sizes up to 64 and any token counts (padding keys are masked); q, k and v are rounded to bf16
as OpenVINO's bf16 mode rounds them.

The kernel is compiled on first use with the system's C compiler (gcc 11 or later, or clang 12) into
SDRT_CACHE (default ~/.cache/sdrt), as PyTorch's inductor compiles its CPU kernels, and loaded with
ctypes. OpenVINO calls it through a custom operation (openvino.Op) that replaces the model's
ScaledDotProductAttention nodes it takes (replace_attention), after the model is reshaped to the
call's static shapes. Where the CPU lacks AMX, no compiler works, or SDRT_AMX_ATTENTION=0, nothing is
replaced and OpenVINO's own kernel runs; `available()` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("amx_attention.c")
SWITCH_ENV, CACHE_ENV = "SDRT_AMX_ATTENTION", "SDRT_CACHE"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
         "-fopenmp", "-shared", "-fPIC"]
MAX_HEAD = 64  # q k^T's depth fits two 32-column bf16 tiles
MIN_SCORES = 1 << 20  # query x key tokens per head below which OpenVINO's own kernel is left (too small to gain)
_FLOAT_P = ctypes.POINTER(ctypes.c_float)
log = logging.getLogger(__name__)


def _cpu_has_amx() -> bool:
    from sdrt.runtime.backends import cpu_features

    return "amx_bf16" in cpu_features()


def _build(cache: Path) -> Path:
    """The compiled library for this source and compiler, built once into CACHE."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    library = cache / f"amx_attention-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then a rename: no half-written library
            built = Path(tmp) / library.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode:
                raise OSError(f"{compiler} failed: {result.stderr.strip()[-400:]}")
            os.replace(built, library)
    return library


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, "") or (None, why not)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return None, f"{SWITCH_ENV}=0"
    if not _cpu_has_amx():
        return None, "the CPU has no AMX (amx_bf16)"
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdrt")
    try:
        library = ctypes.CDLL(str(_build(cache)))
    except OSError as e:
        why = f"cannot build {SOURCE.name}: {e}"
        log.warning("AMX attention kernel off, OpenVINO's attention runs instead (%s)", why)
        return None, why
    if library.sdrt_attention_init() != 0:
        why = "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
        log.warning("AMX attention kernel off, OpenVINO's attention runs instead (%s)", why)
        return None, why
    library.sdrt_attention.argtypes = [_FLOAT_P] * 4 + [ctypes.c_int] * 5 + [ctypes.c_float]
    library.sdrt_attention.restype = ctypes.c_int
    return library, ""


def available() -> tuple[bool, str]:
    """Whether the kernel runs here, and if not, why."""
    library, why = _library()
    return library is not None, why


def describe() -> str:
    """Which kernel runs OpenVINO's large attentions here, for logs and bench results."""
    ok, why = available()
    return f"attention {MIN_SCORES >> 20}M+ scores: sdrt's AMX kernel" if ok else f"attention: OpenVINO's ({why})"


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T * scale) v for f32 q [B, H, Sq, D], k and v [B, H, Sk, D] (C order), on AMX."""
    library, why = _library()
    if library is None:
        raise RuntimeError(f"the AMX attention kernel is not available: {why}")
    (b, h, sq, d), sk = q.shape, k.shape[2]
    if k.shape != (b, h, sk, d) or v.shape != k.shape or d > MAX_HEAD:
        raise ValueError(f"attention shapes q {q.shape}, k {k.shape}, v {v.shape}: need [B,H,S,D] with D <= {MAX_HEAD}")
    q, k, v = (np.ascontiguousarray(x, np.float32) for x in (q, k, v))
    out = np.empty_like(q) if out is None else out
    if out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attention output {out.shape} {out.dtype}: need C-order float32 {q.shape}")
    pointer = lambda a: a.ctypes.data_as(_FLOAT_P)  # noqa: E731
    if library.sdrt_attention(pointer(q), pointer(k), pointer(v), pointer(out), b, h, sq, sk, d, scale):
        raise MemoryError("the AMX attention kernel could not allocate its buffers")
    return out


def _operation():
    """openvino.Op running `attention` (defined on first use: openvino is optional)."""
    from openvino import Op

    class AmxAttention(Op):
        def __init__(self, inputs=None):
            super().__init__(self, inputs)
            if inputs:
                self.constructor_validate_and_infer_types()

        def validate_and_infer_types(self):
            self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

        def clone_with_new_inputs(self, new_inputs):
            return AmxAttention(new_inputs)

        def has_evaluate(self):
            return True

        def evaluate(self, outputs, inputs):
            q, k, v = (np.asarray(t.data) for t in inputs[:3])
            scale = float(np.asarray(inputs[3].data)) if len(inputs) > 3 else q.shape[-1] ** -0.5
            outputs[0].shape = inputs[0].shape
            attention(q, k, v, scale, out=np.asarray(outputs[0].data))
            return True

    return AmxAttention


def _uniform_mask(value) -> bool:
    """Whether an attention mask input adds the same to every score (so the softmax ignores it): a
    float constant, through Convert / ConvertLike, with one value. OpenVINO's ONNX frontend gives an
    Attention without a mask the mask 0."""
    node = value.get_node()
    while node.get_type_name() in ("Convert", "ConvertLike"):
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return False
    data = np.asarray(node.get_data())
    return data.size > 0 and data.dtype != np.bool_ and bool((data == data.flat[0]).all())


def replace_attention(model) -> int:
    """Replace MODEL's (an openvino.Model with static shapes) ScaledDotProductAttention nodes that the
    kernel takes and that are large enough to gain (MIN_SCORES) by the AMX kernel; returns how many.
    OpenVINO's node reads (q, k, v[, attention mask[, scale]]); the kernel takes no mask but one that
    adds the same to every score, and a scalar scale."""
    if not available()[0]:
        return 0
    operation, replaced = None, 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "ScaledDotProductAttention" or node.get_attributes().get("causal"):
            continue
        n = node.get_input_size()
        if n > 3 and not _uniform_mask(node.input_value(3)):
            continue
        if n > 4 and node.input_value(4).get_partial_shape().rank.get_length() != 0:
            continue  # a scale per head or per token: not taken
        q, k = (node.input_value(i).get_partial_shape() for i in (0, 1))
        if not (q.is_static and k.is_static) or len(q) != 4 or q[3].get_length() > MAX_HEAD:
            continue
        if q[2].get_length() * k[2].get_length() < MIN_SCORES:
            continue
        operation = operation or _operation()
        new = operation([node.input_value(i) for i in (0, 1, 2, 4) if i < n])
        new.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(new.output(0))
        replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced
