// CPU backend of grad_sketch: a = (1/tau) (proj[:, y] - proj p) per row and its backward, p never stored.
//
// Forward, per block of up to kRows valid rows, one pass over the vocabulary in tiles of kTile columns:
//   1. per row (vectorized, tile_fwd): x = z / tau into the scratch E while taking the tile max, then
//      e = exp(x - M) in place, M the row's running max; the row partial (m, r) of hero_rowmath.h takes the
//      tile's mass (r leaves out one argmax, so a dominant logit keeps its small remaining mass) and, when the
//      tile raised M, the k-vector U = sum proj[:, j] e_j of the earlier tiles is rescaled by e^{M_old - M};
//   2. U[rows, k] += E[rows, tile] @ proj[:, tile]^T (one BLAS call through the SketchGemm callback).
// At the end proj p = U / s with s = 1 + r (double) and lse = m + log1p(r) in double, saved as fp32 hi + lo.
//
// Backward, same blocks and tiles: W[rows, tile] = v[rows, k] @ proj[:, tile] (BLAS), then per element
// dz = -(p / tau^2) (w - c) with p = exp((x - hi) - lo) (no ulp(lse) error at large offsets: x - hi is exact
// near the max) and the per-row c = (proj p) . v = v . proj[:, y] - tau (v . a) from the forward's output (no
// second softmax pass; fp64 logits, whose a is rounded to fp32, sum it from the row in an extra pass). The
// output may alias the logits (each element is read before it is written).
//
// Scratch per thread: E [kRows, kTile] (reused for W) and U / v [kRows, k] in the compute type; fp32 for
// fp32 / bf16 / fp16 logits, fp64 for fp64. Rounding as in entropy_logprob_cpu.cpp (-ffp-contract=off: x is
// one rounded product in both passes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "hero_cpu.h"
#include "hero_kernels.h"
#include "hero_rowmath.h"

namespace hk {
namespace {

// 128 rows x 1024 columns: E is 512 KB of fp32 and a proj tile 512 KB at k = 128, and the tile products run at
// the speed of one whole-matrix BLAS call (64 x 512 tiles measured ~15% slower end to end on one core); each
// proj tile is read once per 128 rows.
constexpr int kRows = 128;
constexpr int kTile = 1024;

template <typename A>
HK_HD bool is_nan(A v) {
  return v != v;
}

// One row's tile [n] of the forward: e (out) = exp(x - M) for the new running max M, row partial updated,
// u [k] rescaled when M grew. A tile without a finite max leaves e = 0 (NaN poisons r).
template <typename T, typename A>
HK_HD void tile_fwd(const T* z, int n, A inv_tau, A* e, Partial<double>& acc, A* u, int64_t k) {
  const A bm = scale_block(z, n, inv_tau, e);
  if (bm == neg_inf<A>() || is_nan(bm)) {  // no finite max: no mass, and no NaN x - M below
    if (is_nan(bm) || any_nan(e, n)) acc.r = static_cast<double>(NAN);
    std::fill(e, e + n, A(0));
    return;
  }
  A designated = A(0);
  if (static_cast<double>(bm) > acc.m) {  // the tile holds the new max: one of its ties is the argmax
    const double f = acc.m == neg_inf<double>() ? 0.0 : exp(acc.m - static_cast<double>(bm));
    acc = raise_max(acc, static_cast<double>(bm));
    const A fa = static_cast<A>(f);
    for (int64_t i = 0; i < k; ++i) u[i] *= fa;
    designated = A(1);
  }
  const A M = static_cast<A>(acc.m);  // a value of some x: exact in A
  A br = A(0), bt = A(0);
#pragma omp simd reduction(+ : br, bt)
  for (int j = 0; j < n; ++j) {
    const A d = e[j] - M;
    const A ex = exp_(d);
    const bool tie = d == A(0);
    br += tie ? A(0) : ex;
    bt += tie ? A(1) : A(0);
    e[j] = ex;
  }
  acc.r += static_cast<double>(br);
  settle_ties(acc, static_cast<double>(bt), static_cast<double>(designated));
}

// One row's tile [n] of the backward: out = -(p / tau^2) (w - c).
template <typename T, typename A, typename O>
HK_HD void tile_bwd(const T* z, O* out, int n, A inv_tau, A hi, A lo, A c, const A* w) {
  const A s = -(inv_tau * inv_tau);
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const A x = scale_(to_acc(z[j]), inv_tau);
    const A p = prob(log_q(x, hi, lo));
    out[j] = from_acc<O>(s * p * (w[j] - c));
  }
}

// sum_j p_j w_j over one row's tile (the exact (proj p) . v of the fp64 path).
template <typename T, typename A>
HK_HD A tile_pw(const T* z, int n, A inv_tau, A hi, A lo, const A* w) {
  A acc = A(0);
#pragma omp simd reduction(+ : acc)
  for (int j = 0; j < n; ++j) acc += prob(log_q(scale_(to_acc(z[j]), inv_tau), hi, lo)) * w[j];
  return acc;
}

template <typename A>
HK_HD void gemm_call(const SketchGemm& g, int64_t m, int64_t n, int64_t kd, const A* a, int64_t lda, const A* b,
                     int64_t ldb, bool b_trans, A* c, int64_t ldc, bool accumulate) {
  g.fn(sizeof(A) == 8, m, n, kd, a, lda, b, ldb, b_trans, c, ldc, accumulate);
}

// Forward of nb valid rows (ids, labels ys).
template <typename T>
HK_HD void fwd_block(const T* logits, RowLayout L, const int64_t* ids, const int64_t* ys, int nb, int64_t V,
                     const typename AccOf<T>::type* proj, int64_t k, double inv_tau_d, float* a, float* stats,
                     const SketchGemm& g, typename AccOf<T>::type* E, typename AccOf<T>::type* U) {
  using A = typename AccOf<T>::type;
  const A inv_tau = static_cast<A>(inv_tau_d);
  Partial<double> acc[kRows];
  for (int r = 0; r < nb; ++r) acc[r] = empty_partial<double>();
  std::fill(U, U + static_cast<int64_t>(nb) * k, A(0));
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, V - j0));
    for (int r = 0; r < nb; ++r) tile_fwd<T, A>(logits + L.offset(ids[r]) + j0, n, inv_tau, E + r * kTile, acc[r],
                                                U + r * k, k);
    gemm_call<A>(g, nb, k, n, E, kTile, proj + j0, V, true, U, k, true);
  }
  for (int r = 0; r < nb; ++r) {
    float* ar = a + ids[r] * k;
    float* st = stats + 2 * ids[r];
    const double lse = lse_wide(acc[r]);
    if (is_nan(lse)) {  // no distribution (all -inf, +inf, NaN): NaN row
      std::fill(ar, ar + k, nan_());
      st[0] = st[1] = nan_();
      continue;
    }
    const double s = 1.0 + acc[r].r;
    const A* ur = U + r * k;
    for (int64_t i = 0; i < k; ++i)
      ar[i] = static_cast<float>(inv_tau_d * (static_cast<double>(proj[i * V + ys[r]]) - ur[i] / s));
    const LseSplit<float> sp = split_lse<float>(lse);
    st[0] = sp.hi;
    st[1] = sp.lo;
  }
}

template <typename T, typename O>
HK_HD void bwd_block(const T* logits, RowLayout L, const int64_t* ids, const int64_t* ys, int nb, int64_t V,
                     const typename AccOf<T>::type* proj, int64_t k, const float* a, const float* stats,
                     const float* grad_a, double inv_tau_d, O* out, RowLayout OL, const SketchGemm& g,
                     typename AccOf<T>::type* W, typename AccOf<T>::type* G) {
  using A = typename AccOf<T>::type;
  const A inv_tau = static_cast<A>(inv_tau_d);
  A c[kRows], hi[kRows], lo[kRows];
  for (int r = 0; r < nb; ++r) {
    const float* v = grad_a + ids[r] * k;
    const float* ar = a + ids[r] * k;
    double vy = 0.0, va = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      G[r * k + i] = static_cast<A>(v[i]);
      vy += static_cast<double>(v[i]) * static_cast<double>(proj[i * V + ys[r]]);
      va += static_cast<double>(v[i]) * static_cast<double>(ar[i]);
    }
    c[r] = static_cast<A>(vy - va / inv_tau_d);  // (proj p) . v, proj p = proj[:, y] - tau a
    hi[r] = static_cast<A>(stats[2 * ids[r]]);
    lo[r] = static_cast<A>(stats[2 * ids[r] + 1]);
  }
  if (sizeof(A) == 8) {  // fp64: c = sum_j p_j w_j from the row itself (the saved a is only fp32); a 2nd GEMM pass
    for (int r = 0; r < nb; ++r) c[r] = A(0);
    for (int64_t j0 = 0; j0 < V; j0 += kTile) {
      const int n = static_cast<int>(std::min<int64_t>(kTile, V - j0));
      gemm_call<A>(g, nb, n, k, G, k, proj + j0, V, false, W, kTile, false);
      for (int r = 0; r < nb; ++r) c[r] += tile_pw<T, A>(logits + L.offset(ids[r]) + j0, n, inv_tau, hi[r], lo[r],
                                                         W + r * kTile);
    }
  }
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, V - j0));
    gemm_call<A>(g, nb, n, k, G, k, proj + j0, V, false, W, kTile, false);
    for (int r = 0; r < nb; ++r)
      tile_bwd<T, A, O>(logits + L.offset(ids[r]) + j0, out + OL.offset(ids[r]) + j0, n, inv_tau, hi[r], lo[r],
                        c[r], W + r * kTile);
  }
}

// Rows [b, e): skip(i, y) for a masked (y == ignore_index) or bad-label row; the valid rows gathered into blocks
// of up to kRows, block(ids, ys, nb).
template <typename Skip, typename Block>
HK_HD void for_row_blocks(const int64_t* labels, int64_t b, int64_t e, int64_t V, int64_t ignore_index, Skip&& skip,
                          Block&& block) {
  int64_t ids[kRows], ys[kRows];
  int nb = 0;
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = labels[i];
    if (y == ignore_index || bad_label(y, V)) {
      skip(i, y);
      continue;
    }
    ids[nb] = i;
    ys[nb++] = y;
    if (nb == kRows) {
      block(ids, ys, nb);
      nb = 0;
    }
  }
  if (nb) block(ids, ys, nb);
}

// Masked rows get 0, bad labels NaN.
template <typename T>
HK_HD void fwd_range(const T* logits, RowLayout L, const int64_t* labels, int64_t b, int64_t e, int64_t V,
                     const typename AccOf<T>::type* proj, int64_t k, double inv_tau, int64_t ignore_index,
                     float* a, float* stats, const SketchGemm& g) {
  using A = typename AccOf<T>::type;
  std::vector<A> E(static_cast<size_t>(kRows) * kTile), U(static_cast<size_t>(kRows) * k);
  for_row_blocks(
      labels, b, e, V, ignore_index,
      [&](int64_t i, int64_t y) HK_LAMBDA_INLINE {
        const float v = y == ignore_index ? 0.f : nan_();
        std::fill(a + i * k, a + (i + 1) * k, v);
        stats[2 * i] = stats[2 * i + 1] = v;
      },
      [&](const int64_t* ids, const int64_t* ys, int nb) HK_LAMBDA_INLINE {
        fwd_block<T>(logits, L, ids, ys, nb, V, proj, k, inv_tau, a, stats, g, E.data(), U.data());
      });
}

template <typename T, typename O>
HK_HD void bwd_range(const T* logits, RowLayout L, const int64_t* labels, int64_t b, int64_t e, int64_t V,
                     const typename AccOf<T>::type* proj, int64_t k, const float* a, const float* stats,
                     const float* grad_a, double inv_tau, int64_t ignore_index, O* out, RowLayout OL,
                     const SketchGemm& g) {
  using A = typename AccOf<T>::type;
  std::vector<A> W(static_cast<size_t>(kRows) * kTile), G(static_cast<size_t>(kRows) * k);
  for_row_blocks(
      labels, b, e, V, ignore_index,
      [&](int64_t i, int64_t y) HK_LAMBDA_INLINE {
        if (y == ignore_index) {
          zero_row<O>(out + OL.offset(i), V);
        } else {
          nan_row<O>(out + OL.offset(i), V);
        }
      },
      [&](const int64_t* ids, const int64_t* ys, int nb) HK_LAMBDA_INLINE {
        bwd_block<T, O>(logits, L, ids, ys, nb, V, proj, k, a, stats, grad_a, inv_tau, out, OL, g, W.data(),
                        G.data());
      });
}

// ---------------------------------------------------------------------------------------------
// multiversioned entry points, one overload per storage type (see entropy_logprob_cpu.cpp)
// ---------------------------------------------------------------------------------------------
#define HK_SKETCH_FWD(T)                                                                                        \
  HK_CLONES void fwd_entry(const T* z, RowLayout L, const int64_t* y, int64_t b, int64_t e, int64_t V,            \
                           const AccOf<T>::type* proj, int64_t k, double it, int64_t ig, float* a, float* st,     \
                           const SketchGemm& g) {                                                                 \
    fwd_range<T>(z, L, y, b, e, V, proj, k, it, ig, a, st, g);                                                    \
  }
HK_SKETCH_FWD(float)
HK_SKETCH_FWD(bf16_t)
HK_SKETCH_FWD(f16_t)
HK_SKETCH_FWD(double)

#define HK_SKETCH_BWD(T, O)                                                                                       \
  HK_CLONES void bwd_entry(const T* z, RowLayout L, const int64_t* y, int64_t b, int64_t e, int64_t V,            \
                           const AccOf<T>::type* proj, int64_t k, const float* a, const float* st,                \
                           const float* ga, double it, int64_t ig, O* out, RowLayout OL, const SketchGemm& g) {   \
    bwd_range<T, O>(z, L, y, b, e, V, proj, k, a, st, ga, it, ig, out, OL, g);                                    \
  }
HK_SKETCH_BWD(float, float)
HK_SKETCH_BWD(bf16_t, bf16_t)
HK_SKETCH_BWD(f16_t, f16_t)
HK_SKETCH_BWD(double, double)
HK_SKETCH_BWD(bf16_t, float)
HK_SKETCH_BWD(f16_t, float)

}  // namespace

void cpu_sketch_fwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, int64_t row_begin,
                         int64_t row_end, int64_t V, const void* proj, int64_t k, double inv_tau,
                         int64_t ignore_index, float* a, float* stats, SketchGemm gemm) {
  with_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    fwd_entry(static_cast<const T*>(logits), layout, labels, row_begin, row_end, V,
              static_cast<const typename AccOf<T>::type*>(proj), k, inv_tau, ignore_index, a, stats, gemm);
  });
}

void cpu_sketch_bwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, int64_t row_begin,
                         int64_t row_end, int64_t V, const void* proj, int64_t k, const float* a,
                         const float* stats, const float* grad_a, double inv_tau, int64_t ignore_index,
                         int out_dtype, void* out, RowLayout out_layout, SketchGemm gemm) {
  with_in_out(dtype, out_dtype, [&](auto t, auto o) {
    using T = typename decltype(t)::type;
    using O = typename decltype(o)::type;
    bwd_entry(static_cast<const T*>(logits), layout, labels, row_begin, row_end, V,
              static_cast<const typename AccOf<T>::type*>(proj), k, a, stats, grad_a, inv_tau, ignore_index,
              static_cast<O*>(out), out_layout, gemm);
  });
}

}  // namespace hk
