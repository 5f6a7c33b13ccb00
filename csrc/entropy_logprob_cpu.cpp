// Fused CPU backend of entropy_logprob: per-row forward (logp, H, lse) and backward (dlogits).
//
// Torch-free on purpose (raw pointers, see hero_kernels.h): it compiles in a few seconds and the
// bindings parallelize over rows with at::parallel_for (OpenMP, torch's own thread count). The math
// comes from hero_rowmath.h, the header the CUDA kernels use.
//
// Memory: no [N, V] intermediate. Forward walks each row once in blocks of kBlock columns: the block
// is converted/scaled into a small stack buffer (L1) while taking its max, then e^{x - max} is summed
// from the buffer, and the block partial (m, r, u) is merged into a double-precision row partial.
// Backward walks each row once, writing dz (optionally in place over the logits).
//
// Vectorization: the inner loops are plain `#pragma omp simd` loops over floats with selects, so gcc
// vectorizes them (exp is the branch-free polynomial of hero_rowmath.h). On x86-64 each row function is
// built three times (baseline SSE2, x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512) and picked at load time
// (target_clones), so one binary is both portable and fast.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hero_kernels.h"
#include "hero_cpu.h"
#include "hero_rowmath.h"

namespace hk {
namespace {

constexpr int kBlock = 1024;  // columns per forward block: 4 KB of fp32 scratch, stays in L1

// ---------------------------------------------------------------------------------------------
// one row
// ---------------------------------------------------------------------------------------------
template <typename T>
HK_HD void fwd_row(const T* z, int64_t V, typename AccOf<T>::type inv_tau, int64_t y, float* out_logp,
                   float* out_H, double* out_lse) {
  using A = typename AccOf<T>::type;
  alignas(64) A buf[kBlock];
  Partial<double> acc = empty_partial<double>();
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - j0));
    const T* zb = z + j0;
    const A bm = scale_block(zb, n, inv_tau, buf);
    if (bm == neg_inf<A>()) {  // every column -inf (no mass; x - m would be NaN), or NaN among -inf
      if (any_nan(buf, n)) acc.r = static_cast<double>(NAN);
      continue;
    }
    // Block partial (bm, br, bu): br leaves out one argmax (ties counted separately, exact), so a
    // dominant logit's tiny remaining mass is not rounded away against 1.
    A br = A(0), bt = A(0), bu = A(0);
#pragma omp simd reduction(+ : br, bt, bu)
    for (int j = 0; j < n; ++j) {
      const A d = buf[j] - bm;
      const A e = exp_(d);
      const bool tie = d == A(0);
      br += tie ? A(0) : e;
      bt += tie ? A(1) : A(0);
      bu += shifted_term(d, e);
    }
    acc = merge(acc, Partial<double>{static_cast<double>(bm), static_cast<double>(br) + (static_cast<double>(bt) - 1.0),
                                     static_cast<double>(bu)});
  }
  double lse, H;
  finalize(acc, lse, H);  // lse in double: the backward splits it (split_lse), no fp32 rounding of it
  // Same float product as in the loop, so x_y - m is exactly 0 when y is the argmax.
  const A x_y = scale_(to_acc(z[y]), inv_tau);
  *out_logp = static_cast<float>(logprob(acc, static_cast<double>(x_y)));
  *out_H = static_cast<float>(H);
  *out_lse = lse;
}

template <typename T, typename O>
HK_HD void bwd_row(const T* z, O* out, int64_t V, typename AccOf<T>::type inv_tau, int64_t y, double lse_d,
                   float H_f, float g_f, float k_f) {
  using A = typename AccOf<T>::type;
  const A H = H_f, g = g_f, k = k_f;
  const LseSplit<A> ls = split_lse<A>(lse_d);
  const A hi = ls.hi, lo = ls.lo;
  const A x_y = scale_(to_acc(z[y]), inv_tau);  // read before the loop: out may alias z
  const GradCoef<A> coef = grad_coef(H, g, k, inv_tau);
  double q = 0.0;                        // sum_{j != y} p_j, block sums in A, total in double
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - j0));
    const T* zb = z + j0;
    O* ob = out + j0;
    const int64_t yb = y - j0;  // label position inside this block (may be outside [0, n))
    A bq = A(0);
    // Same-index read-then-write, so in-place (ob == zb) is safe under simd.
#pragma omp simd reduction(+ : bq)
    for (int j = 0; j < n; ++j) {
      const A x = scale_(to_acc(zb[j]), inv_tau);
      const A lq = log_q(x, hi, lo);
      const A p = prob(lq);
      bq += j != yb ? p : A(0);
      ob[j] = from_acc<O>(grad_other(lq, p, coef));
    }
    q += static_cast<double>(bq);
  }
  out[y] = from_acc<O>(grad_label(log_q(x_y, hi, lo), static_cast<A>(q), H, g, k, inv_tau));
}


// ---------------------------------------------------------------------------------------------
// row ranges (the multiversioned entry points)
// ---------------------------------------------------------------------------------------------
template <typename T>
HK_HD void fwd_range(const T* logits, RowLayout L, const int64_t* labels, int64_t b, int64_t e, int64_t V,
                     double inv_tau, int64_t ignore_index, float* logp, float* H, double* lse) {
  using A = typename AccOf<T>::type;
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = labels[i];
    if (y == ignore_index) {
      logp[i] = 0.f;
      H[i] = 0.f;
      lse[i] = 0.0;
      continue;
    }
    if (bad_label(y, V)) {
      logp[i] = H[i] = nan_();
      lse[i] = static_cast<double>(NAN);
      continue;
    }
    fwd_row<T>(logits + L.offset(i), V, static_cast<A>(inv_tau), y, logp + i, H + i, lse + i);
  }
}

template <typename T, typename O>
HK_HD void bwd_range(const T* logits, RowLayout L, const int64_t* labels, const double* lse, const float* H,
                     const float* g, const float* k, int64_t b, int64_t e, int64_t V, double inv_tau,
                     int64_t ignore_index, O* out, RowLayout OL) {
  using A = typename AccOf<T>::type;
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = labels[i];
    O* o = out + OL.offset(i);
    if (y == ignore_index) {
      zero_row<O>(o, V);
      continue;
    }
    if (bad_label(y, V)) {
      nan_row<O>(o, V);
      continue;
    }
    bwd_row<T, O>(logits + L.offset(i), o, V, static_cast<A>(inv_tau), y, lse[i], H[i], g[i], k[i]);
  }
}

// One overload per storage type (fwd_entry) and per (storage, output) pair (bwd_entry).
#define HK_FWD_ENTRY(T)                                                                                         \
  HK_CLONES void fwd_entry(const T* logits, RowLayout rs, const int64_t* labels, int64_t b, int64_t e,         \
                           int64_t V, double it, int64_t ig, float* logp, float* H, double* lse) {             \
    fwd_range<T>(logits, rs, labels, b, e, V, it, ig, logp, H, lse);                                            \
  }
HK_FWD_ENTRY(float)
HK_FWD_ENTRY(bf16_t)
HK_FWD_ENTRY(f16_t)
HK_FWD_ENTRY(double)

#define HK_BWD_ENTRY(T, O)                                                                                      \
  HK_CLONES void bwd_entry(const T* logits, RowLayout rs, const int64_t* labels, const double* lse,            \
                           const float* H, const float* g, const float* k, int64_t b, int64_t e, int64_t V,    \
                           double it, int64_t ig, O* out, RowLayout ors) {                                      \
    bwd_range<T, O>(logits, rs, labels, lse, H, g, k, b, e, V, it, ig, out, ors);                               \
  }
HK_BWD_ENTRY(float, float)
HK_BWD_ENTRY(bf16_t, bf16_t)
HK_BWD_ENTRY(f16_t, f16_t)
HK_BWD_ENTRY(double, double)
HK_BWD_ENTRY(bf16_t, float)
HK_BWD_ENTRY(f16_t, float)

// ---------------------------------------------------------------------------------------------
// "vocab" loop order: one column per row (hero_rowmath.h slice_col / slice_fix); scalar, memory-light
// ---------------------------------------------------------------------------------------------
template <typename T>
void slice_labels_range(const T* z, RowLayout L, const int64_t* labels, int64_t b, int64_t e, int64_t v0,
                        int64_t vc, double inv_tau, int64_t ignore_index, int64_t* cols, double* x) {
  using A = typename AccOf<T>::type;
  for (int64_t i = b; i < e; ++i) {
    const int64_t c = slice_col(labels[i], v0, vc, ignore_index);
    cols[i] = c;
    // the row kernel's own rounding of x (scale_), so p_y matches the forward's
    x[i] = c < 0 ? 0.0 : static_cast<double>(scale_(to_acc(z[L.offset(i) + c]), static_cast<A>(inv_tau)));
  }
}

template <typename O>
void slice_label_fix_range(O* dz, RowLayout L, const int64_t* labels, int64_t b, int64_t e, int64_t v0, int64_t vc,
                           const double* x, const double* lse, const float* H, const float* g, const float* k,
                           const float* logp, double inv_tau, int64_t ignore_index) {
  using A = typename AccOf<O>::type;
  for (int64_t i = b; i < e; ++i) {
    const int64_t y = labels[i], c = slice_col(y, v0, vc, ignore_index);
    if (c < 0) continue;  // masked: the row kernel zeroed the whole row
    const double d = slice_fix(x[i], lse[i], H[i], g[i], k[i], logp != nullptr, logp ? logp[i] : 0.f,
                               in_slice(y, v0, vc), inv_tau);
    dz[L.offset(i) + c] = from_acc<O>(static_cast<A>(d));  // fp64 -> fp32 -> 16 bit, as torch casts
  }
}

}  // namespace

void cpu_slice_labels_rows(int dtype, const void* z, RowLayout layout, const int64_t* labels, int64_t row_begin,
                           int64_t row_end, int64_t v0, int64_t vc, double inv_tau, int64_t ignore_index,
                           int64_t* cols, double* x) {
  with_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    slice_labels_range(static_cast<const T*>(z), layout, labels, row_begin, row_end, v0, vc, inv_tau, ignore_index,
                       cols, x);
  });
}

void cpu_slice_label_fix_rows(int dtype, void* dz, RowLayout layout, const int64_t* labels, int64_t row_begin,
                              int64_t row_end, int64_t v0, int64_t vc, const double* x, const double* lse,
                              const float* H, const float* grad_logp, const float* grad_H, const float* logp,
                              double inv_tau, int64_t ignore_index) {
  with_dtype(dtype, [&](auto t) {
    using O = typename decltype(t)::type;
    slice_label_fix_range(static_cast<O*>(dz), layout, labels, row_begin, row_end, v0, vc, x, lse, H, grad_logp,
                          grad_H, logp, inv_tau, ignore_index);
  });
}

void cpu_fwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, int64_t row_begin,
                  int64_t row_end, int64_t V, double inv_tau, int64_t ignore_index, float* logp, float* H,
                  double* lse) {
  with_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    fwd_entry(static_cast<const T*>(logits), layout, labels, row_begin, row_end, V, inv_tau, ignore_index, logp, H,
              lse);
  });
}

void cpu_bwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, const double* lse,
                  const float* H, const float* grad_logp, const float* grad_H, int64_t row_begin, int64_t row_end,
                  int64_t V, double inv_tau, int64_t ignore_index, int out_dtype, void* out,
                  RowLayout out_layout) {
  with_in_out(dtype, out_dtype, [&](auto t, auto o) {
    using T = typename decltype(t)::type;
    using O = typename decltype(o)::type;
    bwd_entry(static_cast<const T*>(logits), layout, labels, lse, H, grad_logp, grad_H, row_begin, row_end, V,
              inv_tau, ignore_index, static_cast<O*>(out), out_layout);
  });
}

}  // namespace hk
