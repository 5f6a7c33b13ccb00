// CPU-only helpers shared by the C++ row kernels (entropy_logprob_cpu.cpp, grad_sketch_cpu.cpp): the
// target_clones attribute of the multiversioned entry points, the 16-bit storage types with branch-free
// (vectorizable) conversions, and the masked / bad-label row writers. Torch-free like the kernels.
#pragma once

#include <cstring>

#include "hero_kernels.h"
#include "hero_rowmath.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && \
    !defined(HK_NO_CLONES)
#define HK_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define HK_CLONES
#endif

// On the lambdas that run inside an entry point: a lambda body is a function of its own, compiled for the baseline
// target unless it is inlined into each target_clones variant (the forward tile loop measured 2.2x slower).
#if defined(__GNUC__)
#define HK_LAMBDA_INLINE __attribute__((always_inline))
#else
#define HK_LAMBDA_INLINE
#endif

namespace hk {

// ---------------------------------------------------------------------------------------------
// storage types and branch-free (vectorizable) conversions, round-to-nearest-even like torch
// ---------------------------------------------------------------------------------------------
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

template <typename T>
struct AccOf {
  using type = float;  // fp32 math for fp32 / bf16 / fp16 storage
};
template <>
struct AccOf<double> {
  using type = double;  // fp64 inputs keep fp64 math
};

HK_HD float to_acc(float v) { return v; }
HK_HD double to_acc(double v) { return v; }
HK_HD float to_acc(bf16_t v) { return bits_f32(static_cast<uint32_t>(v.x) << 16); }

// Half -> float: shift the 15 exponent+mantissa bits into float position and multiply by 2^112 to
// rebias the exponent; this is exact for normal AND subnormal halves. Inf/NaN get an all-ones exponent.
HK_HD float to_acc(f16_t v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t shifted = em << 13;
  const float scaled = bits_f32(shifted) * 5.192296858534828e33f;  // 2^112
  const uint32_t mag = em >= 0x7c00u ? (shifted | 0x7f800000u) : f32_bits(scaled);
  return bits_f32(sign | mag);
}

template <typename O>
HK_HD O from_acc(float v);
template <typename O>
HK_HD O from_acc(double v);

template <>
HK_HD float from_acc<float>(float v) {
  return v;
}
template <>
HK_HD double from_acc<double>(double v) {
  return v;
}
template <>
HK_HD bf16_t from_acc<bf16_t>(float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}

// Float -> half, round to nearest even:
//  |v| >= 65520 (after rounding) -> inf; NaN -> quiet NaN;
//  normal range: rebias the exponent and round the 13 dropped mantissa bits (0xfff + lsb trick);
//  subnormal range (|v| < 2^-14): adding 0.5f puts |v| at the ulp of 0.5 (= 2^-24, the half subnormal
//  step) so the FPU does the rounding; the low bits of the sum are the half's bits.
template <>
HK_HD f16_t from_acc<f16_t>(float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // 0xc8000000 = (15 - 127) << 23
  const float sub_f = bits_f32(a) + 0.5f;
  const uint32_t sub = f32_bits(sub_f) - 0x3f000000u;
  uint32_t h = a < 0x38800000u ? sub : normal;
  h = a >= 0x47800000u ? 0x7c00u : h;  // >= 65536: overflow (65520..65536 already rounds to 0x7c00)
  h = a > 0x7f800000u ? 0x7e00u : h;   // NaN
  return f16_t{static_cast<uint16_t>(sign | h)};
}

template <typename O>
HK_HD void zero_row(O* out, int64_t V) {
  std::memset(static_cast<void*>(out), 0, static_cast<size_t>(V) * sizeof(O));  // all-zero bits == +0
}

template <typename O>
HK_HD void nan_row(O* out, int64_t V) {
  const O v = from_acc<O>(static_cast<typename AccOf<O>::type>(NAN));
  for (int64_t j = 0; j < V; ++j) out[j] = v;
}

// x = z / tau of one block into buf [n] (one separately rounded product, hero_rowmath.h), returning its max.
template <typename T, typename A>
HK_HD A scale_block(const T* z, int n, A inv_tau, A* buf) {
  A bm = neg_inf<A>();
#pragma omp simd reduction(max : bm)
  for (int j = 0; j < n; ++j) {
    const A x = scale_(to_acc(z[j]), inv_tau);
    buf[j] = x;
    bm = bm > x ? bm : x;
  }
  return bm;
}

// A scalar scan for NaN: the rare path of a block without a finite max (every column -inf, or NaN among -inf),
// so a NaN still reaches the row's result.
template <typename A>
HK_HD bool any_nan(const A* buf, int n) {
  bool nan = false;
  for (int j = 0; j < n; ++j) nan = nan || buf[j] != buf[j];
  return nan;
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch of the entry points (overloads per storage type; the bindings check dtypes first)
// ---------------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for the storage type T of a DType code; an unknown code calls nothing.
template <typename F>
HK_HD void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32:
      return f(TypeTag<float>{});
    case kBF16:
      return f(TypeTag<bf16_t>{});
    case kF16:
      return f(TypeTag<f16_t>{});
    case kF64:
      return f(TypeTag<double>{});
    default:
      return;
  }
}

// f(TypeTag<T>{}, TypeTag<O>{}) for logits of `dtype` written as `out_dtype`: O = T, or fp32 for 16-bit logits
// (the fused head keeps dlogits in fp32); any other pair calls nothing.
template <typename F>
HK_HD void with_in_out(int dtype, int out_dtype, F&& f) {
  if (out_dtype == dtype) return with_dtype(dtype, [&](auto t) { f(t, t); });
  if (out_dtype != kF32) return;
  if (dtype == kBF16) f(TypeTag<bf16_t>{}, TypeTag<float>{});
  if (dtype == kF16) f(TypeTag<f16_t>{}, TypeTag<float>{});
}

// A label outside [0, V) that is not ignore_index: NaN outputs / a NaN gradient row, never a wild read.
// (The Python op raises on such labels first under hero_kernels.checks(labels=True), the default.)
HK_HD bool bad_label(int64_t y, int64_t V) { return y < 0 || y >= V; }

}  // namespace hk
