// normuon_step_: NorMuon's row normalization of an orthogonalized update O (B stacked m x n
// matrices) and the parameter step, in two passes over O (arXiv:2510.05491; fastoptim.reference).
//
// Pass 1, one block per row i of matrix b:
//   s_i = sum_j O_ij^2;  v_i <- lerp(v_i, s_i / n, 1 - beta2)
//   norms[b]     += s_i                               (= ||O||_F^2)
//   norms[B + b] += s_i / (sqrt(v_i) + eps)^2         (= ||Ô||_F^2: no second reduction over O)
// Pass 2, one block per row:
//   Ô_ij = O_ij / (sqrt(v_i) + eps) * ||O|| / (||Ô|| + eps)
//   p_ij <- p_ij (1 - lr wd) - lr scale Ô_ij       (cautious: decay only where Ô_ij p_ij >= 0)
// Bytes per element: O read twice, p read and written once: 2 sizeof(U) + 2 sizeof(P) (+ 8 B per row).
// O is read in 16-byte vectors (4 fp32 / 8 bf16) when rows are long enough and aligned.
// The row arithmetic lives in common.cuh, shared with apply_stack.cu (a shape bucket's list of parameters).

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

// row_sums (2·rows): Σ_j O_ij² of each row, then the same for Ô (Σ_j O_ij² / (√v_i + eps)²); summed per
// matrix by matrix_norms_kernel (common.cuh) in a fixed order (no atomics: bit-reproducible from run to run).
template <typename U, bool kPacked>
__global__ void normuon_row_stats_kernel(const U* __restrict__ update, float* __restrict__ second_moment,
                                         float* __restrict__ row_sums, int64_t rows, int64_t n,
                                         float one_minus_beta2, float eps) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float sum = block_sum(normuon_row_sum_share<U, kPacked>(update + row * n, n));
    if (threadIdx.x == 0) {
      normuon_row_moment(sum, n, second_moment + row, one_minus_beta2, eps, row_sums + row, row_sums + rows + row);
    }
  }
}

template <typename P, typename U, bool kPacked>
__global__ void normuon_apply_kernel(P* __restrict__ param, const U* __restrict__ update,
                                     const float* __restrict__ second_moment, const float* __restrict__ norms,
                                     int64_t rows, int64_t m, int64_t n, int64_t batch, float keep, float step,
                                     float eps, bool cautious) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / m;
    normuon_apply_row<P, U, kPacked>(param + row * n, update + row * n, n, second_moment[row], norms[b],
                                     norms[batch + b], keep, step, eps, cautious);
  }
}

}  // namespace

cudaError_t launch_normuon_step(void* param, DType param_dtype, const void* update, DType update_dtype,
                                float* second_moment, float* workspace, int64_t batch, int64_t m, int64_t n,
                                float keep, float one_minus_beta2, float eps, float step, bool cautious,
                                cudaStream_t stream) {
  const int64_t rows = batch * m;
  if (rows == 0) return cudaSuccess;
  float* row_sums = workspace;          // (2, rows)
  float* norms = workspace + 2 * rows;  // (2, batch)
  const int threads = normuon_threads_for_row(n);
  const unsigned blocks = static_cast<unsigned>(rows < 65535 * 8 ? rows : 65535 * 8);
  cudaError_t err = dispatch_dtype(update_dtype, [&](auto u_tag) {
    using U = decltype(u_tag);
    const bool packed = n % kVec<U> == 0 && aligned_for_pack<U, kVec<U>>(update);
    if (packed) {
      normuon_row_stats_kernel<U, true><<<blocks, threads, 0, stream>>>(
          static_cast<const U*>(update), second_moment, row_sums, rows, n, one_minus_beta2, eps);
    } else {
      normuon_row_stats_kernel<U, false><<<blocks, threads, 0, stream>>>(
          static_cast<const U*>(update), second_moment, row_sums, rows, n, one_minus_beta2, eps);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess || n == 0) return err;
  matrix_norms_kernel<<<grid_for(batch, 1, 65535 * 8), 256, 0, stream>>>(row_sums, norms, rows, m, batch);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return dispatch_dtype(param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return dispatch_dtype(update_dtype, [&](auto u_tag) {
      using U = decltype(u_tag);
      constexpr int N = kVec<U>;
      const bool packed = n % N == 0 && aligned_for_pack<U, N>(update) && aligned_for_pack<P, N>(param);
      if (packed) {
        normuon_apply_kernel<P, U, true><<<blocks, threads, 0, stream>>>(
            static_cast<P*>(param), static_cast<const U*>(update), second_moment, norms, rows, m, n, batch, keep,
            step, eps, cautious);
      } else {
        normuon_apply_kernel<P, U, false><<<blocks, threads, 0, stream>>>(
            static_cast<P*>(param), static_cast<const U*>(update), second_moment, norms, rows, m, n, batch, keep,
            step, eps, cautious);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace fastoptim
