// Torch-free entry points of the row kernels, shared by bindings.cpp and the two backends.
//
// Everything takes raw pointers, element strides and sizes so that entropy_logprob_cpu.cpp and
// entropy_logprob_cuda.cu compile without torch headers (fast builds, nvcc resource checks in CI).
// Layout: logits / out are [N, V] with unit column stride and any row stride (in elements);
// labels are int64 [N]; lse, H, grad_logp, grad_H, logp are contiguous fp32 [N].
#pragma once

#include <stdint.h>

namespace hk {

// Element type codes (the bindings map torch dtypes to these).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// ---- CPU (entropy_logprob_cpu.cpp): process rows [row_begin, row_end) on the calling thread. ----
void cpu_fwd_rows(int dtype, const void* logits, int64_t row_stride, const int64_t* labels, int64_t row_begin,
                  int64_t row_end, int64_t V, double inv_tau, int64_t ignore_index, float* logp, float* H,
                  float* lse);

// out_dtype is dtype or kF32 (the fused LM-head path keeps dlogits in fp32). out may alias logits
// (in-place backward) when both have the same dtype and row stride.
void cpu_bwd_rows(int dtype, const void* logits, int64_t row_stride, const int64_t* labels, const float* lse,
                  const float* H, const float* grad_logp, const float* grad_H, int64_t row_begin, int64_t row_end,
                  int64_t V, double inv_tau, int64_t ignore_index, int out_dtype, void* out,
                  int64_t out_row_stride);

}  // namespace hk

#if defined(HK_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

// ---- CUDA (entropy_logprob_cuda.cu): asynchronous launches on `stream`; return the launch status. ----
// A label outside [0, V) that is not ignore_index cannot be checked on the host without a sync; the
// kernels write NaN for such a row instead of reading out of bounds.
extern "C" cudaError_t hk_cuda_entropy_logprob_fwd(int dtype, const void* logits, int64_t row_stride,
                                                   const int64_t* labels, int64_t N, int64_t V, float inv_tau,
                                                   int64_t ignore_index, float* logp, float* H, float* lse,
                                                   cudaStream_t stream);

extern "C" cudaError_t hk_cuda_entropy_logprob_bwd(int dtype, const void* logits, int64_t row_stride,
                                                   const int64_t* labels, const float* lse, const float* H,
                                                   const float* grad_logp, const float* grad_H, int64_t N,
                                                   int64_t V, float inv_tau, int64_t ignore_index, int out_dtype,
                                                   void* out, int64_t out_row_stride, cudaStream_t stream);
#endif
