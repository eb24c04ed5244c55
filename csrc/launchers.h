// Plain launchers of the .cu files: raw pointers, sizes and a stream; no torch types.
// Scalars derived from the hyper-parameters (1 - beta, 1 - lr*wd, lr*scale) are computed by the caller in
// double and rounded once to float, as torch rounds the reference's Python-float scalars; the kernels never
// recombine rounded floats (1.0f - beta differs from float(1 - beta) in the last bits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtypes.cuh"

namespace fastoptim {

// p <- p*keep [cautious: only where update*p >= 0]; p <- p - step*update (keep = 1 - lr*wd, step = lr*scale).
// Contiguous, numel each.
cudaError_t launch_muon_apply(void* param, DType param_dtype, const void* update, DType update_dtype,
                              int64_t numel, float keep, float step, bool cautious, cudaStream_t stream);

}  // namespace fastoptim

namespace fastoptim {

// The step's scalars keep = 1 - lr*wd and step = lr*scale. The float path gives them rounded once from double
// (lr_device = weight_decay_device = nullptr). With lr and/or weight decay on the device (a 0-dim fp32 tensor:
// a scheduler's lr, no host synchronization, capturable in a CUDA graph), each block computes keep and step in
// fp32 from the loaded value(s), taking lr / weight_decay from the fields for the one given as a number; that
// may differ in the last bit from the float path.
struct StepScalars {
  float keep;
  float step;
  float lr;
  float weight_decay;
  float scale;
  const float* lr_device;            // nullable
  const float* weight_decay_device;  // nullable
};

// muon_apply over a shape bucket: params[i] (count of them, contiguous, numel elements each, of param_dtypes[i])
// steps by the i-th (numel-element) matrix of the contiguous stack `updates`.
cudaError_t launch_muon_apply_stack(void* const* params, const DType* param_dtypes, const void* updates,
                                    DType update_dtype, int64_t count, int64_t numel, StepScalars scalars,
                                    bool cautious, cudaStream_t stream);

// normuon_step over a shape bucket: params[i] (contiguous m*n elements of param_dtypes[i]) steps by the i-th
// (m, n) matrix of the contiguous stack `updates`, with its own row moments second_moments[i] (m fp32) and
// Frobenius norms. workspace: 2*(count*m + count) fp32, uninitialized (row sums, then per-matrix norms).
cudaError_t launch_normuon_step_stack(void* const* params, const DType* param_dtypes, float* const* second_moments,
                                      const void* updates, DType update_dtype, float* workspace, int64_t count,
                                      int64_t m, int64_t n, StepScalars scalars, float one_minus_beta2, float eps,
                                      bool cautious, cudaStream_t stream);

}  // namespace fastoptim

namespace fastoptim {

// buf <- lerp(buf, grad, one_minus_beta); nesterov_out (nullable, buf's dtype) <- lerp(grad, buf, beta).
cudaError_t launch_muon_momentum(void* buf, DType buf_dtype, const void* grad, DType grad_dtype, void* nesterov_out,
                                 int64_t numel, float beta, float one_minus_beta, cudaStream_t stream);

// muon_momentum over `count` contiguous tensors (bufs of buf_dtype, grads of grad_dtype), each writing its
// Newton–Schulz input into outs[i] (out_dtype; a slice of one stack; not written when store_out is false).
// partials (nullable): (matrices, 2·max_chunks) fp32, receives each chunk's sum of squares of the stored values
// (of the values before their cast when store_out is false) and then each chunk's exponent (the sum is
// partial·4^exponent; overflow-safe, common.cuh); matrix = (outs[i] - out_base) / matrix_bytes.
cudaError_t launch_muon_momentum_stack(void* const* bufs, DType buf_dtype, void* const* grads, DType grad_dtype,
                                       void* const* outs, DType out_dtype, const int64_t* numels, int64_t count,
                                       float beta, float one_minus_beta, bool nesterov, float* partials,
                                       bool store_out, const void* out_base, int64_t matrix_bytes,
                                       int64_t max_chunks, cudaStream_t stream);

// out[i] <- out[i] / (safety·‖out[i]‖_F + eps) for a contiguous (matrices, numel) stack, from the partials.
// denominators: 2·matrices fp32, uninitialized (each matrix's denominator, then its scale, computed once).
cudaError_t launch_muon_stack_normalize(void* out, DType out_dtype, const float* partials, float* denominators,
                                       int64_t matrices, int64_t numel, int64_t max_chunks, float safety, float eps,
                                       cudaStream_t stream);

// denominators (2·matrices fp32) <- each matrix's safety·‖·‖_F + eps, then its scale, from the partials of
// launch_muon_momentum_stack (what launch_muon_stack_normalize computes first).
cudaError_t launch_matrix_denominators(const float* partials, float* denominators, int64_t matrices,
                                       int64_t max_chunks, float safety, float eps, cudaStream_t stream);

// After launch_muon_momentum_stack with store_out false (a float16 stack) and launch_matrix_denominators:
// outs[i] <- U_i / (safety·‖U_i‖_F + eps) with U_i recomputed from the new bufs[i] (and grads[i]).
cudaError_t launch_muon_stack_recompute(void* const* bufs, DType buf_dtype, void* const* grads, DType grad_dtype,
                                       void* const* outs, DType out_dtype, const int64_t* numels, int64_t count,
                                       float beta, bool nesterov, const float* denominators, int64_t matrices,
                                       const void* out_base, int64_t matrix_bytes, cudaStream_t stream);

// NorMuon on a contiguous (batch, m, n) stack; second_moment (batch*m) fp32; workspace: 2*(batch*m + batch)
// fp32, uninitialized (row sums, then per-matrix norms; no atomics). keep = 1 - lr*wd,
// one_minus_beta2 = 1 - beta2, step = lr*scale.
cudaError_t launch_normuon_step(void* param, DType param_dtype, const void* update, DType update_dtype,
                                float* second_moment, float* workspace, int64_t batch, int64_t m, int64_t n,
                                float keep, float one_minus_beta2, float eps, float step, bool cautious,
                                cudaStream_t stream);

// Sophia over `count` contiguous tensors: params/grads of param_dtype, exp_avgs/hessians of state_dtype.
// unclipped (nullable): device counter incremented by the number of coordinates with |ratio| < 1.
cudaError_t launch_sophia_step(void* const* params, DType param_dtype, void* const* grads, void* const* exp_avgs,
                               void* const* hessians, DType state_dtype, const int64_t* numels, int64_t count,
                               float lr, float one_minus_beta1, float rho, float keep, float eps,
                               unsigned long long* unclipped, cudaStream_t stream);

// h <- lerp(h, estimate cast to h's dtype, one_minus_beta2) over `count` contiguous tensors.
cudaError_t launch_hessian_ema(void* const* hessians, DType hessian_dtype, void* const* estimates,
                               DType estimate_dtype, const int64_t* numels, int64_t count, float one_minus_beta2,
                               cudaStream_t stream);

}  // namespace fastoptim

namespace fastoptim {

// X = G / (safety·‖G‖_F + eps) per matrix of a strided (batch, m, n) stack G, written contiguous in
// out_dtype. workspace: ns_prologue_workspace_floats(batch, m, n) fp32, uninitialized (per-block partial
// sums, then the denominators: no atomics, bit-reproducible).
int64_t ns_prologue_workspace_floats(int64_t batch, int64_t m, int64_t n);
cudaError_t launch_ns_prologue(const void* g, DType g_dtype, void* out, DType out_dtype, float* workspace,
                               int64_t batch, int64_t m, int64_t n, int64_t batch_stride, int64_t row_stride,
                               int64_t col_stride, float safety, float eps, cudaStream_t stream);

}  // namespace fastoptim

namespace fastoptim {

// C = alpha * X Xᵀ + beta * D (transposed: X is k x s, C = alpha * XᵀX + beta * D), upper-triangle tiles on
// tensor cores, each written with its mirror. X: bf16/fp16 (dtype), batch x s x k with the given batch and row
// strides (elements; the last dimension contiguous). out and addend (nullable, ignored when beta == 0): batch x
// s x s of dtype (fp32 for the _fp32_out variant), rows contiguous, matrices out_batch_stride apart.
cudaError_t launch_symmetric_gemm(const void* x, void* out, const void* addend, DType dtype, int64_t batch,
                                  int64_t s, int64_t k, int64_t x_batch_stride, int64_t x_row_stride,
                                  int64_t out_batch_stride, bool transposed, float alpha, float beta,
                                  cudaStream_t stream);
cudaError_t launch_symmetric_gemm_fp32_out(const void* x, float* out, const float* addend, DType dtype,
                                           int64_t batch, int64_t s, int64_t k, int64_t x_batch_stride,
                                           int64_t x_row_stride, int64_t out_batch_stride, bool transposed,
                                           float alpha, float beta, cudaStream_t stream);

}  // namespace fastoptim

namespace fastoptim {

// D = alpha·op(P)·op(Q) + beta·C on cuBLASLt (csrc/gemm_lt.cu), row-major batches: op(P) is M x K (P stored
// M x K, or K x M when trans_p), op(Q) is K x N (stored K x N, or N x K when trans_q); leading dimensions
// (row strides) and batch strides in elements, last dimensions contiguous. C (nullable when beta == 0) has D's
// layout and may be D; D must not overlap P or Q. dtype: all four. allow_tf32: float32 on TF32 tensor cores.
// workspace (nullable): workspace_bytes of device memory, at most lt_workspace_bytes() used.
// kDone: enqueued on `stream`. kDeclined: nothing written (no cuBLASLt in this build, no algorithm for the
// problem, an error status before the launch): run a fallback. kFailed: a later batch chunk failed after the
// first ran (D partly written): raise.
enum class LtResult : int { kDone = 0, kDeclined = 1, kFailed = 2 };
bool lt_available();
int64_t lt_workspace_bytes();
LtResult lt_gemm(DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const void* P, int64_t ld_p,
                 int64_t stride_p, bool trans_p, const void* Q, int64_t ld_q, int64_t stride_q, bool trans_q,
                 const void* C, void* D, int64_t ld_d, int64_t stride_d, float alpha, float beta, bool allow_tf32,
                 void* workspace, int64_t workspace_bytes, cudaStream_t stream);

}  // namespace fastoptim
