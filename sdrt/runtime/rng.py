"""Other tools' random generators in NumPy, bit for bit, so a seed gives their noise without torch.

`TorchCpuGenerator(seed).randn(shape)` equals `torch.randn(shape, generator=torch.Generator("cpu")
.manual_seed(seed))` (float32), and successive calls continue the generator as torch's do. torch's
CPU generator is MT19937 (seeded with the seed's low 32 bits, as torch does); `randn` has two
layouts (aten/src/ATen/native/cpu/DistributionTemplates.h):
- under 16 values: Box-Muller in float64 on 53-bit uniforms, one pair per two values, the second
  of a pair kept for the next value (and the next call);
- 16 values or more: every value first becomes a 24-bit float32 uniform; then each block of 16 is
  Box-Muller'd (values j and j+8 of the block from one pair), and a size that is not a multiple of
  16 redraws 16 fresh uniforms for the last 16 values. torch's x86 builds (AVX2 kernels, used on
  AVX-512 CPUs too) compute this block with avx_mathfun's float32 log and sincos polynomials,
  compiled with fused multiply-adds: reproduced here operation by operation (`_fma` is exact in
  x86's 80-bit long double). Checked against torch 2.13 on x86; other builds (ARM, or a torch whose
  kernels differ) may differ in the last bit of some values.

`PhiloxGenerator(seed).randn(shape)` is A1111's "NV" noise source: Philox4x32-10 keyed by the 64-bit
seed, counter (call offset, 0, element index, 0), one Box-Muller normal per counter from its first
two words, as A1111 draws torch.randn's CUDA numbers on any device.
"""

from __future__ import annotations

import math

import numpy as np

F32, F64 = np.float32, np.float64
_MASK32 = 0xFFFFFFFF


def _mt19937(seed: int) -> np.random.MT19937:
    """MT19937 seeded as torch's manual_seed does (init_genrand with the seed's low 32 bits)."""
    key = np.zeros(624, np.uint32)
    key[0] = seed & _MASK32
    prev = int(key[0])
    for i in range(1, 624):
        prev = (1812433253 * (prev ^ (prev >> 30)) + i) & _MASK32
        key[i] = prev
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return bg


def _f32(x) -> np.ndarray:
    return np.asarray(x, F32)


def _fma(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32 (the product of two float32s is exact in long double)."""
    ld = np.longdouble
    return (_f32(a).astype(ld) * _f32(b).astype(ld) + _f32(c).astype(ld)).astype(F32)


def _bits(x) -> np.ndarray:
    return _f32(x).view(np.int32)


def _float(i) -> np.ndarray:
    return np.asarray(i, np.int32).view(F32)


_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


def _log(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's log256_ps (cephes logf), for x in (0, 1]."""
    x = np.maximum(_f32(x), _float(0x00800000))
    e = ((_bits(x) >> 23) - 0x7F).astype(F32) + F32(1)
    x = _float((_bits(x) & ~0x7F800000) | _bits(F32(0.5)))
    small = x < F32(0.707106781186547524)
    x_low = np.where(small, x, F32(0))
    x = x - F32(1)
    e = e - np.where(small, F32(1), F32(0))
    x = x + x_low
    z = x * x
    y = F32(_LOG_POLY[0])
    for p in _LOG_POLY[1:]:
        y = _fma(y, x, F32(p))
    y = y * x
    y = _fma(y, z, e * F32(-2.12194440e-4))
    y = _fma(-z, F32(0.5), y)
    x = x + y
    return _fma(e, F32(0.693359375), x)


def _sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's sincos256_ps (cephes sinf / cosf), for x >= 0."""
    x = _f32(x)
    j = (x * F32(1.27323954473516)).astype(np.int32)  # x * 4 / pi, truncated
    j = (j + 1) & ~1
    y = j.astype(F32)
    sin_sign = (j & 4) << 29
    cos_sign = (~(j - 2) & 4) << 29
    sin_poly = (j & 2) == 0
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):  # x - j * pi / 4
        x = _fma(y, F32(dp), x)
    z = x * x
    c = _fma(_fma(F32(2.443315711809948e-5), z, F32(-1.388731625493765e-3)), z, F32(4.166664568298827e-2))
    c = _fma(c * z, z, -(z * F32(0.5))) + F32(1)
    s = _fma(_fma(F32(-1.9515295891e-4), z, F32(8.3321608736e-3)), z, F32(-1.6666654611e-1))
    s = _fma(s * z, x, x)
    sin = np.where(sin_poly, s, c)
    cos = np.where(sin_poly, c, s)
    return _float(_bits(sin) ^ sin_sign), _float(_bits(cos) ^ cos_sign)


class TorchCpuGenerator:
    """torch.Generator("cpu").manual_seed(seed), for torch.randn."""

    def __init__(self, seed: int):
        self._mt = _mt19937(seed)
        self._next_normal: float | None = None  # torch's cached second value of a Box-Muller pair

    def _uniform24(self, n: int) -> np.ndarray:
        return (self._mt.random_raw(n) & 0xFFFFFF).astype(F32) * F32(2.0**-24)

    def _uniform53(self) -> float:
        hi, lo = (int(v) for v in self._mt.random_raw(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    @staticmethod
    def _box_muller16(u: np.ndarray) -> np.ndarray:
        """Blocks of 16 uniforms (rows) -> normals, as torch's normal_fill_16_AVX2."""
        radius = np.sqrt(F32(-2) * _log(F32(1) - u[:, :8]))
        sin, cos = _sincos(F32(2.0 * math.pi) * u[:, 8:])
        return np.concatenate([radius * cos, radius * sin], axis=1)

    def randn(self, shape) -> np.ndarray:
        n = math.prod(shape)
        if n < 16:
            return np.array([self._scalar_normal() for _ in range(n)], F32).reshape(shape)
        out = self._uniform24(n)
        whole = n - n % 16
        out[:whole] = self._box_muller16(out[:whole].reshape(-1, 16)).reshape(-1)
        if n % 16:  # the last 16 values again, from fresh uniforms
            out[n - 16:] = self._box_muller16(self._uniform24(16).reshape(1, 16)).reshape(-1)
        return out.reshape(shape)

    def _scalar_normal(self) -> float:
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        u1, u2 = self._uniform53(), self._uniform53()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 (Salmon et al., Random123): counter (4, n) and key (2, n) uint32 -> (4, n) uint32."""
    c = counter.astype(np.uint64)
    k = key.astype(np.uint64)
    for r in range(rounds):
        if r:
            k = (k + np.array(_PHILOX_W, np.uint64)[:, None]) & _MASK32
        p0 = c[0] * _PHILOX_M[0]
        p1 = c[2] * _PHILOX_M[1]
        c = np.stack([(p1 >> 32) ^ c[1] ^ k[0], p1 & _MASK32, (p0 >> 32) ^ c[3] ^ k[1], p0 & _MASK32])
    return c.astype(np.uint32)


class PhiloxGenerator:
    """A1111's NV generator: each randn call is one Philox counter offset further."""

    def __init__(self, seed: int):
        self.seed = seed % (1 << 64)
        self.offset = 0

    def randn(self, shape) -> np.ndarray:
        n = math.prod(shape)
        counter = np.zeros((4, n), np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.array([[self.seed & _MASK32], [self.seed >> 32]], np.uint32).repeat(n, axis=1)
        x, y = philox4x32(counter, key)[:2]
        # A1111 computes Box-Muller in float64 from float32 constants
        inv32, inv32_2pi = F64(F32(2.3283064e-10)), F64(F32(2.3283064e-10 * 6.2831855))
        u = x.astype(F64) * inv32 + F64(F32(2.3283064e-10) / F32(2))
        v = y.astype(F64) * inv32_2pi + F64(F32(2.3283064e-10 * 6.2831855) / F32(2))
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(F32).reshape(shape)
