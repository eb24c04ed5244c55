// The Newton–Schulz prologue: X = G / (safety·‖G‖_F + eps), per matrix of a stack, cast to the compute
// dtype, in two passes over G (fastoptim.reference.newton_schulz).
//
// Pass 1 (grid: chunks x batch): partial sums of G² of each matrix, one per block, into partials[b, chunk].
// Then (grid: matrices) denominators[b] = safety·sqrt(Σ partials[b]) + eps, summed in a fixed order: no
//   atomics, so the result is bit-reproducible from run to run.
// Pass 2 (grid: chunks x batch): out[b, i, j] = G[b, i, j] / denominators[b], written contiguous in the
//   compute dtype.
// G is read through its strides (batch, row, column), so a transposed view is not copied.
// Bytes: 2 reads of G + 1 write of X: 2·sizeof(G) + sizeof(X) per element; fp32 arithmetic.

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * 1024;  // elements per block

template <typename G>
__global__ void sum_squares_kernel(const G* __restrict__ g, float* __restrict__ partials, int64_t chunks, int64_t n,
                                   int64_t numel_per_matrix, int64_t batch_stride, int64_t row_stride,
                                   int64_t col_stride) {
  const int64_t b = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(start + kChunk, numel_per_matrix);
  const G* base = g + b * batch_stride;
  float sum = 0.0f;
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
    const int64_t i = e / n;
    const int64_t j = e - i * n;
    const float x = to_float(base[i * row_stride + j * col_stride]);
    sum += x * x;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[b * chunks + blockIdx.x] = sum;
}


template <typename G, typename X>
__global__ void scale_cast_kernel(const G* __restrict__ g, X* __restrict__ out,
                                  const float* __restrict__ denominators, int64_t n, int64_t numel_per_matrix,
                                  int64_t batch_stride, int64_t row_stride, int64_t col_stride) {
  const int64_t b = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(start + kChunk, numel_per_matrix);
  const G* base = g + b * batch_stride;
  X* target = out + b * numel_per_matrix;
  const float denom = denominators[b];
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
    const int64_t i = e / n;
    const int64_t j = e - i * n;
    target[e] = from_float<X>(to_float(base[i * row_stride + j * col_stride]) / denom);
  }
}

}  // namespace

int64_t ns_prologue_workspace_floats(int64_t batch, int64_t m, int64_t n) {
  return batch * ((m * n + kChunk - 1) / kChunk + 1);
}

cudaError_t launch_ns_prologue(const void* g, DType g_dtype, void* out, DType out_dtype, float* workspace,
                               int64_t batch, int64_t m, int64_t n, int64_t batch_stride, int64_t row_stride,
                               int64_t col_stride, float safety, float eps, cudaStream_t stream) {
  const int64_t numel = m * n;
  if (batch == 0 || numel == 0) return cudaSuccess;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  float* partials = workspace;                       // (batch, chunks)
  float* denominators = workspace + batch * chunks;  // (batch)
  int64_t remaining = batch;
  int64_t first = 0;
  // gridDim.y is at most 65535: long stacks go in slices.
  while (remaining > 0) {
    const int64_t slice = remaining < 65535 ? remaining : 65535;
    const dim3 grid(static_cast<unsigned>((numel + kChunk - 1) / kChunk), static_cast<unsigned>(slice));
    cudaError_t err = dispatch_dtype(g_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      const G* g_slice = static_cast<const G*>(g) + first * batch_stride;
      sum_squares_kernel<G><<<grid, kThreads, 0, stream>>>(g_slice, partials + first * chunks, chunks, n, numel,
                                                           batch_stride, row_stride, col_stride);
      cudaError_t launch = cudaGetLastError();
      if (launch != cudaSuccess) return launch;
      matrix_denominators_kernel<<<grid_for(slice, 1, 65535 * 8), kThreads, 0, stream>>>(
          partials + first * chunks, denominators + first, chunks, slice, safety, eps);
      launch = cudaGetLastError();
      if (launch != cudaSuccess) return launch;
      return dispatch_dtype(out_dtype, [&](auto x_tag) {
        using X = decltype(x_tag);
        scale_cast_kernel<G, X><<<grid, kThreads, 0, stream>>>(g_slice, static_cast<X*>(out) + first * numel,
                                                               denominators + first, n, numel, batch_stride,
                                                               row_stride, col_stride);
        return cudaGetLastError();
      });
    });
    if (err != cudaSuccess) return err;
    first += slice;
    remaining -= slice;
  }
  return cudaSuccess;
}

}  // namespace fastoptim
