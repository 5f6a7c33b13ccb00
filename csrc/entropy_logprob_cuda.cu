// CUDA kernels of entropy_logprob: forward (logp, H, lse) and backward (dlogits), one block per row.
//
// Pure CUDA (no torch headers): bindings.cpp calls the extern "C" launchers at the bottom with raw
// pointers, strides, sizes and the current stream, and tests compile this file alone with nvcc for
// sm_80 / sm_90a to check registers and spills (hero_kernels.gpu_compile.nvcc_resource_usage).
//
// Memory traffic is the floor of docs/design.md section 5: the forward reads each row once, the backward reads
// it once and writes dlogits once (in place allowed). Per row:
//  * the row is walked with 16-byte vector loads (8 bf16/fp16 or 4 fp32 per load), two loads in flight
//    per thread; a scalar head reaches the first 16-byte boundary (any row stride works) and a scalar
//    tail finishes the row;
//  * each thread keeps an online partial (m, r = s - 1, u) in fp32 (hero_rowmath.h), rescaling only when
//    a chunk raises its max (one extra exp per raise, not per element);
//  * partials merge across the warp with shuffles, then across warps through shared memory;
//  * row offsets are int64 (rows * stride can exceed 2^31 elements);
//  * __launch_bounds__(kThreads, 1024 / kThreads) caps registers at 64 (>= 1024 resident threads per SM,
//    32 KB of loads in flight): left alone, nvcc 13 squeezed the 512-thread backward to 40 registers on
//    sm_90a and spilled to the stack.
// A label outside [0, V) that is not ignore_index gives NaN outputs / a NaN row instead of a wild read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "hero_kernels.h"
#include "hero_rowmath.h"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename O>
__device__ __forceinline__ O from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

// N elements moved as one (or two) 16-byte transactions.
template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// ------------------------------------------------------------------------------------------------
// block reductions
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ hk::Partial<float> warp_merge(hk::Partial<float> p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    hk::Partial<float> o;
    o.m = __shfl_xor_sync(kFullMask, p.m, off);
    o.r = __shfl_xor_sync(kFullMask, p.r, off);
    o.u = __shfl_xor_sync(kFullMask, p.u, off);
    p = hk::merge(p, o);
  }
  return p;
}

// Result valid in every thread. Every warp repeats the second level (a few shuffles) instead of only
// warp 0: shuffles under a divergent branch compile to a called slow path with a stack frame.
// The shared buffer is free for reuse after the caller's next __syncthreads.
template <int kThreads>
__device__ __forceinline__ hk::Partial<float> block_merge(hk::Partial<float> p, hk::Partial<float>* smem) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  p = warp_merge(p);
  if (lane == 0) smem[warp] = p;
  __syncthreads();
  p = lane < kWarps ? smem[lane] : hk::empty_partial<float>();
  return warp_merge(p);
}

template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : 0.f;  // every warp: see block_merge
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Elements before the first 16-byte boundary of the row (pointers are at least element-aligned).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t V) {
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) & 15u) / sizeof(T));
  const int64_t head = mis ? static_cast<int64_t>(16 / sizeof(T)) - mis : 0;
  return head < V ? head : V;
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ __forceinline__ void fwd_chunk(hk::Partial<float>& st, const Pack<T, VEC>& v, float inv_tau) {
  float x[VEC];
  float lm = hk::neg_inf<float>();
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    x[k] = hk::scale_(to_f(v.v[k]), inv_tau);
    lm = fmaxf(lm, x[k]);  // fmaxf drops NaN: a NaN column poisons r through its e instead
  }
  if (lm <= st.m && st.m > hk::neg_inf<float>()) {
    // Common path (every chunk after the first few): the max stands and its column is elsewhere, so every
    // column here (ties with the max included, e = 1) adds its e to r. 4 FP ops + 1 MUFU per element; a
    // -inf column (d = -inf, e = 0) adds 0 through the clamp, a NaN one NaN.
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = x[k] - st.m;
      const float e = hk::exp_(d);
      st.r += e;
      st.u += fmaxf(d, -128.f) * e;
    }
    return;
  }
  // Rare path: this chunk raises the max (one extra exp), or nothing but -inf / NaN was seen so far.
  // Exactly one column at the new max is the designated argmax: ties are counted apart (exact).
  st = hk::raise_max(st, lm);
  if (st.m == hk::neg_inf<float>()) {  // still nothing but -inf (or NaN): keep a NaN in r (poisoned)
#pragma unroll
    for (int k = 0; k < VEC; ++k) st.r += x[k] == hk::neg_inf<float>() ? 0.f : nan_f();
    return;
  }
  float ties = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) hk::add_column(st, x[k], ties);
  hk::settle_ties(st, ties, 1.f);
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    entropy_logprob_fwd_kernel(const T* __restrict__ logits, hk::RowLayout layout, const int64_t* __restrict__ labels,
                               int64_t N, int64_t V, float inv_tau, int64_t ignore_index, float* __restrict__ out_logp,
                               float* __restrict__ out_H, double* __restrict__ out_lse) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ hk::Partial<float> smem[kThreads / 32];
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = labels[row];
    if (y == ignore_index || y < 0 || y >= V) {  // uniform across the block: no barrier skipped unevenly
      if (tid == 0) {
        const float fill = y == ignore_index ? 0.f : nan_f();
        out_logp[row] = fill;
        out_H[row] = fill;
        out_lse[row] = fill;
      }
      continue;
    }
    const T* z = logits + layout.offset(row);
    hk::Partial<float> st = hk::empty_partial<float>();
    const int64_t head = head_elems(z, V);
    if (tid < head) hk::push(st, hk::scale_(to_f(z[tid]), inv_tau));
    const int64_t nvec = (V - head) / VEC;
    const Pack<T, VEC>* zv = reinterpret_cast<const Pack<T, VEC>*>(z + head);
    int64_t i = tid;
    for (; i + kThreads < nvec; i += 2 * kThreads) {  // two 16-byte loads in flight per thread
      const Pack<T, VEC> a = zv[i];
      const Pack<T, VEC> b = zv[i + kThreads];
      fwd_chunk<T, VEC>(st, a, inv_tau);
      fwd_chunk<T, VEC>(st, b, inv_tau);
    }
    if (i < nvec) fwd_chunk<T, VEC>(st, zv[i], inv_tau);
    for (int64_t j = head + nvec * VEC + tid; j < V; j += kThreads) hk::push(st, hk::scale_(to_f(z[j]), inv_tau));

    st = block_merge<kThreads>(st, smem);
    if (tid == 0) {
      float lse, H;
      hk::finalize(st, lse, H);
      out_lse[row] = hk::lse_wide(st);  // double: the backward splits it, no fp32 rounding of lse
      out_H[row] = H;
      out_logp[row] = hk::logprob(st, hk::scale_(to_f(z[y]), inv_tau));
    }
    __syncthreads();  // smem is reused by the next row
  }
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------
struct RowGrad {
  hk::LseSplit<float> lse;
  hk::GradCoef<float> coef;
  int32_t y;  // label column (< V < 2^31): one int32 compare per element
};

template <typename O>
__device__ __forceinline__ O grad_at(float x, int32_t j, const RowGrad& r, float& q) {
  const float lq = hk::log_q(x, r.lse.hi, r.lse.lo);
  const float p = hk::prob(lq);
  q += j != r.y ? p : 0.f;
  return from_f<O>(hk::grad_other(lq, p, r.coef));
}

template <typename T, typename O, int VEC>
__device__ __forceinline__ void bwd_chunk(const Pack<T, VEC>& v, Pack<O, VEC>& w, int32_t j0, const RowGrad& r,
                                          float inv_tau, float& q) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) w.v[k] = grad_at<O>(hk::scale_(to_f(v.v[k]), inv_tau), j0 + k, r, q);
}

template <typename T, typename O, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    entropy_logprob_bwd_kernel(const T* logits, hk::RowLayout layout, const int64_t* __restrict__ labels,
                               const double* __restrict__ lse, const float* __restrict__ H,
                               const float* __restrict__ grad_logp, const float* __restrict__ grad_H, int64_t N,
                               int64_t V, float inv_tau, int64_t ignore_index, O* out, hk::RowLayout out_layout) {
  // logits and out are NOT __restrict__: out may be logits (in-place backward).
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float smem[kThreads / 32];
  __shared__ float smem_xy;  // x_y lives in shared memory: a register held across the row loop got spilled
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = labels[row];
    O* o = out + out_layout.offset(row);
    if (y == ignore_index || y < 0 || y >= V) {
      const O fill = from_f<O>(y == ignore_index ? 0.f : nan_f());
      for (int64_t j = tid; j < V; j += kThreads) o[j] = fill;
      continue;
    }
    const T* z = logits + layout.offset(row);
    if (tid == 0) smem_xy = hk::scale_(to_f(z[y]), inv_tau);
    __syncthreads();  // in place: z[y] is read before any thread overwrites it
    const float H_r = H[row], g_r = grad_logp[row], k_r = grad_H[row];
    const RowGrad r{hk::split_lse<float>(lse[row]), hk::grad_coef(H_r, g_r, k_r, inv_tau), static_cast<int32_t>(y)};
    float q = 0.f;  // sum_{j != y} p_j
    const int64_t head = head_elems(z, V);
    const bool vec_ok = ((reinterpret_cast<uintptr_t>(o + head) & 15u) == 0);
    if (vec_ok) {
      if (tid < head) o[tid] = grad_at<O>(hk::scale_(to_f(z[tid]), inv_tau), tid, r, q);
      const int32_t h32 = static_cast<int32_t>(head);
      const int64_t nvec = (V - head) / VEC;
      const Pack<T, VEC>* zv = reinterpret_cast<const Pack<T, VEC>*>(z + head);
      Pack<O, VEC>* ov = reinterpret_cast<Pack<O, VEC>*>(o + head);
      int64_t i = tid;
      for (; i + kThreads < nvec; i += 2 * kThreads) {
        const Pack<T, VEC> a = zv[i];
        const Pack<T, VEC> b = zv[i + kThreads];
        Pack<O, VEC> wa, wb;
        bwd_chunk<T, O, VEC>(a, wa, h32 + static_cast<int32_t>(i) * VEC, r, inv_tau, q);
        bwd_chunk<T, O, VEC>(b, wb, h32 + static_cast<int32_t>(i + kThreads) * VEC, r, inv_tau, q);
        ov[i] = wa;
        ov[i + kThreads] = wb;
      }
      if (i < nvec) {
        const Pack<T, VEC> a = zv[i];
        Pack<O, VEC> wa;
        bwd_chunk<T, O, VEC>(a, wa, h32 + static_cast<int32_t>(i) * VEC, r, inv_tau, q);
        ov[i] = wa;
      }
      for (int64_t j = head + nvec * VEC + tid; j < V; j += kThreads)
        o[j] = grad_at<O>(hk::scale_(to_f(z[j]), inv_tau), static_cast<int32_t>(j), r, q);
    } else {  // out's 16-byte phase differs from the logits': coalesced scalar path
      for (int64_t j = tid; j < V; j += kThreads)
        o[j] = grad_at<O>(hk::scale_(to_f(z[j]), inv_tau), static_cast<int32_t>(j), r, q);
    }
    q = block_sum<kThreads>(q, smem);  // its barrier orders every thread's o[y] write before thread 0's
    if (tid == 0) o[y] = from_f<O>(hk::grad_label(hk::log_q(smem_xy, r.lse.hi, r.lse.lo), q, H_r, g_r, k_r, inv_tau));
    __syncthreads();  // smem is reused by the next row
  }
}

// ------------------------------------------------------------------------------------------------
// "vocab" loop order: one thread per row, one column of it (hero_rowmath.h slice_col / slice_fix). Two
// launches per vocab slice around the row kernel instead of ~20 small torch ops.
// ------------------------------------------------------------------------------------------------
constexpr int kSliceThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSliceThreads)
    slice_labels_kernel(const T* __restrict__ z, hk::RowLayout layout, const int64_t* __restrict__ labels, int64_t n,
                        int64_t v0, int64_t vc, float inv_tau, int64_t ignore_index, int64_t* __restrict__ cols,
                        double* __restrict__ x) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSliceThreads + threadIdx.x;
  if (i >= n) return;
  const int64_t c = hk::slice_col(labels[i], v0, vc, ignore_index);
  cols[i] = c;
  x[i] = c < 0 ? 0.0 : static_cast<double>(hk::scale_(to_f(z[layout.offset(i) + c]), inv_tau));
}

template <typename O>
__global__ void __launch_bounds__(kSliceThreads)
    slice_label_fix_kernel(O* __restrict__ dz, hk::RowLayout layout, const int64_t* __restrict__ labels, int64_t n,
                           int64_t v0, int64_t vc, const double* __restrict__ x, const double* __restrict__ lse,
                           const float* __restrict__ H, const float* __restrict__ g, const float* __restrict__ k,
                           const float* __restrict__ logp, double inv_tau, int64_t ignore_index) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSliceThreads + threadIdx.x;
  if (i >= n) return;
  const int64_t y = labels[i], c = hk::slice_col(y, v0, vc, ignore_index);
  if (c < 0) return;  // masked: the row kernel zeroed the whole row
  const double d = hk::slice_fix(x[i], lse[i], H[i], g[i], k[i], logp != nullptr, logp ? logp[i] : 0.f,
                                 hk::in_slice(y, v0, vc), inv_tau);
  dz[layout.offset(i) + c] = from_f<O>(static_cast<float>(d));  // fp64 -> fp32 -> 16 bit, as torch casts
}

inline unsigned slice_blocks(int64_t n) { return static_cast<unsigned>((n + kSliceThreads - 1) / kSliceThreads); }

// ------------------------------------------------------------------------------------------------
// launch configuration
// ------------------------------------------------------------------------------------------------
// Threads per row from the number of 16-byte vectors when the caller passes 0 (the Python launch plan,
// hero_kernels/backends/cuda/entropy_logprob.py:plan, passes its own choice).
inline int threads_for(int64_t V, int elem_bytes, int requested) {
  if (requested == 128 || requested == 256 || requested == 512) return requested;
  const int64_t nvec = V / (16 / elem_bytes);
  if (nvec < 1024) return 128;
  if (nvec < 8192) return 256;
  return 512;
}

// Row blocks: the plan's (hero_kernels/backends/cuda/entropy_logprob.py:plan) when given, else N; never past
// gridDim.x's limit (the kernels loop over rows beyond the grid).
inline unsigned grid_for(int64_t N, int64_t requested) {
  const int64_t cap = 2147483647;
  const int64_t g = requested > 0 ? requested : N;
  return static_cast<unsigned>(g < cap ? g : cap);
}

template <typename T>
cudaError_t launch_fwd(const void* logits, hk::RowLayout L, const int64_t* labels, int64_t N, int64_t V,
                       float inv_tau, int64_t ig, float* logp, float* H, double* lse, int threads,
                       int64_t grid_rows, cudaStream_t stream) {
  const T* z = static_cast<const T*>(logits);
  const dim3 grid(grid_for(N, grid_rows));
  switch (threads_for(V, sizeof(T), threads)) {
    case 128:
      entropy_logprob_fwd_kernel<T, 128><<<grid, 128, 0, stream>>>(z, L, labels, N, V, inv_tau, ig, logp, H, lse);
      break;
    case 256:
      entropy_logprob_fwd_kernel<T, 256><<<grid, 256, 0, stream>>>(z, L, labels, N, V, inv_tau, ig, logp, H, lse);
      break;
    default:
      entropy_logprob_fwd_kernel<T, 512><<<grid, 512, 0, stream>>>(z, L, labels, N, V, inv_tau, ig, logp, H, lse);
      break;
  }
  return cudaGetLastError();
}

template <typename T, typename O>
cudaError_t launch_bwd(const void* logits, hk::RowLayout L, const int64_t* labels, const double* lse, const float* H,
                       const float* g, const float* k, int64_t N, int64_t V, float inv_tau, int64_t ig, void* out,
                       hk::RowLayout OL, int threads, int64_t grid_rows, cudaStream_t stream) {
  const T* z = static_cast<const T*>(logits);
  O* o = static_cast<O*>(out);
  const dim3 grid(grid_for(N, grid_rows));
  switch (threads_for(V, sizeof(T), threads)) {
    case 128:
      entropy_logprob_bwd_kernel<T, O, 128>
          <<<grid, 128, 0, stream>>>(z, L, labels, lse, H, g, k, N, V, inv_tau, ig, o, OL);
      break;
    case 256:
      entropy_logprob_bwd_kernel<T, O, 256>
          <<<grid, 256, 0, stream>>>(z, L, labels, lse, H, g, k, N, V, inv_tau, ig, o, OL);
      break;
    default:
      entropy_logprob_bwd_kernel<T, O, 512>
          <<<grid, 512, 0, stream>>>(z, L, labels, lse, H, g, k, N, V, inv_tau, ig, o, OL);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t hk_cuda_entropy_logprob_fwd(int dtype, const void* logits, hk::RowLayout layout,
                                                   const int64_t* labels, int64_t N, int64_t V, float inv_tau,
                                                   int64_t ignore_index, float* logp, float* H, double* lse,
                                                   int threads, int64_t grid, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
#define HK_FWD(T) \
  return launch_fwd<T>(logits, layout, labels, N, V, inv_tau, ignore_index, logp, H, lse, threads, grid, stream)
  switch (dtype) {
    case hk::kF32:
      HK_FWD(float);
    case hk::kBF16:
      HK_FWD(__nv_bfloat16);
    case hk::kF16:
      HK_FWD(__half);
    default:
      return cudaErrorInvalidValue;
  }
#undef HK_FWD
}

extern "C" cudaError_t hk_cuda_entropy_logprob_bwd(int dtype, const void* logits, hk::RowLayout layout,
                                                   const int64_t* labels, const double* lse, const float* H,
                                                   const float* grad_logp, const float* grad_H, int64_t N,
                                                   int64_t V, float inv_tau, int64_t ignore_index, int out_dtype,
                                                   void* out, hk::RowLayout out_layout, int threads,
                                                   int64_t grid, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
#define HK_BWD(T, O)                                                                                        \
  return launch_bwd<T, O>(logits, layout, labels, lse, H, grad_logp, grad_H, N, V, inv_tau, ignore_index, \
                          out, out_layout, threads, grid, stream)
  if (out_dtype == dtype) {
    switch (dtype) {
      case hk::kF32:
        HK_BWD(float, float);
      case hk::kBF16:
        HK_BWD(__nv_bfloat16, __nv_bfloat16);
      case hk::kF16:
        HK_BWD(__half, __half);
      default:
        return cudaErrorInvalidValue;
    }
  }
  if (out_dtype == hk::kF32) {
    switch (dtype) {
      case hk::kBF16:
        HK_BWD(__nv_bfloat16, float);
      case hk::kF16:
        HK_BWD(__half, float);
      default:
        return cudaErrorInvalidValue;
    }
  }
#undef HK_BWD
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t hk_cuda_slice_labels(int dtype, const void* z, hk::RowLayout layout, const int64_t* labels,
                                            int64_t n, int64_t v0, int64_t vc, float inv_tau, int64_t ignore_index,
                                            int64_t* cols, double* x, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
#define HK_SLICE(T)                                                                                            \
  slice_labels_kernel<T><<<slice_blocks(n), kSliceThreads, 0, stream>>>(static_cast<const T*>(z), layout, labels, \
                                                                        n, v0, vc, inv_tau, ignore_index, cols, x); \
  return cudaGetLastError()
  switch (dtype) {
    case hk::kF32:
      HK_SLICE(float);
    case hk::kBF16:
      HK_SLICE(__nv_bfloat16);
    case hk::kF16:
      HK_SLICE(__half);
    default:
      return cudaErrorInvalidValue;
  }
#undef HK_SLICE
}

extern "C" cudaError_t hk_cuda_slice_label_fix(int dtype, void* dz, hk::RowLayout layout, const int64_t* labels,
                                               int64_t n, int64_t v0, int64_t vc, const double* x,
                                               const double* lse, const float* H, const float* grad_logp,
                                               const float* grad_H, const float* logp, double inv_tau,
                                               int64_t ignore_index, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
#define HK_FIX(O)                                                                                                \
  slice_label_fix_kernel<O><<<slice_blocks(n), kSliceThreads, 0, stream>>>(                                      \
      static_cast<O*>(dz), layout, labels, n, v0, vc, x, lse, H, grad_logp, grad_H, logp, inv_tau, ignore_index); \
  return cudaGetLastError()
  switch (dtype) {
    case hk::kF32:
      HK_FIX(float);
    case hk::kBF16:
      HK_FIX(__nv_bfloat16);
    case hk::kF16:
      HK_FIX(__half);
    default:
      return cudaErrorInvalidValue;
  }
#undef HK_FIX
}
