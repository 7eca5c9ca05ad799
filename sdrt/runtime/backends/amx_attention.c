/* softmax(q k^T * scale) v on AMX (bf16 tiles) for q [B,H,Sq,D], k and v [B,H,Sk,D], f32, D <= 64. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROWS 16  /* query rows per task: one tile's rows */
#define KEYS 64  /* keys per step of q k^T: four 16-key tiles */

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed)) tile_config;

static cpu_set_t every_cpu;
static __thread int worker_unpinned;

/* 0 when the kernel may use AMX tiles (Linux asks each process to request them). Called from the
   loading thread, not OpenVINO's: its CPUs (a container's cpuset) are the ones the workers may use. */
int sdrt_attention_init(void) {
  if (sched_getaffinity(0, sizeof every_cpu, &every_cpu)) {
    CPU_ZERO(&every_cpu);
    for (long i = 0; i < sysconf(_SC_NPROCESSORS_ONLN) && i < CPU_SETSIZE; i++) CPU_SET(i, &every_cpu);
  }
  return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

/* buffers kept between calls: fresh ones would fault their pages in on every call */
static void* grown(void** buf, size_t* size, size_t need) {
  if (need > *size) {
    free(*buf);
    *buf = aligned_alloc(64, need);
    *size = *buf ? need : 0;
  }
  return *buf;
}
static pthread_mutex_t packed_lock = PTHREAD_MUTEX_INITIALIZER;  /* one call at a time uses them */
static void *packed_q, *packed_k, *packed_v;
static size_t packed_q_size, packed_k_size, packed_v_size;
static __thread void *task_scores, *task_p;
static __thread size_t task_scores_size, task_p_size;

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

static inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

/* 2^x to bf16's precision: a cubic in x - floor(x) (vreduceps), scaled by 2^floor(x) (vscalefps takes x
   itself); 0 below 2^-149; -inf gives NaN, which the caller masks */
static inline __m512 exp2_ps(__m512 x) {
  __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0790425f), f, _mm512_set1_ps(0.2243303f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6964247f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000025f));
  return _mm512_scalef_ps(p, x);
}

/* one row of scores -> 2^((s - max) c) as bf16 into P; returns their sum, taken from the bf16 values
   (what p v reads). MAX need not be the row's: any value at most the row's max whose largest term stays
   below 2^64 gives the same result, since every term scales alike. */
static inline float exp_row(const float* row, uint16_t* prow, int Sk, int SK, float c, float max) {
  const __m512 cc = _mm512_set1_ps(c), mc = _mm512_set1_ps(max * c);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < SK; j += 32) {
    __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(row + j), cc, mc));
    __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(row + j + 16), cc, mc));
    if (j + 32 > Sk) {  /* padding keys: their -inf gave NaN */
      e0 = _mm512_maskz_mov_ps(j >= Sk ? 0 : (j + 16 <= Sk ? 0xffff : (1u << (Sk - j)) - 1), e0);
      e1 = _mm512_maskz_mov_ps(j + 16 >= Sk ? 0 : (1u << (Sk - j - 16)) - 1, e1);
    }
    __m512bh b = _mm512_cvtne2ps_pbh(e1, e0);
    sum = _mm512_dpbf16_ps(sum, b, ones);
    _mm512_store_si512((void*)(prow + j), (__m512i)b);
  }
  return _mm512_reduce_add_ps(sum);
}

/* one row of D floats -> DP bf16, zero padded */
static inline void row_bf16(const float* src, uint16_t* dst, int D, int DP) {
  for (int c = 0; c < DP; c += 16) {
    __mmask16 m = (__mmask16)(c + 16 <= D ? 0xffff : (c < D ? (1u << (D - c)) - 1 : 0));
    _mm256_mask_storeu_epi16(dst + c, (__mmask16)(c + 16 <= DP ? 0xffff : (1u << (DP - c)) - 1),
                             to_bf16(_mm512_maskz_loadu_ps(m, src + c)));
  }
}

/* one head's q, k and v in the tiles' layouts:
   qp [SQ][DP]: rows of q;
   kp [SK/16][DP/2][16][2]: per 16 keys, pairs of k's columns for each key (k^T as the B operand);
   vp [SK/2][VN][2]: per 2 keys, v's columns with the two keys' values side by side */
static void pack_head(const float* q, const float* k, const float* v, int Sq, int Sk, int D, int DP, int SQ,
                      int SK, int VN, uint16_t* qp, uint16_t* kp, uint16_t* vp) {
  uint16_t row[64] __attribute__((aligned(64)));
  for (int s = 0; s < SQ; s++) {
    if (s < Sq) row_bf16(q + (size_t)s * D, qp + (size_t)s * DP, D, DP);
    else memset(qp + (size_t)s * DP, 0, (size_t)DP * 2);
  }
  uint32_t* kw = (uint32_t*)kp;
  for (int s = 0; s < SK; s++) {
    if (s < Sk) row_bf16(k + (size_t)s * D, row, D, DP);
    else memset(row, 0, sizeof row);
    const uint32_t* pairs = (const uint32_t*)row;
    uint32_t* block = kw + (size_t)(s / 16) * (DP / 2) * 16 + (s % 16);
    for (int p = 0; p < DP / 2; p++) block[p * 16] = pairs[p];
  }
  for (int s = 0; s < SK; s += 2) {
    uint16_t* dst = vp + (size_t)(s / 2) * VN * 2;
    for (int c = 0; c < VN; c += 16) {
      __mmask16 m = (__mmask16)(c + 16 <= D ? 0xffff : (c < D ? (1u << (D - c)) - 1 : 0));
      __m256i a = s < Sk ? to_bf16(_mm512_maskz_loadu_ps(m, v + (size_t)s * D + c)) : _mm256_setzero_si256();
      __m256i b = s + 1 < Sk ? to_bf16(_mm512_maskz_loadu_ps(m, v + (size_t)(s + 1) * D + c)) : _mm256_setzero_si256();
      __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
      _mm256_storeu_si256((__m256i*)(dst + c * 2), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256((__m256i*)(dst + c * 2 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}

int sdrt_attention(const float* q, const float* k, const float* v, float* out, int B, int H, int Sq, int Sk,
                   int D, float scale) {
  if (D < 1 || D > 64 || Sq < 1 || Sk < 1) return 1;
  const int DP = round_up(D, 4), K0 = DP < 32 ? DP : 32, K1 = DP - K0;  /* q k^T's depth in two tiles */
  const int VN = round_up(D, 16), NT = VN / 16;                          /* output column tiles */
  const int SQ = round_up(Sq, ROWS), SK = round_up(Sk, KEYS), BH = B * H;
  pthread_mutex_lock(&packed_lock);
  uint16_t* qp = grown(&packed_q, &packed_q_size, (size_t)BH * SQ * DP * 2);
  uint16_t* kp = grown(&packed_k, &packed_k_size, (size_t)BH * SK * DP * 2);
  uint16_t* vp = grown(&packed_v, &packed_v_size, (size_t)BH * SK * VN * 2);
  if (!qp || !kp || !vp) {
    pthread_mutex_unlock(&packed_lock);
    return 2;
  }
  int failed = 0;
  const float c = scale * 1.4426950408889634f;  /* exp(x) = 2^(x log2 e) */
#pragma omp parallel
  {
    if (omp_get_thread_num() && !worker_unpinned) {  /* a pinned caller's workers would share its core */
      sched_setaffinity(0, sizeof every_cpu, &every_cpu);
      worker_unpinned = 1;
    }
#pragma omp for schedule(static)
    for (int bh = 0; bh < BH; bh++)
      pack_head(q + (size_t)bh * Sq * D, k + (size_t)bh * Sk * D, v + (size_t)bh * Sk * D, Sq, Sk, D, DP, SQ, SK,
                VN, qp + (size_t)bh * SQ * DP, kp + (size_t)bh * SK * DP, vp + (size_t)bh * SK * VN);
    tile_config qk, pv;
    memset(&qk, 0, sizeof qk); memset(&pv, 0, sizeof pv);
    qk.palette = pv.palette = 1;
    qk.rows[0] = ROWS; qk.colsb[0] = K0 * 2;          /* q, columns 0..K0 */
    qk.rows[1] = ROWS; qk.colsb[1] = K1 ? K1 * 2 : 4; /* q, columns K0..DP */
    qk.rows[2] = K0 / 2; qk.colsb[2] = 64;            /* k^T, 16 keys */
    qk.rows[3] = K1 ? K1 / 2 : 1; qk.colsb[3] = 64;
    pv.rows[0] = ROWS; pv.colsb[0] = 64;              /* p, 32 keys */
    pv.rows[2] = 16; pv.colsb[2] = 64;                /* v, 32 keys x 16 columns */
    for (int t = 4; t < 8; t++) { qk.rows[t] = pv.rows[t] = ROWS; qk.colsb[t] = pv.colsb[t] = 64; }
    float* scores = grown(&task_scores, &task_scores_size, (size_t)ROWS * SK * 4);
    uint16_t* p = grown(&task_p, &task_p_size, (size_t)ROWS * SK * 2);
    float o[ROWS * 64] __attribute__((aligned(64)));
    float sums[ROWS];
    if (!scores || !p) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    const int tasks = failed ? 0 : BH * (SQ / ROWS);
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; task++) {
      const int bh = task / (SQ / ROWS), r0 = task % (SQ / ROWS) * ROWS;
      const uint16_t* qh = qp + (size_t)bh * SQ * DP + (size_t)r0 * DP;
      const uint16_t* kh = kp + (size_t)bh * SK * DP;
      const uint16_t* vh = vp + (size_t)bh * SK * VN;
      _tile_loadconfig(&qk);
      _tile_loadd(0, qh, DP * 2);
      if (K1) _tile_loadd(1, qh + K0, DP * 2);
      for (int kb = 0; kb < SK; kb += KEYS) {
        _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
#define QK_TILE(T, J)                                                   \
        { const uint16_t* kt = kh + (size_t)(kb + 16 * (J)) * DP;       \
          _tile_loadd(2, kt, 64); _tile_dpbf16ps(T, 0, 2);              \
          if (K1) { _tile_loadd(3, kt + K0 * 16, 64); _tile_dpbf16ps(T, 1, 3); } }
        QK_TILE(4, 0) QK_TILE(5, 1) QK_TILE(6, 2) QK_TILE(7, 3)
        _tile_stored(4, scores + kb, SK * 4); _tile_stored(5, scores + kb + 16, SK * 4);
        _tile_stored(6, scores + kb + 32, SK * 4); _tile_stored(7, scores + kb + 48, SK * 4);
      }
      for (int r = 0; r < ROWS; r++) {
        float* row = scores + (size_t)r * SK;
        for (int j = Sk; j < SK; j++) row[j] = -INFINITY;  /* padding keys */
        /* the first 64 keys' max stands in for the row's (exp_row); a row whose terms then overflow 2^64
           is done again with its max */
        __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_load_ps(row), _mm512_load_ps(row + 16)),
                                 _mm512_max_ps(_mm512_load_ps(row + 32), _mm512_load_ps(row + 48)));
        float sum = exp_row(row, p + (size_t)r * SK, Sk, SK, c, _mm512_reduce_max_ps(m));
        if (!(sum < 0x1p64f)) {
          for (int j = KEYS; j < SK; j += 16) m = _mm512_max_ps(m, _mm512_load_ps(row + j));
          sum = exp_row(row, p + (size_t)r * SK, Sk, SK, c, _mm512_reduce_max_ps(m));
        }
        sums[r] = sum;
      }
      _tile_loadconfig(&pv);
      _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
      for (int kk = 0; kk < SK; kk += 32) {
        _tile_loadd(0, p + kk, SK * 2);
        const uint16_t* vt = vh + (size_t)(kk / 2) * VN * 2;
        _tile_loadd(2, vt, VN * 4); _tile_dpbf16ps(4, 0, 2);
        if (NT > 1) { _tile_loadd(2, vt + 32, VN * 4); _tile_dpbf16ps(5, 0, 2); }
        if (NT > 2) { _tile_loadd(2, vt + 64, VN * 4); _tile_dpbf16ps(6, 0, 2); }
        if (NT > 3) { _tile_loadd(2, vt + 96, VN * 4); _tile_dpbf16ps(7, 0, 2); }
      }
      _tile_stored(4, o, 256);
      if (NT > 1) _tile_stored(5, o + 16, 256);
      if (NT > 2) _tile_stored(6, o + 32, 256);
      if (NT > 3) _tile_stored(7, o + 48, 256);
      float* dst = out + ((size_t)bh * Sq + r0) * D;
      for (int r = 0; r < ROWS && r0 + r < Sq; r++) {
        const float inv = 1.f / sums[r];
        for (int d = 0; d < D; d++) dst[(size_t)r * D + d] = o[r * 64 + d] * inv;
      }
    }
    _tile_release();
  }
  pthread_mutex_unlock(&packed_lock);
  return failed ? 2 : 0;
}
