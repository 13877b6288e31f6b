// Flash-attention kernel for x86 CPUs (AVX2 + FMA), float32 in and out, float32 accumulation.
//
// Compiled by cpu_attention.cc with -march=x86-64-v3 by default (setup.py): 256-bit AVX2 + FMA code, 16
// vector registers. With AVX-512VL enabled (FKV_CPU_ARCH=native on an AVX-512 CPU) the same code gets 32
// registers and larger register tiles, but measured ~20 % slower on Zen 4 (docs/cpu_kernel.md).
//
// One task = one (batch, query-frame group, head, query tile of <= q_tile queries):
//   * the set of keys of the (batch, group, head) is one list of row pointers (the allowed chunk frames,
//     the valid memory tokens, the selected cache slots, read in place), so masking is by omission: no
//     masked score is ever computed, and a partial tile exists only at the end of the list;
//   * the query tile is packed transposed and pre-scaled, Qt[d][i] = q[i][d] * log2(e) / sqrt(D), so the
//     softmax runs in base 2 and the scores are computed transposed, S[j][i] (keys as rows, queries along
//     the vector lanes): the row max and row sum of the softmax are lane-wise (no horizontal reductions);
//   * per key tile (k_tile keys): the keys are packed into panels [D][6] (8x8 register transposes) and the
//     values copied contiguous, while the next tile's rows are prefetched into L2; then, per strip of 16
//     queries, the score micro-kernel (6 keys x 16 queries in 12 accumulators) also takes the column
//     maxima in registers, and exp2 / the running sum follow while the strip is in L1;
//   * O[i][d] = O[i][d] * corr[i] + sum_j P[j][i] V[j][d]: the P.V micro-kernel (6 queries x 16 dims)
//     applies the running-max correction as it loads the accumulator.
// Register tiles use 12 of the 16 ymm registers of AVX2 (plus 2 loads and 1 broadcast).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace fkv {

// One call: pointers and sizes (row-major arrays, shapes as in the Python wrapper).
struct Problem {
  const float* q;       // [B, Sq, H, D]
  const float* kc;      // [B, Sq, H, D] the chunk's own keys
  const float* vc;      // [B, Sq, H, D]
  const float* kn;      // [B, H, N, T, D] the cache
  const float* vn;      // [B, H, N, T, D]
  const int32_t* frames;  // [B, Qf, H, K] selected slots, < 0 = none
  const bool* cmask;    // [B, Qf, H, C] readable chunk frames
  const float* mk;      // [B, M, H, D] memory tokens
  const float* mv;      // [B, M, H, D]
  const bool* mvalid;   // [B, H, M]
  float* out;           // [B, Sq, H, D]
  int64_t B, Sq, H, D, N, T, Qf, K, C, M;
  int64_t bq, bk;  // query tile (a multiple of 16), key tile
  int64_t tq;      // queries per group, Sq / Qf
  int64_t nqt;     // query tiles per group
  int64_t tasks;   // B * Qf * H * nqt
};

// 2**x for x <= 0 (every exponent of the online softmax): x = n + f, n = round(x), f in [-1/2, 1/2],
// 2**f = 1 + f * q(f), q of degree 4 (a Chebyshev-node least-squares fit with relative weights: relative
// error < 1.1e-7 on [-1/2, 1/2] before float32 rounding), 2**n through the exponent bits. The constant term is
// exactly 1 so that an unchanged running max gives a correction factor of exactly 1: a factor 1 + 1e-7 per
// key tile would drift the weight of early tiles against late ones over long key lists. Below 2**-126 the
// result stays 2**-126 (the row's own maximum contributes 1, so this is far below float32 rounding of the sum).
static inline __m256 exp2_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.3218672481611782e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671697938398914e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5508929524512175e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022238002741145e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931468559416916e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Scores of one panel of R key rows against 8*NV queries: st[r][0:8NV] = sum_d kpan[d][r] * qt[d][0:8NV]
// (kpan: the panel packed as [D][R]); tmax[0:8NV] is raised to the column maxima. qt, st, tmax already point
// at the first query column; row stride bq. A partial last panel is padded with copies of a valid key row,
// so its extra rows never raise the maximum (and are never read afterwards).
template <int R, int NV>
static inline void qk_block(const float* kpan, const float* qt, int64_t d_len, int64_t bq, float* st,
                            float* tmax) {
  __m256 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t d = 0; d < d_len; ++d) {
    __m256 qv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) qv[v] = _mm256_load_ps(qt + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 kb = _mm256_broadcast_ss(kpan + r);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(kb, qv[v], acc[r][v]);
    }
    qt += bq;
    kpan += R;
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    __m256 mx = _mm256_load_ps(tmax + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(st + r * bq + 8 * v, acc[r][v]);
      mx = _mm256_max_ps(mx, acc[r][v]);
    }
    _mm256_store_ps(tmax + 8 * v, mx);
  }
}

// o[r][0:8NV] = o[r][0:8NV] * corr[r] + sum_j pt[j][r] * v[j][0:8NV] for R query rows. pt points at the
// first query column of P (row stride ld), v at v[0][d0] of the packed value tile (row stride d_len), o at
// o[i0][d0] (row stride d_len).
template <int R, int NV>
static inline void pv_block(const float* v, const float* pt, int64_t ld, int64_t bk, const float* corr, float* o,
                            int64_t d_len) {
  __m256 acc[R][NV];  // this tile's P.V alone (a sum of bk terms), added to the rescaled accumulator at the end:
                     // accumulating every key of a long list in one register would grow the rounding error
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < bk; ++j) {
    __m256 vv[NV];
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) vv[u] = _mm256_loadu_ps(v + 8 * u);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_broadcast_ss(pt + r);
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_fmadd_ps(pb, vv[u], acc[r][u]);
    }
    v += d_len;
    pt += ld;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m256 c = _mm256_broadcast_ss(corr + r);
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u)
      _mm256_storeu_ps(o + r * d_len + 8 * u, _mm256_fmadd_ps(_mm256_loadu_ps(o + r * d_len + 8 * u), c, acc[r][u]));
  }
}

// register tiles: QK R rows x 16 query lanes, PV R query rows x 8*NV head-dim lanes, within 16 (AVX2) or 32
// (AVX-512VL) vector registers
#ifndef FKV_QK_ROWS
#ifdef __AVX512VL__
#define FKV_QK_ROWS 12
#define FKV_PV_ROWS 6
#define FKV_PV_NV 4
#else
#define FKV_QK_ROWS 6
#define FKV_PV_ROWS 6
#define FKV_PV_NV 2
#endif
#endif
constexpr int QK_ROWS = FKV_QK_ROWS;
constexpr int PV_ROWS = FKV_PV_ROWS;
constexpr int PV_NV = FKV_PV_NV;

// R query rows (R <= PV_ROWS, the tile's last rows may be fewer), all of D: 8*PV_NV lanes at a time, then
// 16 and 8.
template <int R>
static inline void pv_rows(int rows, const float* v, const float* pt, int64_t ld, int64_t bk, const float* corr,
                           float* o, int64_t d_len) {
  if constexpr (R > 0) {
    if (rows == R) {
      int64_t d0 = 0;
      for (; d0 + 8 * PV_NV <= d_len; d0 += 8 * PV_NV) pv_block<R, PV_NV>(v + d0, pt, ld, bk, corr, o + d0, d_len);
      for (; d0 + 16 <= d_len; d0 += 16) pv_block<R, 2>(v + d0, pt, ld, bk, corr, o + d0, d_len);
      if (d0 < d_len) pv_block<R, 1>(v + d0, pt, ld, bk, corr, o + d0, d_len);  // d_len % 16 == 8
      return;
    }
    return pv_rows<R - 1>(rows, v, pt, ld, bk, corr, o, d_len);
  }
}

// Per-worker buffers. Qt and P have a row stride ld = bq + 16 floats: a power-of-two stride would map the
// rows a micro-kernel walks through onto a few L1 sets.
struct Scratch {
  int64_t ld = 0;         // row stride of qt and st
  float* qt = nullptr;    // [D][ld] the query tile, transposed and scaled
  float* st = nullptr;    // [bk rounded up to QK_ROWS][ld] scores, then P, transposed (keys x queries)
  float* kpan = nullptr;  // the key tile as panels of QK_ROWS rows, [bk / QK_ROWS][D][QK_ROWS]
  float* vt = nullptr;    // the value tile, [bk][D] contiguous
  float* o = nullptr;     // [bq][D] the output accumulator
  float* m = nullptr;     // [bq] running max (base-2 scores)
  float* l = nullptr;     // [bq] running sum
  float* tmax = nullptr;  // [bq] max of the current tile
  float* corr = nullptr;  // [bq] exp2(m_old - m_new)
  std::vector<const float*> kp, vp;
  void* block = nullptr;

  explicit Scratch(const Problem& p) {
    const int64_t bq = p.bq, bk = p.bk, d = p.D;
    ld = bq + 16;
    const int64_t bk_pad = (bk + QK_ROWS - 1) / QK_ROWS * QK_ROWS;
    const int64_t floats = d * ld + bk_pad * ld + bk_pad * d + bk * d + bq * d + 4 * bq + 16 * 10;
    const size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
    block = std::aligned_alloc(64, bytes);
    float* f = static_cast<float*>(block);
    auto take = [&f](int64_t n) {
      float* r = f;
      f += ((n + 15) / 16) * 16;  // keep every array 64-byte aligned
      return r;
    };
    qt = take(d * ld);
    st = take(bk_pad * ld);
    kpan = take(bk_pad * d);
    vt = take(bk * d);
    o = take(bq * d);
    m = take(bq);
    l = take(bq);
    tmax = take(bq);
    corr = take(bq);
    const int64_t max_keys = p.Sq + p.K * p.T + p.M;
    kp.resize(max_keys + 8);
    vp.resize(max_keys + 8);
  }
  ~Scratch() { std::free(block); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// The key rows of (b, g, h): the allowed chunk frames, the selected cache slots, the valid memory tokens.
static int64_t gather_keys(const Problem& p, int64_t b, int64_t g, int64_t h, const float** kp, const float** vp) {
  int64_t n = 0;
  const int64_t row = p.H * p.D;  // token stride of [B, S, H, D] arrays
  const int64_t frame_tokens = p.Sq / p.C;
  const bool* cm = p.cmask + ((b * p.Qf + g) * p.H + h) * p.C;
  for (int64_t c = 0; c < p.C; ++c) {
    if (!cm[c]) continue;
    const int64_t base = ((b * p.Sq + c * frame_tokens) * p.H + h) * p.D;
    for (int64_t t = 0; t < frame_tokens; ++t, ++n) {
      kp[n] = p.kc + base + t * row;
      vp[n] = p.vc + base + t * row;
    }
  }
  for (int64_t m = 0; m < p.M; ++m) {
    if (!p.mvalid[(b * p.H + h) * p.M + m]) continue;
    const int64_t off = ((b * p.M + m) * p.H + h) * p.D;
    kp[n] = p.mk + off;
    vp[n] = p.mv + off;
    ++n;
  }
  const int32_t* fr = p.frames + ((b * p.Qf + g) * p.H + h) * p.K;
  for (int64_t k = 0; k < p.K; ++k) {
    const int32_t slot = fr[k];
    if (slot < 0 || slot >= p.N) continue;
    const int64_t base = ((b * p.H + h) * p.N + slot) * p.T * p.D;
    for (int64_t t = 0; t < p.T; ++t, ++n) {
      kp[n] = p.kn + base + t * p.D;
      vp[n] = p.vn + base + t * p.D;
    }
  }
  return n;
}

// In-register transpose: r[k] becomes (r[0][k], r[1][k], ..., r[7][k]).
static inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Stores the first n (1..8) lanes of v (no masked store: it is slow on AMD cores).
static inline void store_lanes(float* dst, __m256 v, int n) {
  if (n == 8) return _mm256_storeu_ps(dst, v);
  const __m128 lo = _mm256_castps256_ps128(v);
  if (n == 4) return _mm_storeu_ps(dst, lo);
  if (n == 6) {
    _mm_storeu_ps(dst, lo);
    return _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4), _mm256_extractf128_ps(v, 1));
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int i = 0; i < n; ++i) dst[i] = tmp[i];
}

// Packs key tile rows [0, bk) of kp into [D][QK_ROWS] panels (a partial last panel padded with copies of
// the last row; D % 8 == 0, 8x8 transposes in registers) and value rows into vt [bk][D]; prefetches the rows
// of the next tile (nkp/nvp, nbk rows) into L2.
static inline void pack_tile(const float* const* kp, const float* const* vp, int64_t bk, int64_t D, float* kpan,
                             float* vt, const float* const* nkp, const float* const* nvp, int64_t nbk) {
  constexpr int R = QK_ROWS;
  const int64_t panels = (bk + R - 1) / R;
  for (int64_t pn = 0; pn < panels; ++pn) {
    float* dst = kpan + pn * D * R;
    for (int r0 = 0; r0 < R; r0 += 8) {
      const int n = std::min(8, R - r0);  // rows of this group (8, or the panel's last 4 / 6)
      const float* src[8];
      for (int r = 0; r < 8; ++r) src[r] = kp[std::min<int64_t>(pn * R + r0 + std::min(r, n - 1), bk - 1)];
      for (int64_t d0 = 0; d0 < D; d0 += 8) {
        __m256 r[8];
        for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src[k] + d0);
        transpose8(r);
        for (int k = 0; k < 8; ++k) store_lanes(dst + (d0 + k) * R + r0, r[k], n);
      }
    }
  }
  for (int64_t j = 0; j < bk; ++j) std::memcpy(vt + j * D, vp[j], D * sizeof(float));
  const int64_t lines = (D * sizeof(float) + 63) / 64;
  for (int64_t j = 0; j < nbk; ++j)
    for (int64_t c = 0; c < lines; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(nkp[j]) + 64 * c, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(nvp[j]) + 64 * c, _MM_HINT_T1);
    }
}

// Online-softmax step for 8 query columns of the score tile: the new running max, the correction factor of
// the old one, P = exp2(S - m) in place, and the running sum.
static inline void softmax_columns(Scratch& s, int64_t i0, int64_t bk, int64_t ld) {
  const __m256 m_old = _mm256_load_ps(s.m + i0);
  const __m256 m_new = _mm256_max_ps(m_old, _mm256_load_ps(s.tmax + i0));
  const __m256 corr = exp2_nonpositive(_mm256_sub_ps(m_old, m_new));
  _mm256_store_ps(s.m + i0, m_new);
  _mm256_store_ps(s.corr + i0, corr);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  float* col = s.st + i0;
  int64_t j = 0;
  for (; j + 2 <= bk; j += 2) {
    const __m256 p0 = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(col + j * ld), m_new));
    const __m256 p1 = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(col + (j + 1) * ld), m_new));
    _mm256_store_ps(col + j * ld, p0);
    _mm256_store_ps(col + (j + 1) * ld, p1);
    sum0 = _mm256_add_ps(sum0, p0);
    sum1 = _mm256_add_ps(sum1, p1);
  }
  if (j < bk) {
    const __m256 p0 = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(col + j * ld), m_new));
    _mm256_store_ps(col + j * ld, p0);
    sum0 = _mm256_add_ps(sum0, p0);
  }
  const __m256 l = _mm256_load_ps(s.l + i0);
  _mm256_store_ps(s.l + i0, _mm256_fmadd_ps(l, corr, _mm256_add_ps(sum0, sum1)));
}

static void run_task(const Problem& p, Scratch& s, int64_t task) {
  const int64_t D = p.D, BQ = p.bq, BK = p.bk, ld = s.ld;
  int64_t rest = task;
  const int64_t qt_i = rest % p.nqt;
  rest /= p.nqt;
  const int64_t h = rest % p.H;
  rest /= p.H;
  const int64_t g = rest % p.Qf;
  const int64_t b = rest / p.Qf;
  const int64_t i_first = g * p.tq + qt_i * BQ;  // first query token of the tile
  const int64_t bq = std::min(BQ, p.tq - qt_i * BQ);
  const int64_t bq_pad = ((bq + 15) / 16) * 16;

  // Qt[d][i] = q[i][d] * log2(e) / sqrt(D); padding columns are zero (their scores are 0, never used)
  const float scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(D)));
  for (int64_t i = 0; i < bq; ++i) {
    const float* src = p.q + ((b * p.Sq + i_first + i) * p.H + h) * D;
    for (int64_t d = 0; d < D; ++d) s.qt[d * ld + i] = src[d] * scale;
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = bq; i < bq_pad; ++i) s.qt[d * ld + i] = 0.0f;
  std::fill(s.o, s.o + bq_pad * D, 0.0f);
  std::fill(s.m, s.m + bq_pad, -1e30f);
  std::fill(s.l, s.l + bq_pad, 0.0f);

  constexpr int R = QK_ROWS;
  const int64_t nk = gather_keys(p, b, g, h, s.kp.data(), s.vp.data());
  for (int64_t j0 = 0; j0 < nk; j0 += BK) {
    const int64_t bk = std::min(BK, nk - j0);
    const int64_t nbk = std::min(BK, std::max<int64_t>(nk - j0 - bk, 0));
    pack_tile(s.kp.data() + j0, s.vp.data() + j0, bk, D, s.kpan, s.vt, s.kp.data() + j0 + bk,
              s.vp.data() + j0 + bk, nbk);
    const int64_t panels = (bk + R - 1) / R;
    std::fill(s.tmax, s.tmax + bq_pad, -1e30f);
    for (int64_t i0 = 0; i0 < bq_pad; i0 += 16) {  // a strip of 16 queries: scores, then P while in L1
      for (int64_t pn = 0; pn < panels; ++pn)
        qk_block<R, 2>(s.kpan + pn * D * R, s.qt + i0, D, ld, s.st + pn * R * ld + i0, s.tmax + i0);
      for (int64_t i1 = i0; i1 < i0 + 16; i1 += 8) softmax_columns(s, i1, bk, ld);
    }
    for (int64_t r0 = 0; r0 < bq; r0 += PV_ROWS) {  // O = O * corr + P.V, every query row of the tile
      const int rows = static_cast<int>(std::min<int64_t>(PV_ROWS, bq - r0));
      pv_rows<PV_ROWS>(rows, s.vt, s.st + r0, ld, bk, s.corr + r0, s.o + r0 * D, D);
    }
  }
  for (int64_t i = 0; i < bq; ++i) {
    float* dst = p.out + ((b * p.Sq + i_first + i) * p.H + h) * D;
    const float inv = s.l[i] > 0.0f ? 1.0f / s.l[i] : 0.0f;  // no key at all -> zeros
    const float* src = s.o + i * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * inv;
  }
}

// Takes tasks until none is left. A worker that starts after the last task was taken allocates nothing and
// touches no buffer (it may run after the custom call has returned).
void run_range(const Problem& p, std::atomic<int64_t>& next, std::atomic<int64_t>& done) {
  int64_t task = next.fetch_add(1, std::memory_order_relaxed);
  if (task >= p.tasks) return;
  Scratch s(p);
  for (; task < p.tasks; task = next.fetch_add(1, std::memory_order_relaxed)) {
    run_task(p, s, task);
    if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == p.tasks) done.notify_all();
  }
}

}  // namespace fkv
