// Torch-free entry points of the row kernels, shared by bindings.cpp and the two backends.
//
// Everything takes raw pointers, element strides and sizes so that entropy_logprob_cpu.cpp and
// entropy_logprob_cuda.cu compile without torch headers (fast builds, nvcc resource checks in CI).
// Layout: logits / out are [N, V] or [B, T, V] (N = B * T) with unit column stride and any row and batch
// strides (in elements, see RowLayout); labels are int64 [N]; H, grad_logp, grad_H, logp are
// contiguous fp32 [N]; lse is contiguous fp64 [N] (hero_rowmath.h: the backward splits it, no ulp(lse) error).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define HK_LAYOUT_FN __host__ __device__ __forceinline__
#else
#define HK_LAYOUT_FN inline
#endif

namespace hk {

// Element type codes (the bindings map torch dtypes to these).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// Where row i (of N = B * T) starts: [B, T, V] views of any batch stride (the causal shift
// logits[:, :-1]) run in one launch. [N, V] is rows_per_batch = INT64_MAX, batch_stride = 0.
struct RowLayout {
  int64_t row_stride;
  int64_t rows_per_batch;
  int64_t batch_stride;
  HK_LAYOUT_FN int64_t offset(int64_t i) const {
    return (i / rows_per_batch) * batch_stride + (i % rows_per_batch) * row_stride;
  }
};

// ---- CPU (entropy_logprob_cpu.cpp): process rows [row_begin, row_end) on the calling thread. ----
void cpu_fwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, int64_t row_begin,
                  int64_t row_end, int64_t V, double inv_tau, int64_t ignore_index, float* logp, float* H,
                  double* lse);

// out_dtype is dtype or kF32 (the fused LM-head path keeps dlogits in fp32). out may alias logits
// (in-place backward) when both have the same dtype and row stride.
void cpu_bwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, const double* lse,
                  const float* H, const float* grad_logp, const float* grad_H, int64_t row_begin, int64_t row_end,
                  int64_t V, double inv_tau, int64_t ignore_index, int out_dtype, void* out,
                  RowLayout out_layout);

// ---- CPU "vocab" loop order (hero_rowmath.h: slice_col / slice_fix): rows [row_begin, row_end) of a [n, vc]
// slice of the vocabulary starting at column v0. ----
// Before the row kernel: cols [n] = the slice-local labels it gets (slice_col), x [n] fp64 = the z / tau of
// each row's slice column (0 on masked rows), read before the row kernel overwrites the slice in place.
void cpu_slice_labels_rows(int dtype, const void* z, RowLayout layout, const int64_t* labels, int64_t row_begin,
                           int64_t row_end, int64_t v0, int64_t vc, double inv_tau, int64_t ignore_index,
                           int64_t* cols, double* x);

// After it: dz (dtype `dtype`, in place) at each non-masked row's slice column = slice_fix in fp64, rounded
// to fp32 first (as torch casts fp64 to 16-bit types). logp may be null (no forward logp: 1 - e^{x_y - lse}).
void cpu_slice_label_fix_rows(int dtype, void* dz, RowLayout layout, const int64_t* labels, int64_t row_begin,
                              int64_t row_end, int64_t v0, int64_t vc, const double* x, const double* lse,
                              const float* H, const float* grad_logp, const float* grad_H, const float* logp,
                              double inv_tau, int64_t ignore_index);

// ---- CPU grad_sketch (grad_sketch_cpu.cpp): rows [row_begin, row_end) on the calling thread. ----
// The vocabulary is walked in tiles; the [rows, tile] x [tile, k] products go through `gemm` (the bindings
// hand in torch's BLAS), everything elementwise runs here. Element type of E / proj / buffers: float, or
// double for kF64 logits (`dbl`).
// gemm: C[m, n] = (accumulate ? C : 0) + A[m, kd] @ op(B), all row-major with leading dims in elements;
// op(B) = B [kd, n] (ldb), or with b_trans B^T where B is [n, kd] (ldb).
struct SketchGemm {
  void (*fn)(bool dbl, int64_t m, int64_t n, int64_t kd, const void* a, int64_t lda, const void* b, int64_t ldb,
             bool b_trans, void* c, int64_t ldc, bool accumulate);
};

// a [N, k] fp32 = (1/tau) (proj[:, y] - proj p), stats [N, 2] fp32 = (hi, lo): the float64 lse of x = z / tau as
// hi + lo. proj: contiguous [k, V], float (double for kF64). Masked rows 0, bad labels / rows without a
// distribution NaN.
void cpu_sketch_fwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, int64_t row_begin,
                         int64_t row_end, int64_t V, const void* proj, int64_t k, double inv_tau,
                         int64_t ignore_index, float* a, float* stats, SketchGemm gemm);

// dz = -(p / tau^2) (proj^T v - (proj p) . v) into out (dtype or kF32, may alias logits), v = grad_a [N, k] fp32,
// p from stats, (proj p) . v = v . proj[:, y] - tau (v . a) from the forward's a.
void cpu_sketch_bwd_rows(int dtype, const void* logits, RowLayout layout, const int64_t* labels, int64_t row_begin,
                         int64_t row_end, int64_t V, const void* proj, int64_t k, const float* a,
                         const float* stats, const float* grad_a, double inv_tau, int64_t ignore_index,
                         int out_dtype, void* out, RowLayout out_layout, SketchGemm gemm);

}  // namespace hk

#if defined(HK_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

// ---- CUDA (entropy_logprob_cuda.cu): asynchronous launches on `stream`; return the launch status. ----
// A label outside [0, V) that is not ignore_index cannot be checked on the host without a sync; the
// kernels write NaN for such a row instead of reading out of bounds.
// threads: threads per row block (128 / 256 / 512), grid: row blocks (the kernels loop over rows beyond it), both
// from the Python launch plan; 0 picks from V / N.
extern "C" cudaError_t hk_cuda_entropy_logprob_fwd(int dtype, const void* logits, hk::RowLayout layout,
                                                   const int64_t* labels, int64_t N, int64_t V, float inv_tau,
                                                   int64_t ignore_index, float* logp, float* H, double* lse,
                                                   int threads, int64_t grid, cudaStream_t stream);

extern "C" cudaError_t hk_cuda_entropy_logprob_bwd(int dtype, const void* logits, hk::RowLayout layout,
                                                   const int64_t* labels, const double* lse, const float* H,
                                                   const float* grad_logp, const float* grad_H, int64_t N,
                                                   int64_t V, float inv_tau, int64_t ignore_index, int out_dtype,
                                                   void* out, hk::RowLayout out_layout, int threads,
                                                   int64_t grid, cudaStream_t stream);

// The "vocab" order's two one-thread-per-row kernels (the CPU entries above, same arguments, rows [0, n)).
extern "C" cudaError_t hk_cuda_slice_labels(int dtype, const void* z, hk::RowLayout layout, const int64_t* labels,
                                            int64_t n, int64_t v0, int64_t vc, float inv_tau, int64_t ignore_index,
                                            int64_t* cols, double* x, cudaStream_t stream);

extern "C" cudaError_t hk_cuda_slice_label_fix(int dtype, void* dz, hk::RowLayout layout, const int64_t* labels,
                                               int64_t n, int64_t v0, int64_t vc, const double* x,
                                               const double* lse, const float* H, const float* grad_logp,
                                               const float* grad_H, const float* logp, double inv_tau,
                                               int64_t ignore_index, cudaStream_t stream);
#endif
