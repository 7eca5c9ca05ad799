"""sdrt's AMX attention kernel (sdrt/runtime/backends/amx_attention.c) against the NumPy reference
(sdrt.kernels.reference.attention, float64), and the OpenVINO operation that runs it in place of
ScaledDotProductAttention nodes.

Tolerance: q, k, v and the softmax weights are rounded to bf16 (8-bit mantissa), as OpenVINO's bf16 mode
rounds them; its own fused kernel is 0.0036 relative RMS from float64 at SD's 64x64 level, and the
kernel is held to 0.01 at every shape. On a CPU without AMX (or without a C compiler) the kernel tests
skip with the reason `available()` gives, and the fallback tests still run.
"""

from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt.kernels import reference
from sdrt.runtime.backends import amx_attention, openvino
from tests.conftest import SIZES

TOLERANCE = 0.01  # relative RMS against float64 (bf16 inputs and weights)


def _rel_rms(got, want) -> float:
    return float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))


def _qkv(b, h, sq, sk, d, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal([b, h, sq, d]).astype(np.float32) * spread,
            rng.standard_normal([b, h, sk, d]).astype(np.float32),
            rng.standard_normal([b, h, sk, d]).astype(np.float32))


@pytest.fixture
def fresh_library():
    """available() decided again under the test's settings, and again after it."""
    amx_attention._library.cache_clear()
    yield
    amx_attention._library.cache_clear()


@pytest.fixture
def kernel():
    ok, why = amx_attention.available()
    if not ok:
        pytest.skip(f"AMX attention kernel not available here: {why}")


# (B, H, Sq, Sk, D): SD 1.5's 64x64 self-attention per head is (4096, 4096, 40); the rest test padding of
# queries to 16 rows, keys to 64, head sizes to 4 and 16 columns, and a key count below one tile
SHAPES = [(1, 2, 256, 256, 40), (2, 3, 77, 77, 40), (1, 1, 5, 3, 8), (1, 2, 100, 300, 64), (2, 1, 33, 77, 40),
          (1, 2, 64, 64, 20), (1, 1, 17, 1000, 6), (1, 1, 1024, 1024, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_numpy_reference(kernel, shape):
    q, k, v = _qkv(*shape)
    scale = shape[-1] ** -0.5
    got = amx_attention.attention(q, k, v, scale)
    assert got.shape == q.shape and np.isfinite(got).all()
    assert _rel_rms(got, reference.attention(q, k, v, scale=scale)) < TOLERANCE


@pytest.mark.parametrize("score", [400, 1000])
def test_row_max_beyond_the_first_keys_is_redone(kernel, score):
    """The first 64 keys' max stands in for each row's: a key past them scoring 63 (2^91 after the
    stand-in, past the 2^64 bound) or 158 (inf) higher makes the row be done again with its own max;
    the attention then picks that key."""
    q, k, v = _qkv(1, 1, 32, 512, 40, spread=0.1)
    k[0, 0, 400] = q[0, 0, 0] / (q[0, 0, 0] @ q[0, 0, 0]) * score  # q0 . k400 = SCORE, times 1/sqrt(40)
    got = amx_attention.attention(q, k, v, 40 ** -0.5)
    want = reference.attention(q, k, v, scale=40 ** -0.5)
    np.testing.assert_allclose(got[0, 0, 0], v[0, 0, 400], rtol=0.01, atol=0.01)
    assert _rel_rms(got, want) < TOLERANCE


def test_concurrent_calls_take_turns(kernel):
    """Two engines of a server may call the kernel at once: its shared buffers are behind a lock."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [_qkv(2, 4, 300, 300, 40, seed=i) for i in range(4)]
    alone = [amx_attention.attention(*qkv, 0.2) for qkv in inputs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda qkv: amx_attention.attention(*qkv, 0.2), inputs * 3))
    for i, got in enumerate(together):
        np.testing.assert_array_equal(got, alone[i % 4])


def test_kernel_refuses_heads_over_64(kernel):
    q, k, v = _qkv(1, 1, 16, 16, 80)
    with pytest.raises(ValueError, match="D <= 64"):
        amx_attention.attention(q, k, v, 1.0)


def _sdpa_model(b, h, s, d, scale, mask="zero"):
    """An OpenVINO model around one ScaledDotProductAttention (inputs q, k, v[, mask[, scale]]). MASK
    "zero": the float mask 0 that OpenVINO's ONNX frontend gives an Attention without one; "varying": a
    mask that changes the scores; None: no mask input (then no scale input either)."""
    import openvino as ov
    import openvino.opset13 as ops

    q, k, v = (ops.parameter([b, h, s, d], np.float32, name=n) for n in "qkv")
    args = [ops.multiply(x, ops.constant(np.float32(1))) for x in (q, k, v)]  # not the model's inputs
    if mask == "zero":
        args.append(ops.convert_like(ops.constant(np.float32(0)), q))
    elif mask == "varying":
        args.append(ops.constant(np.random.default_rng(1).standard_normal([s, s]).astype(np.float32)))
    if mask is not None and scale is not None:
        args.append(ops.constant(np.float32(scale)))
    return ov.Model([ops.add(ops.scaled_dot_product_attention(*args), ops.constant(np.float32(0)))], [q, k, v])


def _compiled_output(model, feeds, precision="f32"):
    import openvino as ov

    return np.array(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})(feeds)[0])


@pytest.mark.parametrize("mask, scale", [("zero", None), (None, None), ("zero", 0.3)])
def test_openvino_operation_replaces_large_attention(kernel, mask, scale):
    pytest.importorskip("openvino")
    b, h, s, d = 1, 2, 1024, 40  # 1M scores per head: MIN_SCORES
    q, k, v = _qkv(b, h, s, s, d)
    feeds = {"q": q, "k": k, "v": v}
    want = reference.attention(q, k, v, scale=scale or d ** -0.5)
    # OpenVINO's own kernel reads the inputs so: the operation must read them alike
    assert _rel_rms(_compiled_output(_sdpa_model(b, h, s, d, scale, mask), feeds), want) < 1e-5
    model = _sdpa_model(b, h, s, d, scale, mask)
    assert amx_attention.replace_attention(model) == 1
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("ScaledDotProductAttention") == 0
    for precision in ("f32", "bf16"):
        assert _rel_rms(_compiled_output(model, feeds, precision), want) < TOLERANCE


@pytest.mark.parametrize("case", ["small", "head 80", "mask", "dynamic"])
def test_openvino_operation_leaves_what_it_does_not_take(kernel, case):
    pytest.importorskip("openvino")
    import openvino as ov

    shape = {"small": (1, 2, 512, 40), "head 80": (1, 2, 1024, 80)}.get(case, (1, 2, 1024, 40))
    model = _sdpa_model(*shape, None, mask="varying" if case == "mask" else "zero")
    if case == "dynamic":
        model.reshape({name: ov.PartialShape([1, 2, -1, 40]) for name in "qkv"})
    assert amx_attention.replace_attention(model) == 0


@pytest.mark.parametrize("how", ["switch", "no amx", "no compiler"])
def test_without_the_kernel_openvino_keeps_its_own(fresh_library, monkeypatch, tmp_path, caplog, how):
    """SDRT_AMX_ATTENTION=0, a CPU without AMX, or a failing compiler: nothing is replaced, and why is
    said (a failing compiler on a CPU with AMX is also logged as a warning)."""
    pytest.importorskip("openvino")
    monkeypatch.setenv(amx_attention.CACHE_ENV, str(tmp_path))  # nothing built earlier to load
    if how == "switch":
        monkeypatch.setenv(amx_attention.SWITCH_ENV, "0")
    elif how == "no amx":
        monkeypatch.setattr(amx_attention, "_cpu_has_amx", lambda: False)
    else:
        monkeypatch.setattr(amx_attention, "_cpu_has_amx", lambda: True)
        monkeypatch.setenv("CC", "false")
    ok, why = amx_attention.available()
    assert not ok and why.startswith({"switch": "SDRT_AMX_ATTENTION=0", "no amx": "the CPU has no AMX (amx_bf16)",
                                      "no compiler": "cannot build amx_attention.c: false failed"}[how])
    assert ("AMX attention kernel off" in caplog.text) == (how == "no compiler")
    assert amx_attention.replace_attention(_sdpa_model(1, 2, 1024, 40, None)) == 0
    assert "OpenVINO's" in amx_attention.describe()
    with pytest.raises(RuntimeError, match="not available"):
        amx_attention.attention(*_qkv(1, 1, 16, 16, 8), 1.0)


def test_pipeline_with_the_kernel_equals_openvino_alone(kernel, engines, monkeypatch):
    """A whole tiny generation on OpenVINO with every attention given to the kernel (MIN_SCORES 0: the
    tiny UNet's are far below it) against the same with OpenVINO's own attention."""
    pytest.importorskip("openvino")
    w, h = SIZES["eps"]

    def image(threshold):
        monkeypatch.setattr(amx_attention, "MIN_SCORES", threshold)
        with sdrt.Pipeline.load(engines["eps"], provider="openvino-fp32") as pipe:
            pixels = pipe("a lighthouse at dusk", steps=3, seed=5, width=w, height=h).pixels
            unet = pipe.engines["unet"]  # a GuidedBackend: its guided and plain graphs' backends
            return pixels.astype(np.float64), sum(e.replaced_attention for e in unet.engines.values())

    want, none = image(1 << 60)
    got, replaced = image(0)
    assert none == 0 and replaced > 0
    mse = ((got - want) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255 ** 2 / mse) > 40  # dB: bf16 attention inside an fp32 UNet


def test_backend_can_leave_attention_to_openvino(engines, monkeypatch):
    pytest.importorskip("openvino")
    calls = []
    monkeypatch.setattr(amx_attention, "replace_attention", lambda model: calls.append(model) or 0)
    w, h = SIZES["eps"]
    for on in (True, False):
        monkeypatch.setattr(openvino.OpenVinoBackend, "amx_attention", on)
        with sdrt.Pipeline.load(engines["eps"], provider="openvino-fp32") as pipe:
            pipe("a lighthouse at dusk", steps=1, seed=5, width=w, height=h)
        assert bool(calls) == on  # each static-shape compilation offers its model, unless switched off
        calls.clear()


def test_a_failing_replacement_leaves_openvino_running(engines, monkeypatch, caplog):
    """A bug in the replacement (here: it raises) is logged, and the model runs as without the kernel."""
    pytest.importorskip("openvino")
    w, h = SIZES["eps"]

    def image():
        with sdrt.Pipeline.load(engines["eps"], provider="openvino-fp32") as pipe:
            return pipe("a lighthouse at dusk", steps=1, seed=5, width=w, height=h).pixels

    def broken(model):
        raise RuntimeError("cannot take this model")

    monkeypatch.setattr(openvino.OpenVinoBackend, "amx_attention", False)
    want = image()
    monkeypatch.setattr(openvino.OpenVinoBackend, "amx_attention", True)
    monkeypatch.setattr(amx_attention, "replace_attention", broken)
    np.testing.assert_array_equal(image(), want)
    assert "AMX attention kernel not used (RuntimeError: cannot take this model)" in caplog.text


def test_output_buffer_is_checked(kernel):
    q, k, v = _qkv(1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="C-order float32"):
        amx_attention.attention(q, k, v, 1.0, out=np.empty(q.shape, np.float64))
