// Per-row math shared by the CUDA kernels (entropy_logprob_cuda.cu) and the fused CPU backend
// (entropy_logprob_cpu.cpp). The math is docs/design.md section 1 (tests hold it to the float64 oracle
// hero_kernels/reference.py); this header only states it in a form that compiles under both nvcc and g++,
// so the CPU build exercises the same formulas in CI that the GPU runs.
//
// Online partial over a set of columns (all x already divided by the temperature), stored as
//   m = max x,  r = s - 1 = sum_{j != one argmax} e^{x_j - m},  u = sum (x-m) e^{x-m}
// i.e. s = sum e^{x-m} = 1 + r and the shifted t = u of docs/design.md section 1.4 (unshifted: u + m*s).
// * r instead of s: with a dominant logit s = 1 + 1e-10 is exactly 1 in fp32, so log s, logp and H
//   lose everything; r keeps the small mass and log1p(r) is accurate.
// * u instead of t: H = log s - u/s never subtracts two numbers of size |m| (large common offsets).
// An empty set (or a set of -inf columns) is (m=-inf, r=0, u=0) and merges as the identity, so masked or
// padded vocabulary columns contribute nothing.
//
// Non-finite inputs (one contract for every backend, README "Numerics"): -inf masks a column; a NaN
// anywhere in a row, a +inf, or a row with no finite column gives NaN logp, H and lse (finalize), and
// the backward then writes a NaN row. A NaN seen while a partial is still empty is kept as
// (m = -inf, r = NaN): merge and raise_max carry r and u of an "empty" side instead of dropping them.
//
// Rounding: x = z / tau is ONE separately rounded fp32 product (scale_) in the forward and the backward,
// never contracted into an FMA with the following subtraction: the forward's lse is built from the
// rounded x, so p_argmax = exp(x - lse) is exactly 1 in a one-hot row only if the backward rounds x the
// same way. The CUDA side uses __fmul_rn; the CPU build passes -ffp-contract=off.
//
// Backward, per column j of a row with label y (docs/design.md section 1.3):
//   dz_j = inv_tau * [ g (1[j=y] - p_j) - k p_j (log p_j + H) ],  p_j = exp(log q_j), log q_j = x_j - lse
// The forward saves lse in double (lse_wide) and the backward splits it into hi + lo (split_lse):
// log q_j = (x_j - hi) - lo, where x_j - hi is exact wherever p_j is not negligible (Sterbenz), so p carries
// no ulp(lse) error at large logit offsets (an fp32 lse is off by up to ulp(lse)/2 = 1.2e-4 at |x| ~ 3e3,
// a relative error of every p_j several times eager PyTorch's).
// When p_y > 1/2 the label column uses 1 - p_y = sum_{j != y} p_j and log p_y = log1p(-that):
// 1 - exp(log q_y) would cancel to noise when p_y -> 1 (the Liger #1329 bug class). The sum of the other
// probabilities has a small RELATIVE error instead.
#pragma once

#if defined(__CUDACC__)
#define HK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define HK_HD inline __attribute__((always_inline))
#else
#define HK_HD inline
#endif

#include <math.h>
#include <stdint.h>
// Also under nvcc: its host pass compiles the host-only exp_poly below (std::memcpy); CUDA 13's headers no
// longer pull <cstring> in, so `nvcc -c` of the .cu failed there.
#include <cstring>

namespace hk {

template <typename A>
HK_HD A neg_inf() {
  return static_cast<A>(-INFINITY);
}

// ----------------------------------------------------------------------------------------------
// elementary functions: device uses the CUDA math library (accurate expf, not __expf); host float
// uses a branch-free polynomial that gcc/clang auto-vectorize (std::exp calls block vectorization).
// ----------------------------------------------------------------------------------------------
#if !defined(__CUDA_ARCH__)
HK_HD uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
HK_HD float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// e^x for x <= 88 (our arguments are x - max <= 0 or x - lse ~<= 0). Error <= 2 ulp (1.7 measured):
// n = round(x log2 e) via the 1.5*2^23 trick (no float->int conversion, no UB on NaN), two-constant
// Cody-Waite reduction (ln2_hi has 9 trailing zero bits so n*ln2_hi is exact for |n| <= 2^8), then a
// degree-7 Taylor polynomial on |r| <= ln2/2 (truncation 5e-9 relative). x < -87.33 (incl. -inf)
// returns exactly 0; NaN returns NaN.
HK_HD float exp_poly(float x) {
  float xc = x > 88.0f ? 88.0f : x;
  xc = xc < -87.0f ? -87.0f : xc;  // NaN compares false twice and stays NaN
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  float big = xc * 1.44269504088896341f + magic;
  float n = big - magic;
  int32_t ni = static_cast<int32_t>(f32_bits(big) - f32_bits(magic));  // == n, exactly, as an integer
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.4286068203094172321e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  float scale = bits_f32(static_cast<uint32_t>(ni + 127) << 23);
  float res = p * scale;
  return x < -87.0f ? 0.0f : res;
}
#endif

// e^x on the device: one MUFU.EX2 of x * log2(e) (ex2.approx, relative error ~2^-22; the ftz flush of
// results below 2^-126 is harmless for probabilities), instead of expf's ~8-instruction accurate path.
// Arguments are x - max or x - lse (<= ~0), so no overflow handling is needed.
HK_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else
  return exp_poly(x);
#endif
}
HK_HD double exp_(double x) { return exp(x); }
// x = z * inv_tau, rounded on its own (see the header comment): no FMA contraction with what follows.
HK_HD float scale_(float z, float inv_tau) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(z, inv_tau);
#else
  return z * inv_tau;  // the CPU build passes -ffp-contract=off
#endif
}
HK_HD double scale_(double z, double inv_tau) { return z * inv_tau; }
HK_HD float nan_() { return static_cast<float>(NAN); }
HK_HD float log_(float x) { return logf(x); }
HK_HD double log_(double x) { return log(x); }
HK_HD float log1p_(float x) { return log1pf(x); }
HK_HD double log1p_(double x) { return log1p(x); }

// ----------------------------------------------------------------------------------------------
// online partials
// ----------------------------------------------------------------------------------------------
template <typename A>
struct Partial {
  A m;  // max x (-inf when empty)
  A r;  // s - 1 = sum of e^{x-m} over every column but ONE argmax (0 when empty)
  A u;  // sum (x-m) e^{x-m}
};

template <typename A>
HK_HD Partial<A> empty_partial() {
  return Partial<A>{neg_inf<A>(), A(0), A(0)};
}

// s = 1 + r (0 when empty).
template <typename A>
HK_HD A partial_s(const Partial<A>& p) {
  return p.m == neg_inf<A>() ? A(0) : A(1) + p.r;
}

// (x - m) e^{x-m} given d = x - m and e = e^d; a -inf column (e == 0, d == -inf) adds exactly 0.
template <typename A>
HK_HD A shifted_term(A d, A e) {
  return e > A(0) ? d * e : A(0);
}

// Associative, commutative merge of two partials over disjoint column sets. The side with the larger max
// keeps its designated argmax; the other side's whole mass (1 + r) is scaled onto it, so r never goes
// through 1 + tiny - 1. Equal maxima add exactly 1 (a tie). A NaN max poisons the result.
template <typename A>
HK_HD Partial<A> merge(Partial<A> a, Partial<A> b) {
  if (a.m < b.m) {
    const Partial<A> t = a;
    a = b;
    b = t;
  }
  // b empty (or both): explicit, since (-inf - m) * 0 is NaN. b.r / b.u are 0, or NaN for a poisoned b.
  if (b.m == neg_inf<A>()) return Partial<A>{a.m, a.r + b.r, a.u + b.u};
  const A d = b.m - a.m;
  const A f = exp_(d);
  const A sb = A(1) + b.r;
  return Partial<A>{a.m, a.r + sb * f, a.u + f * (b.u + d * sb)};
}

// Re-express p with a larger max M > p.m whose (designated) column is NOT in p: callers then add the
// chunk holding M with add_column and settle ties with settle_ties(designated = 1).
template <typename A>
HK_HD Partial<A> raise_max(const Partial<A>& p, A M) {
  if (p.m == neg_inf<A>()) return Partial<A>{M, p.r, p.u};  // 0, 0 (or NaN: poisoned) 
  const A d = p.m - M;
  const A f = exp_(d);
  const A s = A(1) + p.r;
  return Partial<A>{M, s * f, f * (p.u + d * s)};
}

// One column x <= p.m (p.m finite). Columns equal to the max are counted in `ties` instead of adding
// e = 1 to r; NaN columns land in r (x == m is false) and poison it, as they should.
template <typename A>
HK_HD void add_column(Partial<A>& p, A x, A& ties) {
  const A d = x - p.m;
  const A e = exp_(d);
  const bool tie = d == A(0);
  p.r += tie ? A(0) : e;
  ties += tie ? A(1) : A(0);
  p.u += shifted_term(d, e);
}

// After a chunk: every tie adds 1 to r except the designated argmax when the chunk raised the max.
template <typename A>
HK_HD void settle_ties(Partial<A>& p, A ties, A designated) {
  p.r += ties - designated;
}

// Add one column x of any size (scalar heads/tails).
template <typename A>
HK_HD void push(Partial<A>& p, A x) {
  p = merge(p, Partial<A>{x, A(0), A(0)});
}

// Public (m, s, t) <-> internal (m, r, u) for vocab-sharded callers (s = sum e^{x-m}, t = sum x e^{x-m}).
template <typename A>
HK_HD A public_t(const Partial<A>& p) {
  return p.m == neg_inf<A>() ? A(0) : p.u + p.m * (A(1) + p.r);
}
template <typename A>
HK_HD Partial<A> from_public(A m, A s, A t) {
  return m == neg_inf<A>() ? empty_partial<A>() : Partial<A>{m, s - A(1), t - m * s};
}

// A row has a distribution only when its max is finite (not every column -inf, no +inf, no NaN max).
template <typename A>
HK_HD bool row_defined(const Partial<A>& p) {
  return p.m > neg_inf<A>() && p.m < -neg_inf<A>();
}

// lse = m + log1p(r), H = log1p(r) - u/(1 + r) (>= 0 mathematically: rounding below 0 is clamped, NaN
// kept). log1p keeps log s accurate when s = 1 + tiny (a dominant logit), where log(s) would be 0.
// A row without a distribution (row_defined false) gives NaN for both.
template <typename A>
HK_HD void finalize(const Partial<A>& p, A& lse, A& H) {
  const A ls = log1p_(p.r);
  lse = p.m + ls;
  const A h = ls - p.u / (A(1) + p.r);
  H = h < A(0) ? A(0) : h;
  if (!row_defined(p)) lse = H = static_cast<A>(NAN);
}

// lse = m + log1p(r) in double whatever A (the backward's split_lse recovers it to ~2^-48 relative); NaN for
// a row without a distribution.
template <typename A>
HK_HD double lse_wide(const Partial<A>& p) {
  return row_defined(p) ? static_cast<double>(p.m) + static_cast<double>(log1p_(p.r)) : static_cast<double>(NAN);
}

// log p_y = (x_y - m) - log1p(r): no rounding of the (possibly large) lse in between. NaN for a row
// without a distribution; -inf for a masked (-inf) label in a defined row.
template <typename A>
HK_HD A logprob(const Partial<A>& p, A x_y) {
  return row_defined(p) ? (x_y - p.m) - log1p_(p.r) : static_cast<A>(NAN);
}

// ----------------------------------------------------------------------------------------------
// backward
// ----------------------------------------------------------------------------------------------
// The saved double lse as two A values, hi + lo (per row, scalar work).
template <typename A>
struct LseSplit {
  A hi, lo;
};
template <typename A>
HK_HD LseSplit<A> split_lse(double lse) {
  const A hi = static_cast<A>(lse);
  return LseSplit<A>{hi, static_cast<A>(lse - static_cast<double>(hi))};
}

// log q_j = x_j - lse without the rounding of lse: (x - hi) is exact near the row max, then - lo.
template <typename A>
HK_HD A log_q(A x, A hi, A lo) {
  return (x - hi) - lo;
}

// p_j = exp(log q_j) for a column j. Returned separately so callers can sum sum_{j != y} p_j.
template <typename A>
HK_HD A prob(A lq) {
  return exp_(lq);
}

// Below this log p, p == 0 in A (fp32: e^-104; fp64: e^-745): clamping log p there keeps p * log p at 0 for
// a -inf logit without a compare-and-select per element.
template <typename A>
HK_HD A logp_floor() {
  return sizeof(A) == 4 ? A(-256) : A(-1e4);
}

// Per-row constants of grad_other: c_t = (g + k H) / tau, k_t = k / tau.
template <typename A>
struct GradCoef {
  A c_t, k_t;
};
template <typename A>
HK_HD GradCoef<A> grad_coef(A H, A g, A k, A inv_tau) {
  return GradCoef<A>{(g + k * H) * inv_tau, k * inv_tau};
}

// dz_j for j != y, given lq = log_q(x, ...) and p = prob(lq): (1/tau) [-g p - k p (log p + H)]
// = -p (c_t + k_t log p), one FMA and two multiplies. p == 0 (underflow, -inf logit) gives exactly (-)0.
template <typename A>
HK_HD A grad_other(A lq, A p, const GradCoef<A>& c) {
  return -p * (c.c_t + c.k_t * (lq > logp_floor<A>() ? lq : logp_floor<A>()));
}

// dz_y for the label column, lq_y = log_q(x_y, ...). q = sum_{j != y} p_j (= 1 - p_y, small relative error).
// p_y <= 1/2: 1 - p_y from p_y directly; p_y > 1/2: 1 - p_y = q and log p_y = log1p(-q), which stay
// accurate as p_y -> 1.
template <typename A>
HK_HD A grad_label(A lq_y, A q, A H, A g, A k, A inv_tau) {
  A lp = lq_y;
  A p = exp_(lp);
  A one_minus_p = A(1) - p;
  if (p > A(0.5)) {
    one_minus_p = q;
    lp = log1p_(-q);
    p = A(1) - q;
  }
  A ent = p > A(0) ? p * (lp + H) : A(0);
  return inv_tau * (g * one_minus_p - k * ent);
}

// ----------------------------------------------------------------------------------------------
// "vocab" loop order (hero_kernels/backends/cpp_launch.py:linear_vocab_backward): the row backward runs on a
// slice [v0, v0 + vc) of the vocabulary, each row's label moved into the slice; then the one column per row
// that stood in for the label is rewritten (slice_fix): the row kernel's label term would sum p over the slice
// only, and a column that is not the label must get the ordinary formula.
// ----------------------------------------------------------------------------------------------
HK_HD bool in_slice(int64_t y, int64_t v0, int64_t vc) { return y >= v0 && y < v0 + vc; }

// The slice-local label handed to the row kernel: -1 on masked rows (the row kernel runs with ignore_index -1:
// the user's may be a vocabulary id inside [0, vc), e.g. a pad id, where it would zero real rows), y - v0 when
// the label is in the slice, else 0 (an ordinary column that slice_fix rewrites).
HK_HD int64_t slice_col(int64_t y, int64_t v0, int64_t vc, int64_t ignore_index) {
  return y == ignore_index ? -1 : (in_slice(y, v0, vc) ? y - v0 : 0);
}

// A product rounded on its own: the CUDA build contracts a * b + c into an FMA unless told not to, and the
// slice fix must round as the torch ops it replaced (each op rounds; the CPU build passes -ffp-contract=off).
HK_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// dz of a (non-masked) row's slice column, in fp64. x: that column's z / tau rounded as the row kernel rounds
// it, read BEFORE the row kernel overwrites the slice in place. inside: the column is the row's label:
// (1/tau) [g (1 - p_y) - k p_y (log p_y + H)] with log p_y = the forward's logp when has_logp (accurate as
// p_y -> 1: the row's other columns are not all in the slice) and 1 - p_y = -expm1(log p_y); else an ordinary
// column -(1/tau) p (g + k (log p + H)), p = 0 giving 0 as in the row kernel.
HK_HD double slice_fix(double x, double lse, float H, float g, float k, bool has_logp, float logp, bool inside,
                       double inv_tau) {
  const double lq = x - lse;
  const double lp = inside && has_logp ? static_cast<double>(logp) : lq;
  const double p = exp(lp);
  const double ent = p > 0.0 ? mul_rn(p, lp + static_cast<double>(H)) : 0.0;
  const double k_ent = mul_rn(static_cast<double>(k), ent);
  const double d = inside ? mul_rn(static_cast<double>(g), -expm1(lp)) - k_ent
                          : -(mul_rn(static_cast<double>(g), p) + k_ent);
  return inv_tau * d;
}

}  // namespace hk
