// torch.library registration of the fused row kernels: namespace hero_kernels_cpp.
//
//   entropy_logprob_fwd(logits [N, V] or [B, T, V], labels [N] int64, inv_temperature, ignore_index, threads=0)
//       -> (logp, H fp32 [N], lse fp64 [N]: the backward splits it into fp32 hi + lo); rows with label ==
//       ignore_index give 0, rows with a label outside [0, V) NaN (the kernels guard the read; no host-side
//       pass over the labels).
//   entropy_logprob_bwd(logits, labels, lse, H, grad_logp, grad_H, inv_temperature, ignore_index, out!, threads=0)
//       writes dlogits into out [N, V] (dtype of logits, or fp32); out may be logits itself (in place).
//   entropy_logprob_slice_labels(z [n, vc], labels [n] int64, v0, inv_temperature, ignore_index, cols!, x!)
//       the "vocab" loop order (hero_kernels/backends/cpp_launch.py), before the row backward on the vocabulary
//       slice [v0, v0 + vc): cols [n] int64 = the slice-local labels it gets (-1 masked), x [n] fp64 = the
//       z / tau of each row's slice column, read before the row backward overwrites z in place.
//   entropy_logprob_slice_label_fix(dz [n, vc]!, labels, v0, x, lse, H, grad_logp, grad_H, logp?, inv_temperature,
//       ignore_index) after it: rewrites each non-masked row's slice column in place (hero_rowmath.h slice_fix).
//   grad_sketch_fwd(logits, labels, proj [k, V], inv_temperature, ignore_index) -> (a [N, k] fp32, stats [N, 2]
//       fp32 = the float64 lse as hi + lo); CPU only (grad_sketch_cpu.cpp). proj: float32 (float64 for float64
//       logits), contiguous.
//   grad_sketch_bwd(logits, labels, proj, a, stats, grad_a [N, k] fp32, inv_temperature, ignore_index, out!)
//       writes dlogits into out (dtype of logits, or fp32; may be logits itself).
//
// logits / out need unit column stride; any row and batch stride is fine (one launch for [B, T, V] views).
// Implementations: CPU (always), CUDA (when built with HK_WITH_CUDA), Meta (shapes only). No autograd here:
// the public ops in hero_kernels/ own it. Every check names the argument it rejects.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "hero_kernels.h"

#ifdef HK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;

int dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return hk::kF32;
    case at::kBFloat16:
      return hk::kBF16;
    case at::kHalf:
      return hk::kF16;
    case at::kDouble:
      return hk::kF64;
    default:
      TORCH_CHECK(false, "hero_kernels_cpp: ", name, " must be float32, bfloat16, float16 or float64, got ",
                  t.scalar_type());
  }
  return -1;
}

// Checks shared by forward and backward. logits: [N, V] or [B, T, V] (labels [N], N = B * T). Returns the
// dtype code of logits.
int check_logits_labels(const Tensor& logits, const Tensor& labels, c10::DeviceType dev, const char* op) {
  TORCH_CHECK(logits.device().type() == dev, op, ": logits must be on ", c10::DeviceTypeName(dev),
              ", got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, op, ": logits must be [N, V] or [B, T, V], got shape ",
              logits.sizes());
  const int64_t V = logits.size(-1);
  TORCH_CHECK(V >= 1, op, ": logits must have V >= 1 columns, got shape ", logits.sizes());
  TORCH_CHECK(logits.stride(-1) == 1 || V == 1, op,
              ": logits must be contiguous in the last dim (stride 1), got strides ", logits.strides());
  for (int64_t d = 0; d + 1 < logits.dim(); ++d)
    TORCH_CHECK(logits.stride(d) >= 0, op, ": logits must have non-negative strides, got ", logits.strides());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels must be on the device of logits (",
              logits.device(), "), got ", labels.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  const int64_t N = logits.numel() / V;
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N, op, ": labels must be [N] = [", N, "], got shape ",
              labels.sizes());
  return dtype_code(logits, "logits");
}

int64_t num_rows(const Tensor& logits) { return logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1); }

// Row i of a [N, V] or [B, T, V] tensor starts at layout.offset(i) (one launch for any batch stride).
hk::RowLayout layout_of(const Tensor& t) {
  if (t.dim() == 2) return hk::RowLayout{t.stride(0), INT64_MAX, 0};
  return hk::RowLayout{t.stride(1), std::max<int64_t>(t.size(1), 1), t.stride(0)};
}

void check_vec(const Tensor& t, const Tensor& logits, const char* name, const char* op,
               at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype == at::kDouble ? "float64" : "float32",
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == num_rows(logits), op, ": ", name, " must be [N] = [", num_rows(logits),
              "], got shape ", t.sizes());
}

void check_out(const Tensor& out, const Tensor& logits, const char* op) {
  TORCH_CHECK(out.device() == logits.device(), op, ": out must be on ", logits.device(), ", got ", out.device());
  TORCH_CHECK(out.sizes() == logits.sizes(), op, ": out must have the shape of logits ", logits.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == logits.scalar_type() || out.scalar_type() == at::kFloat, op,
              ": out must have the dtype of logits (", logits.scalar_type(), ") or float32, got ",
              out.scalar_type());
  const int64_t V = out.size(-1);
  TORCH_CHECK(out.stride(-1) == 1 || V == 1, op,
              ": out must be contiguous in the last dim (stride 1), got strides ", out.strides());
  const int64_t rows = out.dim() == 2 ? out.size(0) : out.size(1);
  const int64_t rs = out.dim() == 2 ? out.stride(0) : out.stride(1);
  TORCH_CHECK(rows <= 1 || rs >= V, op, ": out rows must not overlap (row stride >= V), got strides ", out.strides());
  TORCH_CHECK(out.dim() == 2 || out.size(0) <= 1 || out.stride(0) >= rows * rs, op,
              ": out batches must not overlap (batch stride >= T x row stride), got strides ", out.strides());
  if (out.is_same(logits) || out.data_ptr() == logits.data_ptr()) {
    TORCH_CHECK(out.scalar_type() == logits.scalar_type() && out.strides() == logits.strides(), op,
                ": in-place out must be logits itself (same dtype and strides)");
  }
}

// Rows per task: enough columns per task that OpenMP overhead is negligible.
int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// ------------------------------------------------------------------------------------------------
// CPU
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> fwd_cpu(const Tensor& logits, const Tensor& labels_in, double inv_temperature,
                                           int64_t ignore_index, int64_t /*threads: GPU only*/,
                                           int64_t /*grid: GPU only*/) {
  const char* op = "hero_kernels_cpp.entropy_logprob_fwd";
  const int dt = check_logits_labels(logits, labels_in, c10::DeviceType::CPU, op);
  const int64_t N = num_rows(logits), V = logits.size(-1);
  const Tensor labels = labels_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({N}, opts), H = at::empty({N}, opts), lse = at::empty({N}, opts.dtype(at::kDouble));
  if (N == 0) return {logp, H, lse};
  const void* z = logits.data_ptr();
  const hk::RowLayout rs = layout_of(logits);
  const int64_t* y = labels.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *h = H.data_ptr<float>();
  double* ls = lse.data_ptr<double>();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
    hk::cpu_fwd_rows(dt, z, rs, y, b, e, V, inv_temperature, ignore_index, lp, h, ls);
  });
  return {logp, H, lse};
}

void bwd_cpu(const Tensor& logits, const Tensor& labels_in, const Tensor& lse_in, const Tensor& H_in,
             const Tensor& grad_logp_in, const Tensor& grad_H_in, double inv_temperature, int64_t ignore_index,
             const Tensor& out, int64_t /*threads: GPU only*/, int64_t /*grid: GPU only*/) {
  const char* op = "hero_kernels_cpp.entropy_logprob_bwd";
  const int dt = check_logits_labels(logits, labels_in, c10::DeviceType::CPU, op);
  check_vec(lse_in, logits, "lse", op, at::kDouble);
  check_vec(H_in, logits, "H", op);
  check_vec(grad_logp_in, logits, "grad_logp", op);
  check_vec(grad_H_in, logits, "grad_H", op);
  check_out(out, logits, op);
  const int64_t N = num_rows(logits), V = logits.size(-1);
  if (N == 0) return;
  const Tensor labels = labels_in.contiguous(), lse = lse_in.contiguous(), H = H_in.contiguous();
  const Tensor g = grad_logp_in.contiguous(), k = grad_H_in.contiguous();
  const int odt = dtype_code(out, "out");
  const void* z = logits.data_ptr();
  void* o = out.data_ptr();
  const hk::RowLayout rs = layout_of(logits), ors = layout_of(out);
  const int64_t* y = labels.data_ptr<int64_t>();
  const double* pl = lse.data_ptr<double>();
  const float* ph = H.data_ptr<float>();
  const float *pg = g.data_ptr<float>(), *pk = k.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
    hk::cpu_bwd_rows(dt, z, rs, y, pl, ph, pg, pk, b, e, V, inv_temperature, ignore_index, odt, o, ors);
  });
}

// ------------------------------------------------------------------------------------------------
// "vocab" loop order: the slice label column (CPU and CUDA share the checks)
// ------------------------------------------------------------------------------------------------
void check_rows_out(const Tensor& t, const Tensor& z, at::ScalarType dtype, const char* name, const char* op) {
  TORCH_CHECK(t.device() == z.device() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == num_rows(z) &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dtype, " [n] = [", num_rows(z), "] tensor on ", z.device(),
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// Returns the dtype code of z.
int check_slice_labels(const Tensor& z, const Tensor& labels, const Tensor& cols, const Tensor& x,
                       c10::DeviceType dev, const char* op) {
  const int dt = check_logits_labels(z, labels, dev, op);
  check_rows_out(cols, z, at::kLong, "cols", op);
  check_rows_out(x, z, at::kDouble, "x", op);
  return dt;
}

int check_slice_fix(const Tensor& dz, const Tensor& labels, const Tensor& x, const Tensor& lse, const Tensor& H,
                    const Tensor& g, const Tensor& k, const c10::optional<Tensor>& logp, c10::DeviceType dev,
                    const char* op) {
  const int dt = check_logits_labels(dz, labels, dev, op);
  check_vec(x, dz, "x", op, at::kDouble);
  check_vec(lse, dz, "lse", op, at::kDouble);
  check_vec(H, dz, "H", op);
  check_vec(g, dz, "grad_logp", op);
  check_vec(k, dz, "grad_H", op);
  if (logp.has_value()) check_vec(*logp, dz, "logp", op);
  return dt;
}

void slice_labels_cpu(const Tensor& z, const Tensor& labels_in, int64_t v0, double inv_temperature,
                      int64_t ignore_index, const Tensor& cols, const Tensor& x) {
  const char* op = "hero_kernels_cpp.entropy_logprob_slice_labels";
  const int dt = check_slice_labels(z, labels_in, cols, x, c10::DeviceType::CPU, op);
  const Tensor labels = labels_in.contiguous();
  const int64_t n = num_rows(z), vc = z.size(-1);
  const void* pz = z.data_ptr();
  const hk::RowLayout L = layout_of(z);
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t* pc = cols.data_ptr<int64_t>();
  double* px = x.data_ptr<double>();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    hk::cpu_slice_labels_rows(dt, pz, L, y, b, e, v0, vc, inv_temperature, ignore_index, pc, px);
  });
}

void slice_label_fix_cpu(const Tensor& dz, const Tensor& labels_in, int64_t v0, const Tensor& x_in,
                         const Tensor& lse_in, const Tensor& H_in, const Tensor& g_in, const Tensor& k_in,
                         const c10::optional<Tensor>& logp_in, double inv_temperature, int64_t ignore_index) {
  const char* op = "hero_kernels_cpp.entropy_logprob_slice_label_fix";
  const int dt = check_slice_fix(dz, labels_in, x_in, lse_in, H_in, g_in, k_in, logp_in, c10::DeviceType::CPU, op);
  // contiguous: upstream grads may be stride-0 expands
  const Tensor labels = labels_in.contiguous(), x = x_in.contiguous(), lse = lse_in.contiguous();
  const Tensor H = H_in.contiguous(), g = g_in.contiguous(), k = k_in.contiguous();
  const Tensor logp = logp_in.has_value() ? logp_in->contiguous() : Tensor();
  const int64_t n = num_rows(dz), vc = dz.size(-1);
  void* pd = dz.data_ptr();
  const hk::RowLayout L = layout_of(dz);
  const float* pl = logp.defined() ? logp.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    hk::cpu_slice_label_fix_rows(dt, pd, L, labels.data_ptr<int64_t>(), b, e, v0, vc, x.data_ptr<double>(),
                                 lse.data_ptr<double>(), H.data_ptr<float>(), g.data_ptr<float>(),
                                 k.data_ptr<float>(), pl, inv_temperature, ignore_index);
  });
}

// ------------------------------------------------------------------------------------------------
// grad_sketch (CPU): the kernels' tile products go to torch's BLAS through this callback (MKL / OpenBLAS run
// single-threaded inside at::parallel_for's threads).
// ------------------------------------------------------------------------------------------------
void sketch_gemm(bool dbl, int64_t m, int64_t n, int64_t kd, const void* a, int64_t lda, const void* b, int64_t ldb,
                 bool b_trans, void* c, int64_t ldc, bool accumulate) {
  const auto opts = at::TensorOptions().dtype(dbl ? at::kDouble : at::kFloat);
  const Tensor A = at::from_blob(const_cast<void*>(a), {m, kd}, {lda, 1}, opts);
  const Tensor B = b_trans ? at::from_blob(const_cast<void*>(b), {n, kd}, {ldb, 1}, opts).t()
                           : at::from_blob(const_cast<void*>(b), {kd, n}, {ldb, 1}, opts);
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

void check_sketch_args(const Tensor& logits, const Tensor& proj, const Tensor* a, const Tensor* stats,
                       const Tensor* grad_a, int dt, const char* op) {
  const int64_t N = num_rows(logits), V = logits.size(-1);
  const auto pdt = dt == hk::kF64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(proj.device() == logits.device(), op, ": proj must be on ", logits.device(), ", got ", proj.device());
  TORCH_CHECK(proj.scalar_type() == pdt, op, ": proj must be ", pdt == at::kDouble ? "float64" : "float32",
              " for ", logits.scalar_type(), " logits, got ", proj.scalar_type());
  TORCH_CHECK(proj.dim() == 2 && proj.size(1) == V && proj.size(0) >= 1 && proj.is_contiguous(), op,
              ": proj must be a contiguous [k, V = ", V, "] tensor with k >= 1, got shape ", proj.sizes());
  const int64_t k = proj.size(0);
  const Tensor* nk[] = {a, grad_a};
  const char* names[] = {"a", "grad_a"};
  for (int i = 0; i < 2; ++i) {
    if (nk[i] == nullptr) continue;
    TORCH_CHECK(nk[i]->scalar_type() == at::kFloat && nk[i]->sizes() == at::IntArrayRef({N, k}) &&
                    nk[i]->device() == logits.device(),
                op, ": ", names[i], " must be float32 [N, k] = [", N, ", ", k, "] on ", logits.device(), ", got ",
                nk[i]->scalar_type(), " ", nk[i]->sizes());
  }
  if (stats != nullptr)
    TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->sizes() == at::IntArrayRef({N, 2}), op,
                ": stats must be float32 [N, 2] = [", N, ", 2], got ", stats->scalar_type(), " ", stats->sizes());
}

std::tuple<Tensor, Tensor> sketch_fwd_cpu(const Tensor& logits, const Tensor& labels_in, const Tensor& proj,
                                          double inv_temperature, int64_t ignore_index) {
  const char* op = "hero_kernels_cpp.grad_sketch_fwd";
  const int dt = check_logits_labels(logits, labels_in, c10::DeviceType::CPU, op);
  check_sketch_args(logits, proj, nullptr, nullptr, nullptr, dt, op);
  const int64_t N = num_rows(logits), V = logits.size(-1), k = proj.size(0);
  const Tensor labels = labels_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  Tensor a = at::empty({N, k}, opts), stats = at::empty({N, 2}, opts);
  const void* z = logits.data_ptr();
  const hk::RowLayout rs = layout_of(logits);
  const int64_t* y = labels.data_ptr<int64_t>();
  const void* P = proj.data_ptr();
  float *pa = a.data_ptr<float>(), *ps = stats.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
    hk::cpu_sketch_fwd_rows(dt, z, rs, y, b, e, V, P, k, inv_temperature, ignore_index, pa, ps,
                            hk::SketchGemm{&sketch_gemm});
  });
  return {a, stats};
}

void sketch_bwd_cpu(const Tensor& logits, const Tensor& labels_in, const Tensor& proj, const Tensor& a_in,
                    const Tensor& stats_in, const Tensor& grad_a_in, double inv_temperature, int64_t ignore_index,
                    const Tensor& out) {
  const char* op = "hero_kernels_cpp.grad_sketch_bwd";
  const int dt = check_logits_labels(logits, labels_in, c10::DeviceType::CPU, op);
  check_sketch_args(logits, proj, &a_in, &stats_in, &grad_a_in, dt, op);
  check_out(out, logits, op);
  const int64_t N = num_rows(logits), V = logits.size(-1), k = proj.size(0);
  if (N == 0) return;
  const Tensor labels = labels_in.contiguous(), a = a_in.contiguous(), stats = stats_in.contiguous();
  const Tensor ga = grad_a_in.contiguous();
  const int odt = dtype_code(out, "out");
  const void* z = logits.data_ptr();
  void* o = out.data_ptr();
  const hk::RowLayout rs = layout_of(logits), ors = layout_of(out);
  const int64_t* y = labels.data_ptr<int64_t>();
  const void* P = proj.data_ptr();
  const float *pa = a.data_ptr<float>(), *ps = stats.data_ptr<float>(), *pg = ga.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
    hk::cpu_sketch_bwd_rows(dt, z, rs, y, b, e, V, P, k, pa, ps, pg, inv_temperature, ignore_index, odt, o, ors,
                            hk::SketchGemm{&sketch_gemm});
  });
}

std::tuple<Tensor, Tensor> sketch_fwd_meta(const Tensor& logits, const Tensor& labels, const Tensor& proj, double,
                                           int64_t) {
  auto opts = logits.options().dtype(at::kFloat);
  const int64_t N = num_rows(logits);
  return {at::empty({N, proj.size(0)}, opts), at::empty({N, 2}, opts)};
}

void sketch_bwd_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                     int64_t, const Tensor&) {}

// ------------------------------------------------------------------------------------------------
// Meta (shape propagation for FakeTensor / torch.compile tracing)
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> fwd_meta(const Tensor& logits, const Tensor& labels, double, int64_t, int64_t,
                                            int64_t) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3,
              "hero_kernels_cpp.entropy_logprob_fwd: logits must be [N, V] or [B, T, V], got shape ", logits.sizes());
  auto opts = logits.options().dtype(at::kFloat);
  const int64_t N = num_rows(logits);
  return {at::empty({N}, opts), at::empty({N}, opts), at::empty({N}, opts.dtype(at::kDouble))};
}

void bwd_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
              int64_t, const Tensor&, int64_t, int64_t) {}

void slice_labels_meta(const Tensor&, const Tensor&, int64_t, double, int64_t, const Tensor&, const Tensor&) {}

void slice_label_fix_meta(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, const c10::optional<Tensor>&, double, int64_t) {}

// ------------------------------------------------------------------------------------------------
// CUDA
// ------------------------------------------------------------------------------------------------
#ifdef HK_WITH_CUDA
void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> fwd_cuda(const Tensor& logits, const Tensor& labels_in, double inv_temperature,
                                            int64_t ignore_index, int64_t threads, int64_t grid) {
  const char* op = "hero_kernels_cpp.entropy_logprob_fwd";
  const int dt = check_logits_labels(logits, labels_in, c10::DeviceType::CUDA, op);
  TORCH_CHECK(dt != hk::kF64, op, ": the cuda backend takes float32, bfloat16 or float16 logits, got float64");
  const int64_t N = num_rows(logits), V = logits.size(-1);
  c10::cuda::CUDAGuard guard(logits.device());
  const Tensor labels = labels_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({N}, opts), H = at::empty({N}, opts), lse = at::empty({N}, opts.dtype(at::kDouble));
  if (N == 0) return {logp, H, lse};
  auto stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  check_cuda(hk_cuda_entropy_logprob_fwd(dt, logits.data_ptr(), layout_of(logits), labels.data_ptr<int64_t>(), N, V,
                                         static_cast<float>(inv_temperature), ignore_index, logp.data_ptr<float>(),
                                         H.data_ptr<float>(), lse.data_ptr<double>(), static_cast<int>(threads),
                                         grid, stream),
             op);
  return {logp, H, lse};
}

void bwd_cuda(const Tensor& logits, const Tensor& labels_in, const Tensor& lse_in, const Tensor& H_in,
              const Tensor& grad_logp_in, const Tensor& grad_H_in, double inv_temperature, int64_t ignore_index,
              const Tensor& out, int64_t threads, int64_t grid) {
  const char* op = "hero_kernels_cpp.entropy_logprob_bwd";
  const int dt = check_logits_labels(logits, labels_in, c10::DeviceType::CUDA, op);
  TORCH_CHECK(dt != hk::kF64, op, ": the cuda backend takes float32, bfloat16 or float16 logits, got float64");
  check_vec(lse_in, logits, "lse", op, at::kDouble);
  check_vec(H_in, logits, "H", op);
  check_vec(grad_logp_in, logits, "grad_logp", op);
  check_vec(grad_H_in, logits, "grad_H", op);
  check_out(out, logits, op);
  const int64_t N = num_rows(logits), V = logits.size(-1);
  if (N == 0) return;
  c10::cuda::CUDAGuard guard(logits.device());
  const Tensor labels = labels_in.contiguous(), lse = lse_in.contiguous(), H = H_in.contiguous();
  const Tensor g = grad_logp_in.contiguous(), k = grad_H_in.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  check_cuda(hk_cuda_entropy_logprob_bwd(dt, logits.data_ptr(), layout_of(logits), labels.data_ptr<int64_t>(),
                                         lse.data_ptr<double>(), H.data_ptr<float>(), g.data_ptr<float>(),
                                         k.data_ptr<float>(), N, V, static_cast<float>(inv_temperature),
                                         ignore_index, dtype_code(out, "out"), out.data_ptr(), layout_of(out),
                                         static_cast<int>(threads), grid, stream),
             op);
}

void slice_labels_cuda(const Tensor& z, const Tensor& labels_in, int64_t v0, double inv_temperature,
                       int64_t ignore_index, const Tensor& cols, const Tensor& x) {
  const char* op = "hero_kernels_cpp.entropy_logprob_slice_labels";
  const int dt = check_slice_labels(z, labels_in, cols, x, c10::DeviceType::CUDA, op);
  TORCH_CHECK(dt != hk::kF64, op, ": the cuda backend takes float32, bfloat16 or float16 logits, got float64");
  c10::cuda::CUDAGuard guard(z.device());
  const Tensor labels = labels_in.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  check_cuda(hk_cuda_slice_labels(dt, z.data_ptr(), layout_of(z), labels.data_ptr<int64_t>(), num_rows(z), v0,
                                  z.size(-1), static_cast<float>(inv_temperature), ignore_index,
                                  cols.data_ptr<int64_t>(), x.data_ptr<double>(), stream),
             op);
}

void slice_label_fix_cuda(const Tensor& dz, const Tensor& labels_in, int64_t v0, const Tensor& x_in,
                          const Tensor& lse_in, const Tensor& H_in, const Tensor& g_in, const Tensor& k_in,
                          const c10::optional<Tensor>& logp_in, double inv_temperature, int64_t ignore_index) {
  const char* op = "hero_kernels_cpp.entropy_logprob_slice_label_fix";
  const int dt = check_slice_fix(dz, labels_in, x_in, lse_in, H_in, g_in, k_in, logp_in, c10::DeviceType::CUDA, op);
  TORCH_CHECK(dt != hk::kF64, op, ": the cuda backend takes float32, bfloat16 or float16 dz, got float64");
  c10::cuda::CUDAGuard guard(dz.device());
  // contiguous: upstream grads may be stride-0 expands
  const Tensor labels = labels_in.contiguous(), x = x_in.contiguous(), lse = lse_in.contiguous();
  const Tensor H = H_in.contiguous(), g = g_in.contiguous(), k = k_in.contiguous();
  const Tensor logp = logp_in.has_value() ? logp_in->contiguous() : Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream(dz.device().index()).stream();
  check_cuda(hk_cuda_slice_label_fix(dt, dz.data_ptr(), layout_of(dz), labels.data_ptr<int64_t>(), num_rows(dz), v0,
                                     dz.size(-1), x.data_ptr<double>(), lse.data_ptr<double>(), H.data_ptr<float>(),
                                     g.data_ptr<float>(), k.data_ptr<float>(),
                                     logp.defined() ? logp.data_ptr<float>() : nullptr, inv_temperature,
                                     ignore_index, stream),
             op);
}
#endif

}  // namespace

TORCH_LIBRARY(hero_kernels_cpp, m) {
  // threads: CUDA threads per row block, grid: row blocks launched (rows beyond it are looped over), both from
  // the Python launch plan (0: chosen here from V / N); ignored on CPU.
  m.def("entropy_logprob_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index, int threads=0, "
        "int grid=0) -> (Tensor, Tensor, Tensor)");
  m.def("entropy_logprob_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor H, Tensor grad_logp, "
        "Tensor grad_H, float inv_temperature, int ignore_index, Tensor(a!) out, int threads=0, int grid=0) -> ()");
  m.def("entropy_logprob_slice_labels(Tensor z, Tensor labels, int v0, float inv_temperature, int ignore_index, "
        "Tensor(a!) cols, Tensor(b!) x) -> ()");
  m.def("entropy_logprob_slice_label_fix(Tensor(a!) dz, Tensor labels, int v0, Tensor x, Tensor lse, Tensor H, "
        "Tensor grad_logp, Tensor grad_H, Tensor? logp, float inv_temperature, int ignore_index) -> ()");
  m.def("grad_sketch_fwd(Tensor logits, Tensor labels, Tensor proj, float inv_temperature, int ignore_index) -> "
        "(Tensor, Tensor)");
  m.def("grad_sketch_bwd(Tensor logits, Tensor labels, Tensor proj, Tensor a, Tensor stats, Tensor grad_a, "
        "float inv_temperature, int ignore_index, Tensor(a!) out) -> ()");
  // Lets Python ask what this build contains without touching a device.
  m.def("built_with_cuda() -> bool", []() -> bool {
#ifdef HK_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

TORCH_LIBRARY_IMPL(hero_kernels_cpp, CPU, m) {
  m.impl("entropy_logprob_fwd", &fwd_cpu);
  m.impl("entropy_logprob_bwd", &bwd_cpu);
  m.impl("entropy_logprob_slice_labels", &slice_labels_cpu);
  m.impl("entropy_logprob_slice_label_fix", &slice_label_fix_cpu);
  m.impl("grad_sketch_fwd", &sketch_fwd_cpu);
  m.impl("grad_sketch_bwd", &sketch_bwd_cpu);
}

TORCH_LIBRARY_IMPL(hero_kernels_cpp, Meta, m) {
  m.impl("entropy_logprob_fwd", &fwd_meta);
  m.impl("entropy_logprob_bwd", &bwd_meta);
  m.impl("entropy_logprob_slice_labels", &slice_labels_meta);
  m.impl("entropy_logprob_slice_label_fix", &slice_label_fix_meta);
  m.impl("grad_sketch_fwd", &sketch_fwd_meta);
  m.impl("grad_sketch_bwd", &sketch_bwd_meta);
}

#ifdef HK_WITH_CUDA
TORCH_LIBRARY_IMPL(hero_kernels_cpp, CUDA, m) {
  m.impl("entropy_logprob_fwd", &fwd_cuda);
  m.impl("entropy_logprob_bwd", &bwd_cuda);
  m.impl("entropy_logprob_slice_labels", &slice_labels_cuda);
  m.impl("entropy_logprob_slice_label_fix", &slice_label_fix_cuda);
}
#endif
