// moefuse's CPU kernels for one MoE layer. `moefuse.kernels.cpu` prepends the layer's constants (HID, INTER,
// UPROWS, NV, OFF0/STEP0/OFF1/STEP1, MF_BF16) and its activation (`mf_act`, `mf_act_grad`), printed from the
// spec's sympy expression, then compiles this file the way Inductor compiles its CPU kernels (its compiler,
// -O3 -march=native, OpenMP from torch's runtime).
//
// Forward, one OpenMP region (see `mf_forward`):
//   1. routing: stable counting sort of the pairs p by expert (ids outside [0, E) belong to no expert), and
//      of the kept pairs by token (the combine's order);
//   2. up-projection + activation: work items (expert, 16·G activation columns); the rows are x[token(p)]
//      read in place (the gather is fused into the GEMM's loads), gate and up rows of each column are
//      computed side by side, and the epilogue adds b1, stores H when training and applies the activation;
//   3. down-projection: work items (expert, 32 hidden columns) over the expert's rows of A; the epilogue adds
//      b2 and writes each row at its pair's position, in fp32;
//   4. combine: y[t] = Σ over t's pairs, in pair order, of w[p] · Y[p], in fp32, no atomics.
// Work items are scheduled dynamically over the threads; every output element is computed by one item in a
// fixed order, so results are bitwise reproducible whatever the thread count or schedule.
//
// Two GEMM forms, both reading the weights where they are ([E, out, in] rows, unit stride along `in`):
//   - few rows (an expert with ≤ DOT_ROWS rows, decode): dot products along `in`, 4 rows × 4 weight rows per
//     register tile, so each weight byte is streamed from memory once and never copied;
//   - many rows: the item's weight rows are packed once into a thread-local panel ([in][cols], bf16 as
//     pairs for vdpbf16ps), then an MR × (16·NVEC) register tile broadcasts x and streams the panel.
// bf16 multiplies with AVX512-BF16's vdpbf16ps where the machine has it, else widens to fp32; accumulation
// is fp32 everywhere. Without AVX-512 the same code runs on GCC vector types.
//
// Backward (`mf_backward`), SonicMoE's: from x, H and the routing only. Per expert e, with s the pair weight:
//   dA' = dy[tok]·W2_e, dS = ⟨dA', A⟩ (+ ⟨dy, b2_e⟩), dH = s·dA' ⊙ act'(H)        (items: expert, row block)
//   dW2_e = dyᵀ·(s·A), dW1_e = dHᵀ·x[tok], db1_e = Σ dH, db2_e = Σ s·dy       (items: expert, column block)
//   dx[t] = Σ over t's pairs of dH·W1_e                                        (items: expert, row block, then
//                                                                               a per-token sum in pair order)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(MOEFUSE_PORTABLE)  // masked 16-bit loads need BW+VL, 256-bit extracts DQ
#include <immintrin.h>
#define MF_AVX512 1
#if defined(__AVX512BF16__)
#define MF_BF16DOT 1
#endif
#endif
#ifndef MF_AVX512
#define MF_AVX512 0
#endif
#ifndef MF_BF16DOT
#define MF_BF16DOT 0
#endif

// ---- Scalar math the printed activation calls, written so that GCC vectorizes the epilogue's loop over 16
// columns (libm's expf/tanhf are calls per element). NaN in, NaN out, like torch.
static inline float mf_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// exp(x) = 2^n · e^r with n = rint(x·log2 e) and r = x − n·ln 2 in two parts (Cody–Waite), |r| ≤ ln2/2; e^r by
// its Taylor polynomial to degree 7 (truncation < 6e-9 relative); 2^n as two exact powers of two, so that
// n in [−150, 128] overflows to inf and underflows to 0 like expf. Error ≈ 1 ulp.
static inline float mf_exp(float x) {
  float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  float n = __builtin_rintf(xc * 1.44269504088896341f);
  float r = __builtin_fmaf(n, -0.693359375f, xc);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.0f / 5040.0f;
  p = __builtin_fmaf(p, r, 1.0f / 720.0f);
  p = __builtin_fmaf(p, r, 1.0f / 120.0f);
  p = __builtin_fmaf(p, r, 1.0f / 24.0f);
  p = __builtin_fmaf(p, r, 1.0f / 6.0f);
  p = __builtin_fmaf(p, r, 0.5f);
  p = __builtin_fmaf(p, r, 1.0f);
  p = __builtin_fmaf(p, r, 1.0f);
  int32_t ni = (int32_t)n, n1 = ni >> 1, n2 = ni - n1;
  float out = p * mf_bits((uint32_t)(n1 + 127) << 23) * mf_bits((uint32_t)(n2 + 127) << 23);
  return x != x ? x : out;
}
// exp(x) − 1 without cancellation: Taylor to degree 9 for |x| < 0.5 (truncation < 3e-10 relative), else
// mf_exp(x) − 1, which loses nothing there.
static inline float mf_expm1(float x) {
  float p = 1.0f / 362880.0f;
  p = __builtin_fmaf(p, x, 1.0f / 40320.0f);
  p = __builtin_fmaf(p, x, 1.0f / 5040.0f);
  p = __builtin_fmaf(p, x, 1.0f / 720.0f);
  p = __builtin_fmaf(p, x, 1.0f / 120.0f);
  p = __builtin_fmaf(p, x, 1.0f / 24.0f);
  p = __builtin_fmaf(p, x, 1.0f / 6.0f);
  p = __builtin_fmaf(p, x, 0.5f);
  float small = __builtin_fmaf(p * x, x, x);
  float big = mf_exp(x) - 1.0f;
  return (x < 0.5f && x > -0.5f) ? small : big;
}
static inline float mf_sigmoid(float x) { return 1.0f / (1.0f + mf_exp(-x)); }  // saturates to 0 and 1
// tanh = e / (e + 2) with e = expm1(2x), |x| capped at 10 where tanh rounds to ±1 (e never reaches inf).
static inline float mf_tanh(float x) {
  float c = x < -10.0f ? -10.0f : (x > 10.0f ? 10.0f : x);
  float e = mf_expm1(2.0f * c);
  return e / (e + 2.0f);
}
static inline float mf_max(float a, float b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }
static inline float mf_min(float a, float b) { return (a != a || b != b) ? a + b : (a < b ? a : b); }
static inline float mf_sign(float x) { return x < 0.0f ? -1.0f : (x > 0.0f ? 1.0f : x); }
static inline float mf_heaviside(float x, float h0) { return x > 0.0f ? 1.0f : (x < 0.0f ? 0.0f : h0); }
static inline float mf_log(float x) { return std::log(x); }      // libm, per element: rare in MoE activations
static inline float mf_log1p(float x) { return std::log1p(x); }
static inline float mf_erf(float x) { return std::erf(x); }
static inline float mf_pow(float b, float e) { return std::pow(b, e); }

// @LAYER@

typedef uint16_t bf16;
#if MF_BF16
typedef bf16 elem;
#else
typedef float elem;
#endif

static constexpr int MR = 12;
#ifndef DOT_R
#define DOT_R 6  // rows of the dot form's register tile (× 4 weight rows; 6 measured 5 % faster than 4 at T=64)
#endif       // rows of the packed form's register tile
static constexpr int64_t LMAX = (HID > UPROWS ? HID : UPROWS) + 64;

static inline float to_f(float v) { return v; }
static inline float to_f(bf16 v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void put(float* p, float v) { *p = v; }
static inline void put(bf16* p, float v) {  // round to nearest even; NaN stays a (quiet) NaN. Branch-free, so
  uint32_t u;                                 // that loops of it vectorize
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  *p = (bf16)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded);
}
// dst[i] = src[i] for i < n, rounded to the element type.
template <typename T> static inline void put_n(T* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) put(dst + i, src[i]);
}

// ---- 16 fp32 lanes ------------------------------------------------------------------------------------
#if MF_AVX512
typedef __m512 vf;
static inline vf v_zero() { return _mm512_setzero_ps(); }
static inline vf v_set1(float a) { return _mm512_set1_ps(a); }
static inline vf v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline vf v_load(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void v_store(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(vf v) { return _mm512_reduce_add_ps(v); }
#else
typedef float vf __attribute__((vector_size(64)));
static inline vf v_zero() { vf v = {}; return v; }
static inline vf v_set1(float a) { vf v = {}; return v + a; }
template <typename T> static inline vf v_load(const T* p) {
  vf v;
  for (int i = 0; i < 16; ++i) v[i] = to_f(p[i]);
  return v;
}
static inline void v_store(float* p, vf v) { std::memcpy(p, &v, 64); }
static inline vf v_fma(vf a, vf b, vf c) { return a * b + c; }
static inline float v_sum(vf v) {  // the same pairwise tree as the AVX-512 reduction
  float s[16];
  std::memcpy(s, &v, 64);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}
#endif

// The first n (≤ 16) lanes from p, the rest 0, never reading past p[n-1].
#if MF_AVX512
static inline vf v_loadn(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }
static inline vf v_loadn(const bf16* p, int n) {
  __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), (const void*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#else
template <typename T> static inline vf v_loadn(const T* p, int n) {
  vf v = {};
  for (int i = 0; i < n; ++i) v[i] = to_f(p[i]);
  return v;
}
#endif

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A row of zeros that padded tile rows / columns read (never written).
alignas(64) static const elem ZERO_ROW[LMAX] = {};

// ---- Dot-product form: out[r][w] = Σ_k a[r][k] · b[w][k] ---------------------------------------------------
// One step of DOT_STEP elements: fp32 FMAs, or vdpbf16ps on bf16 pairs (32 elements per step).
#if MF_BF16 && MF_BF16DOT
static constexpr int64_t DOT_STEP = 32;
typedef __m512i vin;
static inline vin in_load(const elem* p) { return _mm512_loadu_si512((const void*)p); }
static inline vf dot_step(vf acc, vin a, vin b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
#else
static constexpr int64_t DOT_STEP = 16;
typedef vf vin;
static inline vin in_load(const elem* p) { return v_load(p); }
static inline vf dot_step(vf acc, vin a, vin b) { return v_fma(a, b, acc); }
#endif

static inline void dot_tail(const elem* const* a, int R, const elem* const* b, int W, int64_t k, int64_t L, float* out,
                            int64_t ldo) {
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w)
      for (int64_t kk = k; kk < L; ++kk) out[r * ldo + w] += to_f(a[r][kk]) * to_f(b[w][kk]);
}

// R rows × W weight rows at once. pf: W rows to prefetch at the same offsets (the next tile's weight rows: each
// row is a new 4 KiB page for the hardware prefetchers, which stop at page boundaries), or null.
template <int R, int W>
static inline void dot_tile(const elem* const* a, const elem* const* b, int64_t L, float* out, int64_t ldo,
                            const elem* const* pf) {
  vf acc[R][W];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) acc[r][w] = v_zero();
  int64_t k = 0;
  for (; k + DOT_STEP <= L; k += DOT_STEP) {
#if MF_AVX512
    if (pf)
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) _mm_prefetch((const char*)(pf[w] + k), _MM_HINT_T0);
#endif
    vin bv[W];
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) bv[w] = in_load(b[w] + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vin av = in_load(a[r] + k);
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[r][w] = dot_step(acc[r][w], av, bv[w]);
    }
  }
  for (int r = 0; r < R; ++r) {
#if MF_AVX512
    if (W == 4) {  // the four sums of a row at once: lanes paired within 128-bit blocks, then blocks added
      __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[r][0], acc[r][1 % W]), _mm512_unpackhi_ps(acc[r][0], acc[r][1 % W]));
      __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[r][2 % W], acc[r][3 % W]), _mm512_unpackhi_ps(acc[r][2 % W], acc[r][3 % W]));
      __m512 q = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
      __m256 hq = _mm256_add_ps(_mm512_castps512_ps256(q), _mm512_extractf32x8_ps(q, 1));
      _mm_storeu_ps(out + r * ldo, _mm_add_ps(_mm256_castps256_ps128(hq), _mm256_extractf128_ps(hq, 1)));
    } else
#endif
      for (int w = 0; w < W; ++w) out[r * ldo + w] = v_sum(acc[r][w]);
  }
  dot_tail(a, R, b, W, k, L, out, ldo);
}

// prefetch: the weights come from memory (the first row group), so fetch each next tile's rows meanwhile.
template <int R>
static inline void dot_rows(const elem* const* a, const elem* const* b, int64_t nb, int64_t L, float* out, int64_t ldo,
                            bool prefetch) {
  int64_t w = 0;
  for (; w + 4 <= nb; w += 4) dot_tile<R, 4>(a, b + w, L, out + w, ldo, prefetch && w + 8 <= nb ? b + w + 4 : nullptr);
  for (; w < nb; ++w) dot_tile<R, 1>(a, b + w, L, out + w, ldo, nullptr);
}

// out[r][w] for r < rows, w < nb: DOT_R rows at a time, each tile streaming its weight rows.
static void dot_block(const elem* const* a, int64_t rows, const elem* const* b, int64_t nb, int64_t L, float* out,
                      int64_t ldo) {
  for (int64_t r = 0; r < rows; r += DOT_R) {
    switch (std::min<int64_t>(DOT_R, rows - r)) {
#define MF_CASE(R) case R: dot_rows<R>(a + r, b, nb, L, out + r * ldo, ldo, r == 0); break;
#if DOT_R >= 6
      MF_CASE(6) MF_CASE(5)
#endif
      MF_CASE(4) MF_CASE(3) MF_CASE(2) MF_CASE(1)
#undef MF_CASE
      default: break;
    }
  }
}

// ---- Packed form -------------------------------------------------------------------------------------------
// The panel of NC = 16·NVEC weight columns, column c's element k at b[c][k·ks] (ks = 1: rows of an [out, in]
// weight; ks > 1: columns of an [in, out] one): fp32 [L][NC], or with vdpbf16ps bf16 pairs [ceil(L/2)][NC][2]
// (the odd tail's partner is 0).
#if MF_BF16 && MF_BF16DOT
typedef bf16 pelem;
static inline int64_t panel_elems(int64_t L, int64_t NC) { return cdiv(L, 2) * NC * 2; }
static inline int64_t panel_at(int64_t k, int64_t c, int64_t NC) { return ((k >> 1) * NC + c) * 2 + (k & 1); }
static inline pelem pval(elem v) { return v; }
#else
typedef float pelem;
static inline int64_t panel_elems(int64_t L, int64_t NC) { return L * NC; }
static inline int64_t panel_at(int64_t k, int64_t c, int64_t NC) { return k * NC + c; }
static inline pelem pval(elem v) { return to_f(v); }
#endif
static void pack(const elem* const* b, int64_t ks, int64_t NC, int64_t L, pelem* panel) {
  if (ks == 1) {  // each column is contiguous: read it in order
    for (int64_t c = 0; c < NC; ++c)
      for (int64_t k = 0; k < L; ++k) panel[panel_at(k, c, NC)] = pval(b[c][k]);
  } else {  // neighbouring columns are neighbours in memory: read across them
    for (int64_t k = 0; k < L; ++k)
      for (int64_t c = 0; c < NC; ++c) panel[panel_at(k, c, NC)] = b[c] == ZERO_ROW ? pval(0) : pval(b[c][k * ks]);
  }
  if (panel_elems(L, NC) > L * NC)
    for (int64_t c = 0; c < NC; ++c) panel[panel_at(L, c, NC)] = 0;
}

// out[m][16·v + i] = Σ_k a[m][k] · b[16·v + i][k] for m < M (rows past the real ones read ZERO_ROW).
template <int M, int NVEC>
static inline void panel_tile(const elem* const* a, const pelem* panel, int64_t L, float* out, int64_t ldo) {
  constexpr int64_t NC = 16 * NVEC;
  vf acc[M][NVEC];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
    for (int v = 0; v < NVEC; ++v) acc[m][v] = v_zero();
#if MF_BF16 && MF_BF16DOT
  for (int64_t k = 0; k < L; k += 2) {
    const pelem* bk = panel + (k >> 1) * NC * 2;
    __m512i bv[NVEC];
#pragma GCC unroll 16
    for (int v = 0; v < NVEC; ++v) bv[v] = _mm512_loadu_si512((const void*)(bk + 32 * v));
    if (k + 1 < L) {
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        int32_t pr;  // (a[k], a[k+1]) as one 32-bit lane, broadcast from memory
        std::memcpy(&pr, a[m] + k, 4);
        __m512i am = _mm512_set1_epi32(pr);
#pragma GCC unroll 16
        for (int v = 0; v < NVEC; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)am, (__m512bh)bv[v]);
      }
    } else {  // odd L: (a[k], 0) against the panel's (b[k], 0)
      for (int m = 0; m < M; ++m) {
        __m512i am = _mm512_set1_epi32((int32_t)(uint32_t)a[m][k]);
        for (int v = 0; v < NVEC; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)am, (__m512bh)bv[v]);
      }
    }
  }
#else
  for (int64_t k = 0; k < L; ++k) {
    const pelem* bk = panel + k * NC;
    vf bv[NVEC];
#pragma GCC unroll 16
    for (int v = 0; v < NVEC; ++v) bv[v] = v_load(bk + 16 * v);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      vf am = v_set1(to_f(a[m][k]));
#pragma GCC unroll 16
      for (int v = 0; v < NVEC; ++v) acc[m][v] = v_fma(am, bv[v], acc[m][v]);
    }
  }
#endif
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NVEC; ++v) v_store(out + m * ldo + 16 * v, acc[m][v]);
}

// A thread's panel, grown on demand and kept (no allocation per call once warm).
static pelem* thread_panel(int64_t elems) {
  static thread_local std::unique_ptr<pelem, void (*)(void*)> buf(nullptr, std::free);
  static thread_local int64_t have = 0;
  if (have < elems) {
    buf.reset((pelem*)std::aligned_alloc(64, (size_t)cdiv(elems * (int64_t)sizeof(pelem), 64) * 64));
    have = elems;
  }
  return buf.get();
}

// out[r][c] = Σ_k a[r][k] · b[c][k·ks] for r < rows, c < NC = 16·NVEC (b[c] may be ZERO_ROW): the layer's one
// GEMM entry point, choosing the form by the row count and the weight's layout. `out` has
// ≥ rows rounded up to MR rows of stride ldo.
template <int NVEC>
static void gemm_rows(const elem* const* a, int64_t rows, const elem* const* b, int64_t ks, int64_t L, float* out,
                      int64_t ldo) {
  constexpr int64_t NC = 16 * NVEC;
  if (ks == 1 && (rows <= DOT_ROWS || MF_BF16DOT)) {  // vdpbf16ps: the dot form beats packing at any row count
    dot_block(a, rows, b, NC, L, out, ldo);
    return;
  }
  pelem* panel = thread_panel(panel_elems(L, NC) + 2 * NC);
  pack(b, ks, NC, L, panel);
  const elem* tile[MR];
  if (rows <= 4) {
    for (int m = 0; m < 4; ++m) tile[m] = m < rows ? a[m] : ZERO_ROW;
    panel_tile<4, NVEC>(tile, panel, L, out, ldo);
    return;
  }
  for (int64_t m0 = 0; m0 < rows; m0 += MR) {
    for (int m = 0; m < MR; ++m) tile[m] = m0 + m < rows ? a[m0 + m] : ZERO_ROW;
    panel_tile<MR, NVEC>(tile, panel, L, out + m0 * ldo, ldo);
  }
}

// ---- Broadcast form over row pointers (the backward's GEMMs) ------------------------------------------------
// out[m][16·v + i] (+)= Σ_k A(m, k) · brow[k][col + 16·v + i] for m < M, with A(m, k) = a[k][m] (TA: one pointer
// per k, as for dWᵀ = Σ_rows) or a[m][k] (one pointer per row). A is fp32 (the backward keeps dy, dH and s·A in
// fp32), broadcast from memory; B is fp32 or bf16 (widened). Vector v reads lanes[v] ≤ 16 columns (masked
// loads: nothing past a row's end is read).
template <int M, int NVEC, bool TA, typename BT>
static inline void bcast_tile(const float* const* a, int64_t acol, const BT* const* brow, int64_t col, int64_t L,
                              const int* lanes, float* out, int64_t ldo, bool accumulate) {
  vf acc[M][NVEC];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
    for (int v = 0; v < NVEC; ++v) acc[m][v] = accumulate ? v_load(out + m * ldo + 16 * v) : v_zero();
  for (int64_t k = 0; k < L; ++k) {
    vf bv[NVEC];
#pragma GCC unroll 16
    for (int v = 0; v < NVEC; ++v) bv[v] = v_loadn(brow[k] + col + 16 * v, lanes[v]);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      vf am = v_set1(TA ? a[k][acol + m] : a[m][k]);
#pragma GCC unroll 16
      for (int v = 0; v < NVEC; ++v) acc[m][v] = v_fma(am, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NVEC; ++v) v_store(out + m * ldo + 16 * v, acc[m][v]);
}

// The broadcast form's register tile: BM rows × 16·BNV columns (24 accumulators; per k, BM broadcasts and BNV
// loads feed BM·BNV FMAs).
static constexpr int BM = 6, BNV = 4;

// out[m][c] (+)= Σ_k A(m, k) · brow[k][c] for m < rows ≤ BM, c < cols: 16·BNV-column tiles, out of stride ldo
// (TA: A(m, k) = a[k][acol + m]).
template <bool TA, typename BT>
static void bcast_rows(const float* const* a, int64_t acol, int64_t rows, const BT* const* brow, int64_t L, int64_t cols,
                       float* out, int64_t ldo, bool accumulate) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16 * BNV) {
    int lanes[BNV];
    for (int v = 0; v < BNV; ++v) lanes[v] = (int)std::max<int64_t>(0, std::min<int64_t>(16, cols - c0 - 16 * v));
    float* o = out + c0;
    switch (rows) {
#define MF_CASE(R) case R: bcast_tile<R, BNV, TA, BT>(a, acol, brow, c0, L, lanes, o, ldo, accumulate); break;
      MF_CASE(6) MF_CASE(5) MF_CASE(4) MF_CASE(3) MF_CASE(2) MF_CASE(1)
#undef MF_CASE
      default: break;
    }
  }
}

// ---- Routing -------------------------------------------------------------------------------------------------
struct Routing {
  int64_t S, T, E, K;           // K = 0: flat pairs with an explicit token per pair
  const int64_t* ids;           // [S] expert of each pair
  const int64_t* pair_token;    // [S] or null (token = p / K)
  int32_t* order;               // [S] pairs sorted stably by expert, dropped pairs last
  int64_t* offsets;             // [E + 1] first row of each expert in `order`
  int32_t* tok_offsets;         // [T + 1] kept pairs of each token in `tok_pairs`
  int32_t* tok_pairs;           // [S] kept pairs sorted stably by token

  inline bool kept(int64_t p) const { return ids[p] >= 0 && ids[p] < E; }
  inline int64_t token(int64_t p) const { return pair_token ? pair_token[p] : p / K; }

  void build() {
    std::vector<int64_t> cnt(E + 1, 0);
    for (int64_t p = 0; p < S; ++p) ++cnt[kept(p) ? ids[p] : E];
    offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + cnt[e];
    std::vector<int64_t> next(offsets, offsets + E + 1);
    for (int64_t p = 0; p < S; ++p) {
      int64_t e = kept(p) ? ids[p] : E;
      int64_t r = next[e]++;
      order[r] = (int32_t)p;
    }
    for (int64_t t = 0; t <= T; ++t) tok_offsets[t] = 0;
    for (int64_t p = 0; p < S; ++p)
      if (kept(p)) ++tok_offsets[token(p) + 1];
    for (int64_t t = 0; t < T; ++t) tok_offsets[t + 1] += tok_offsets[t];
    std::vector<int32_t> fill(tok_offsets, tok_offsets + T);
    for (int64_t p = 0; p < S; ++p)
      if (kept(p)) tok_pairs[fill[token(p)]++] = (int32_t)p;
  }
};

struct Weights {  // [E, rows, L] with strides (e, r, k), the same k stride for both (w3: rows ≥ split from `second`)
  const elem* first;
  int64_t first_e, first_r;
  const elem* second;
  int64_t second_e, second_r, split, ks;
  inline const elem* row(int64_t e, int64_t q) const {
    return (second && q >= split) ? second + e * second_e + (q - split) * second_r : first + e * first_e + q * first_r;
  }
};

static inline int64_t var_row(int j, int64_t n) { return j == 0 ? OFF0 + STEP0 * n : OFF1 + STEP1 * n; }

// Work items (expert, column block) of experts with rows.
static std::vector<int64_t> items(const Routing& rt, int64_t blocks) {
  std::vector<int64_t> out;
  for (int64_t e = 0; e < rt.E; ++e)
    if (rt.offsets[e + 1] > rt.offsets[e])
      for (int64_t b = 0; b < blocks; ++b) out.push_back(e * blocks + b);
  return out;
}

// Columns of one up-projection item: G groups of 16 activation columns, NV variables each.
static constexpr int UP_G = NV == 1 ? 2 : 1;
static constexpr int UP_NVEC = UP_G * NV;
static constexpr int64_t UP_COLS = 16 * UP_G;

static void up_item(const Routing& rt, int64_t e, int64_t n0, const elem* x, const Weights& w1, const float* b1,
                    elem* h, elem* A, float* scratch) {
  const int64_t r0 = rt.offsets[e], rows = rt.offsets[e + 1] - r0;
  const elem* wrow[16 * UP_NVEC];
  for (int v = 0; v < UP_NVEC; ++v)
    for (int i = 0; i < 16; ++i) {
      int64_t n = n0 + (v / NV) * 16 + i;
      wrow[v * 16 + i] = n < INTER ? w1.row(e, var_row(v % NV, n)) : ZERO_ROW;
    }
  constexpr int64_t ld = 16 * UP_NVEC;
  for (int64_t c0 = 0; c0 < rows; c0 += 256) {  // row chunks bound the scratch ([256][ld] floats)
    int64_t cr = std::min<int64_t>(256, rows - c0);
    const elem* xr[256];
    for (int64_t r = 0; r < cr; ++r) xr[r] = x + rt.token(rt.order[r0 + c0 + r]) * HID;
    gemm_rows<UP_NVEC>(xr, cr, wrow, w1.ks, HID, scratch, ld);
    for (int64_t r = 0; r < cr; ++r) {
      const int64_t row = r0 + c0 + r;
      float* pre = scratch + r * ld;
      for (int g = 0; g < UP_G; ++g) {
        float* v0 = pre + (g * NV) * 16;
        float* v1 = pre + (g * NV + (NV - 1)) * 16;
        const int64_t nb = n0 + g * 16;
        // 16 columns, or the tail; the body is inlined twice so that the full case has constant trip counts
        auto epilogue = [&](const int lanes) {
          for (int j = 0; j < NV; ++j) {
            float* vj = pre + (g * NV + j) * 16;
            if (b1)
              for (int i = 0; i < lanes; ++i) vj[i] += b1[e * UPROWS + var_row(j, nb + i)];
            if (h)
              for (int i = 0; i < lanes; ++i) put(h + row * UPROWS + var_row(j, nb + i), vj[i]);
          }
          float a[16];
#pragma omp simd
          for (int i = 0; i < 16; ++i) a[i] = mf_act(v0[i], v1[i]);
          put_n(A + row * INTER + nb, a, lanes);
        };
        if (nb + 16 <= INTER)
          epilogue(16);
        else if (nb < INTER)
          epilogue((int)(INTER - nb));
      }
    }
  }
}

static constexpr int64_t DN_COLS = 32;

static void down_item(const Routing& rt, int64_t e, int64_t j0, const elem* A, const Weights& w2, const float* b2,
                      float* ypair, float* scratch) {
  const int64_t r0 = rt.offsets[e], rows = rt.offsets[e + 1] - r0;
  const elem* wrow[DN_COLS];
  for (int i = 0; i < DN_COLS; ++i) wrow[i] = j0 + i < HID ? w2.row(e, j0 + i) : ZERO_ROW;
  const int lanes = (int)std::min<int64_t>(DN_COLS, HID - j0);
  for (int64_t c0 = 0; c0 < rows; c0 += 256) {
    int64_t cr = std::min<int64_t>(256, rows - c0);
    const elem* ar[256];
    for (int64_t r = 0; r < cr; ++r) ar[r] = A + (r0 + c0 + r) * INTER;
    gemm_rows<DN_COLS / 16>(ar, cr, wrow, w2.ks, INTER, scratch, DN_COLS);
    for (int64_t r = 0; r < cr; ++r) {
      float* y = ypair + (int64_t)rt.order[r0 + c0 + r] * HID + j0;
      const float* acc = scratch + r * DN_COLS;
      for (int i = 0; i < lanes; ++i) y[i] = acc[i] + (b2 ? b2[e * HID + j0 + i] : 0.0f);
    }
  }
}

// ---- Workspace ---------------------------------------------------------------------------------------------
struct Workspace {
  int32_t *order, *tok_offsets, *tok_pairs;
  int64_t* offsets;
  elem* A;       // forward: A
  float* ypair;  // forward: Y in pair order; backward: dx per pair
  float *sA, *dH;  // backward: s·A and dH, fp32
};

static inline int64_t align64(int64_t b) { return cdiv(b, 64) * 64; }

static int64_t carve(char* base, int64_t T, int64_t S, int64_t E, bool backward, Workspace* ws) {
  int64_t off = 0;
  auto take = [&](int64_t bytes) { char* p = base ? base + off : nullptr; off += align64(bytes); return p; };
  Workspace w;
  w.order = (int32_t*)take(S * 4);
  w.tok_offsets = (int32_t*)take((T + 1) * 4);
  w.tok_pairs = (int32_t*)take(S * 4);
  w.offsets = (int64_t*)take((E + 1) * 8);
  w.A = backward ? nullptr : (elem*)take(S * INTER * (int64_t)sizeof(elem));
  w.ypair = (float*)take(S * HID * 4);
  w.sA = backward ? (float*)take(S * INTER * 4) : nullptr;
  w.dH = backward ? (float*)take(S * UPROWS * 4) : nullptr;
  if (ws) *ws = w;
  return off;
}

extern "C" {

// Bytes of workspace `mf_forward` (backward = 0) or `mf_backward` needs for T tokens, S pairs, E experts.
int64_t mf_workspace_bytes(int64_t T, int64_t S, int64_t E, int64_t backward) {
  return carve(nullptr, T, S, E, backward != 0, nullptr);
}

// What this build runs: 1 = AVX-512, 2 = AVX-512 with vdpbf16ps, 0 = portable vector code.
int64_t mf_isa() { return MF_AVX512 ? (MF_BF16DOT ? 2 : 1) : 0; }

// The printed activation and its partial derivatives at n points (fp32 arrays), for the tests of the printer
// and of the mf_* helpers.
int64_t mf_eval_act(int64_t n, const float* x0, const float* x1, float* a, float* d0, float* d1) {
  for (int64_t i = 0; i < n; ++i) {
    a[i] = mf_act(x0[i], x1[i]);
    mf_act_grad(x0[i], x1[i], d0 + i, d1 + i);
  }
  return n;
}

// y[T, HID] (fp32 if out_f32, else elem). Returns the number of kept pairs; h rows past them are zeroed.
int64_t mf_forward(int64_t T, int64_t S, int64_t E, int64_t K, const elem* x, const int64_t* ids,
                   const int64_t* pair_token, const float* pw, const elem* w1, int64_t w1_e, int64_t w1_r,
                   int64_t w1_k, const elem* w3, int64_t w3_e, int64_t w3_r, int64_t w3_split, const elem* w2,
                   int64_t w2_e, int64_t w2_r, int64_t w2_k, const float* b1, const float* b2, void* y, int64_t out_f32, elem* h, char* ws_base,
                   int64_t threads) {
  Workspace ws;
  carve(ws_base, T, S, E, false, &ws);
  Routing rt{S, T, E, K, ids, pair_token, ws.order, ws.offsets, ws.tok_offsets, ws.tok_pairs};
  rt.build();
  const int64_t kept = rt.offsets[E];
  Weights W1{w1, w1_e, w1_r, w3, w3_e, w3_r, w3_split, w1_k};
  Weights W2{w2, w2_e, w2_r, nullptr, 0, 0, 0, w2_k};
  const std::vector<int64_t> up = items(rt, cdiv(INTER, UP_COLS));
  const std::vector<int64_t> down = items(rt, cdiv(HID, DN_COLS));
  const int64_t up_blocks = cdiv(INTER, UP_COLS), dn_blocks = cdiv(HID, DN_COLS);
  std::vector<int64_t> unread;  // up-projection rows no variable reads (never computed)
  if (h) {
    std::vector<char> read(UPROWS, 0);
    for (int j = 0; j < NV; ++j)
      for (int64_t n = 0; n < INTER; ++n) read[var_row(j, n)] = 1;
    for (int64_t q = 0; q < UPROWS; ++q)
      if (!read[q]) unread.push_back(q);
  }
#pragma omp parallel num_threads((int)threads)
  {
    std::vector<float> scratch(256 * 64 + MR * 64);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)up.size(); ++i)
      up_item(rt, up[i] / up_blocks, (up[i] % up_blocks) * UP_COLS, x, W1, b1, h, ws.A, scratch.data());
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)down.size(); ++i)
      down_item(rt, down[i] / dn_blocks, (down[i] % dn_blocks) * DN_COLS, ws.A, W2, b2, ws.ypair, scratch.data());
    if (h) {  // rows of dropped pairs, and up-projection rows the activation never reads, are 0 in H
#pragma omp for schedule(static)
      for (int64_t r = 0; r < S; ++r) {
        if (r >= kept)
          std::memset(h + r * UPROWS, 0, UPROWS * sizeof(elem));
        else
          for (int64_t q : unread) put(h + r * UPROWS + q, 0.0f);
      }
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float acc[HID];
      for (int64_t j = 0; j < HID; ++j) acc[j] = 0.0f;
      for (int32_t q = ws.tok_offsets[t]; q < ws.tok_offsets[t + 1]; ++q) {
        const int32_t p = ws.tok_pairs[q];
        const float s = pw[p];
        const float* yp = ws.ypair + (int64_t)p * HID;
#pragma omp simd
        for (int64_t j = 0; j < HID; ++j) acc[j] += s * yp[j];
      }
      if (out_f32)
        std::memcpy((float*)y + t * HID, acc, HID * 4);
      else
        put_n((elem*)y + t * HID, acc, HID);
    }
  }
  return kept;
}

// Gradients of mf_forward (file header). dy and x are fp32 [T, HID] (x upcast once: it is read per expert row);
// h and the weights are elem; h is the forward's (expert-sorted
// rows); dw1 [E, rows of w1, HID], dw3 (with w3), dw2 [E, HID, INTER] contiguous elem; dpw [S], db1 [E, UPROWS],
// db2 [E, HID] fp32 (db1/db2 may be null). Weights must have unit stride along `in` (w*_k == 1).
int64_t mf_backward(int64_t T, int64_t S, int64_t E, int64_t K, const float* dy, const float* x, const int64_t* ids,
                    const int64_t* pair_token, const float* pw, const elem* w1, int64_t w1_e, int64_t w1_r,
                    int64_t w1_k, const elem* w3, int64_t w3_e, int64_t w3_r, int64_t w3_split, const elem* w2,
                    int64_t w2_e, int64_t w2_r, int64_t w2_k, const float* b2, const elem* h, elem* dx, float* dpw,
                    elem* dw1, elem* dw3, elem* dw2, float* db1, float* db2, char* ws_base, int64_t threads) {
  if (w1_k != 1 || w2_k != 1) return -1;
  Workspace ws;
  carve(ws_base, T, S, E, true, &ws);
  Routing rt{S, T, E, K, ids, pair_token, ws.order, ws.offsets, ws.tok_offsets, ws.tok_pairs};
  rt.build();
  const int64_t kept = rt.offsets[E];
  Weights W1{w1, w1_e, w1_r, w3, w3_e, w3_r, w3_split, 1};
  const int64_t split = w3 ? w3_split : UPROWS;
  // Phase 1 items: (expert, block of BM rows). Phase 2: (expert, block of BM output rows of dW2 then of dW1).
  // Phase 3: (expert, block of BM rows) for dx per pair.
  std::vector<int64_t> rowblocks;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = rt.offsets[e]; r < rt.offsets[e + 1]; r += BM) rowblocks.push_back(e << 32 | (r - rt.offsets[e]));
  constexpr int64_t P2 = 5 * BM;  // output rows of a phase-2 item
  const int64_t nb2 = cdiv(HID, P2), nb1 = cdiv(UPROWS, P2);
  for (int64_t p = 0; p < S; ++p)
    if (!rt.kept(p)) dpw[p] = 0.0f;
#pragma omp parallel num_threads((int)threads)
  {
    // Tiles are 16·BNV columns wide: rows of `tile` are padded to that (ld*), so a tile never spills into the next
    // row.
    constexpr int64_t TW = 16 * BNV, ldi = (INTER + TW - 1) / TW * TW, ldh = (HID + TW - 1) / TW * TW;
    std::vector<float> tile(BM * ((HID > UPROWS ? HID : UPROWS) + TW));
    std::vector<const elem*> brow;
    std::vector<const float*> arow, frow;  // A rows; fp32 B rows (s·A or x)
    std::vector<float> dh(UPROWS);  // one row of dH, in fp32 until stored
    // ---- Phase 1: dA' = dy[tok]·W2_e, A, dS, dH = s·dA' ⊙ act'(H), s·A ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < (int64_t)rowblocks.size(); ++it) {
      const int64_t e = rowblocks[it] >> 32, r0 = rt.offsets[e] + (rowblocks[it] & 0xffffffff);
      const int64_t rows = std::min<int64_t>(BM, rt.offsets[e + 1] - r0);
      const float* dyr[BM];
      for (int64_t m = 0; m < rows; ++m) dyr[m] = dy + rt.token(rt.order[r0 + m]) * HID;
      brow.resize(HID);
      for (int64_t k = 0; k < HID; ++k) brow[k] = w2 + e * w2_e + k * w2_r;
      bcast_rows<false, elem>(dyr, 0, rows, brow.data(), HID, INTER, tile.data(), ldi, false);
      for (int64_t m = 0; m < rows; ++m) {
        const int64_t r = r0 + m, p = rt.order[r];
        const float s = pw[p];
        const float* da = tile.data() + m * ldi;
        const elem* hr = h + r * UPROWS;
        float ds = 0.0f;
        std::fill(dh.begin(), dh.end(), 0.0f);
        // 16 columns at a time, or the tail (inlined twice: the full case has constant trip counts)
        auto columns = [&](const int64_t n0, const int lanes) {
          float v0[16] = {}, v1[16] = {}, a[16], d0[16], d1[16];
          for (int i = 0; i < lanes; ++i) {
            v0[i] = to_f(hr[var_row(0, n0 + i)]);
            v1[i] = to_f(hr[var_row(NV - 1, n0 + i)]);
          }
#pragma omp simd
          for (int i = 0; i < 16; ++i) {
            a[i] = mf_act(v0[i], v1[i]);
            mf_act_grad(v0[i], v1[i], &d0[i], &d1[i]);
          }
          float part = 0.0f;
          for (int i = 0; i < lanes; ++i) {
            part += da[n0 + i] * a[i];
            ws.sA[r * INTER + n0 + i] = s * a[i];
            dh[var_row(0, n0 + i)] += s * da[n0 + i] * d0[i];  // summed: two variables may read one row
            if (NV == 2) dh[var_row(1, n0 + i)] += s * da[n0 + i] * d1[i];
          }
          ds += part;
        };
        int64_t n0 = 0;
        for (; n0 + 16 <= INTER; n0 += 16) columns(n0, 16);
        if (n0 < INTER) columns(n0, (int)(INTER - n0));
        std::memcpy(ws.dH + r * UPROWS, dh.data(), UPROWS * 4);
        if (b2)
          for (int64_t j = 0; j < HID; ++j) ds += dyr[m][j] * b2[e * HID + j];
        dpw[p] = ds;
      }
    }
    // ---- Phase 2: dW2_e = dyᵀ·(s·A), db2; dW1_e = dHᵀ·x, db1 (zeros for experts without rows). Items: (expert,
    // block of P2 output rows of dW2, then of dW1), the row pointers built once per item ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < E * (nb2 + nb1); ++it) {
      const int64_t e = it / (nb2 + nb1), blk = it % (nb2 + nb1);
      const int64_t r0 = rt.offsets[e], n = rt.offsets[e + 1] - r0;
      const bool second = blk >= nb2;  // dW1 rows rather than dW2 rows
      const int64_t b0 = (second ? blk - nb2 : blk) * P2;
      const int64_t brows = std::min<int64_t>(P2, (second ? UPROWS : HID) - b0);
      const int64_t cols = second ? HID : INTER, ld = second ? ldh : ldi;
      arow.resize((size_t)std::max<int64_t>(n, 1));
      frow.resize((size_t)std::max<int64_t>(n, 1));
      for (int64_t k = 0; k < n; ++k) {
        const int64_t r = r0 + k, t = rt.token(rt.order[r]);
        arow[k] = second ? ws.dH + r * UPROWS : dy + t * HID;
        frow[k] = second ? x + t * HID : ws.sA + r * INTER;
      }
      for (int64_t o0 = b0; o0 < b0 + brows; o0 += BM) {
        const int64_t orows = std::min<int64_t>(BM, b0 + brows - o0);
        float* acc = tile.data();
        if (n == 0)
          std::memset(acc, 0, sizeof(float) * orows * ld);
        else
          bcast_rows<true, float>(arow.data(), o0, orows, frow.data(), n, cols, acc, ld, false);
        for (int64_t m = 0; m < orows; ++m) {
          const int64_t q = o0 + m;
          elem* dst = second ? (q < split ? dw1 + (e * split + q) * HID : dw3 + (e * (UPROWS - split) + q - split) * HID)
                             : dw2 + (e * HID + q) * INTER;
          put_n(dst, acc + m * ld, cols);
          float* db = second ? db1 : db2;
          if (db) {
            float sum = 0.0f;
            for (int64_t k = 0; k < n; ++k)
              sum += second ? arow[k][q] : pw[rt.order[r0 + k]] * arow[k][q];
            db[e * (second ? UPROWS : HID) + q] = sum;
          }
        }
      }
    }
    // ---- Phase 3: dx per pair = dH·[W1; W3]_e, into pair order ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < (int64_t)rowblocks.size(); ++it) {
      const int64_t e = rowblocks[it] >> 32, r0 = rt.offsets[e] + (rowblocks[it] & 0xffffffff);
      const int64_t rows = std::min<int64_t>(BM, rt.offsets[e + 1] - r0);
      const float* dhr[BM];
      for (int64_t m = 0; m < rows; ++m) dhr[m] = ws.dH + (r0 + m) * UPROWS;
      brow.resize(UPROWS);
      for (int64_t q = 0; q < UPROWS; ++q) brow[q] = W1.row(e, q);
      bcast_rows<false, elem>(dhr, 0, rows, brow.data(), UPROWS, HID, tile.data(), ldh, false);
      for (int64_t m = 0; m < rows; ++m)
        std::memcpy(ws.ypair + (int64_t)rt.order[r0 + m] * HID, tile.data() + m * ldh, HID * 4);
    }
    // ---- Phase 4: dx[t] = Σ over t's kept pairs, in pair order ----
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float acc[HID];
      for (int64_t j = 0; j < HID; ++j) acc[j] = 0.0f;
      for (int32_t q = ws.tok_offsets[t]; q < ws.tok_offsets[t + 1]; ++q) {
        const float* xp = ws.ypair + (int64_t)ws.tok_pairs[q] * HID;
#pragma omp simd
        for (int64_t j = 0; j < HID; ++j) acc[j] += xp[j];
      }
      put_n(dx + t * HID, acc, HID);
    }
  }
  return kept;
}

}  // extern "C"
