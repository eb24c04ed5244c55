// muon_momentum_: Muon's momentum EMA and the Nesterov combination in one pass.
//
//   buf <- lerp(buf, grad, 1 - beta);  nesterov_out <- lerp(grad, buf, beta)   (if requested)
//
// Bytes per element: read buf and grad, write buf (and nesterov_out): 2 sizeof(B) + sizeof(G) (+ sizeof(B)).
//
// muon_momentum_stack_: the same for P matrices of one shape bucket in one multi-tensor launch, writing
// each Newton–Schulz input (Nesterov combination, or the new buffer) into its slice of one (P, m, n)
// stack of dtype O: 2 sizeof(B) + sizeof(G) + sizeof(O) per element, no temporary, no copy. With
// partials != nullptr each block also writes the sum of squares of the values it stored to
// partials[matrix * max_chunks + chunk] (no atomics: deterministic), and muon_stack_normalize then
// computes each matrix's denominator safety·sqrt(Σ its partials) + eps once (matrix_denominators_kernel,
// as the Newton–Schulz prologue) and divides the matrix by it in place: 2 sizeof(O) per element.

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"
#include "multi_tensor.cuh"

namespace fastoptim {
namespace {

template <typename B, typename G>
__global__ void muon_momentum_kernel(B* __restrict__ buf, const G* __restrict__ grad, B* __restrict__ nesterov_out,
                                     int64_t numel, float beta, float one_minus_beta) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    // The reference rounds the new buffer to B before the Nesterov lerp reads it; so do we.
    // one_minus_beta is 1 - beta rounded once from double (the reference's scalar), not 1.0f - beta.
    const float g = to_float(from_float<B>(to_float(grad[i])));
    const B updated = from_float<B>(lerp(to_float(buf[i]), g, one_minus_beta));
    buf[i] = updated;
    if (nesterov_out != nullptr) nesterov_out[i] = from_float<B>(lerp(g, to_float(updated), beta));
  }
}

template <typename B, typename G, typename O>
__global__ void muon_momentum_stack_kernel(TensorTable table, float beta, float one_minus_beta, bool nesterov,
                                           float* partials,
                                           const char* out_base, int64_t matrix_bytes, int64_t max_chunks) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t chunk = table.block_chunk[blockIdx.x];
  const int64_t start = chunk * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  B* buf = static_cast<B*>(table.ptr[0][t]);
  const G* grad = static_cast<const G*>(table.ptr[1][t]);
  O* out = static_cast<O*>(table.ptr[2][t]);
  float sum_squares = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = to_float(from_float<B>(to_float(grad[i])));
    const B updated = from_float<B>(lerp(to_float(buf[i]), g, one_minus_beta));
    buf[i] = updated;
    // As the reference: the Nesterov value is rounded to buf's dtype, then cast to the stack's.
    const B ns_input = nesterov ? from_float<B>(lerp(g, to_float(updated), beta)) : updated;
    const O stored = from_float<O>(to_float(ns_input));
    out[i] = stored;
    const float value = to_float(stored);
    sum_squares += value * value;
  }
  if (partials != nullptr) {  // uniform across the block: block_sum's barriers are safe
    sum_squares = block_sum(sum_squares);
    if (threadIdx.x == 0) {
      const int64_t matrix = (reinterpret_cast<const char*>(out) - out_base) / matrix_bytes;
      partials[matrix * max_chunks + chunk] = sum_squares;
    }
  }
}

template <typename O>
__global__ void muon_stack_normalize_kernel(O* __restrict__ out, const float* __restrict__ denominators,
                                            int64_t numel) {
  const int64_t matrix = blockIdx.y;
  const float denominator = denominators[matrix];
  O* values = out + matrix * numel;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    values[i] = from_float<O>(to_float(values[i]) / denominator);
  }
}

}  // namespace

cudaError_t launch_muon_momentum_stack(void* const* bufs, DType buf_dtype, void* const* grads, DType grad_dtype,
                                       void* const* outs, DType out_dtype, const int64_t* numels, int64_t count,
                                       float beta, float one_minus_beta, bool nesterov, float* partials,
                                       const void* out_base, int64_t matrix_bytes, int64_t max_chunks,
                                       cudaStream_t stream) {
  void* const* lists[3] = {bufs, grads, outs};
  constexpr int kStackThreads = 512;
  return dispatch_dtype(buf_dtype, [&](auto b_tag) {
    using B = decltype(b_tag);
    return dispatch_dtype(grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      return dispatch_dtype(out_dtype, [&](auto o_tag) {
        using O = decltype(o_tag);
        return for_each_table(lists, 3, numels, count, [&](const TensorTable& table, int blocks) {
          muon_momentum_stack_kernel<B, G, O><<<blocks, kStackThreads, 0, stream>>>(
              table, beta, one_minus_beta, nesterov, partials, static_cast<const char*>(out_base), matrix_bytes,
              max_chunks);
          return cudaGetLastError();
        });
      });
    });
  });
}

cudaError_t launch_muon_stack_normalize(void* out, DType out_dtype, const float* partials, float* denominators,
                                       int64_t matrices, int64_t numel, int64_t max_chunks, float safety, float eps,
                                       cudaStream_t stream) {
  if (matrices == 0 || numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  constexpr int64_t kMaxGridY = 65535;
  matrix_denominators_kernel<<<grid_for(matrices, 1, 65535 * 8), kThreads, 0, stream>>>(
      partials, denominators, max_chunks, matrices, safety, eps);
  const cudaError_t launch = cudaGetLastError();
  if (launch != cudaSuccess) return launch;
  return dispatch_dtype(out_dtype, [&](auto o_tag) {
    using O = decltype(o_tag);
    // gridDim.y holds at most 65535 matrices: longer stacks go in slices.
    for (int64_t first = 0; first < matrices; first += kMaxGridY) {
      const int64_t slice = matrices - first < kMaxGridY ? matrices - first : kMaxGridY;
      const dim3 grid(grid_for(numel, kThreads), static_cast<unsigned>(slice));
      muon_stack_normalize_kernel<O><<<grid, kThreads, 0, stream>>>(static_cast<O*>(out) + first * numel,
                                                                    denominators + first, numel);
      const cudaError_t error = cudaGetLastError();
      if (error != cudaSuccess) return error;
    }
    return cudaSuccess;
  });
}

cudaError_t launch_muon_momentum(void* buf, DType buf_dtype, const void* grad, DType grad_dtype, void* nesterov_out,
                                 int64_t numel, float beta, float one_minus_beta, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = grid_for(numel, kThreads);
  return dispatch_dtype(buf_dtype, [&](auto b_tag) {
    using B = decltype(b_tag);
    return dispatch_dtype(grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      muon_momentum_kernel<B, G><<<blocks, kThreads, 0, stream>>>(
          static_cast<B*>(buf), static_cast<const G*>(grad), static_cast<B*>(nesterov_out), numel, beta,
          one_minus_beta);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastoptim
