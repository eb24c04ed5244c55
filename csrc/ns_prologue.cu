// The Newton–Schulz prologue: X = G / (safety·‖G‖_F + eps), per matrix of a stack, cast to the compute
// dtype, in two passes over G (fastoptim.reference.newton_schulz).
//
// Pass 1 (grid: chunks x batch): partial sums of G² of each matrix, one per block, into partials[b, chunk]
//   (overflow-safe: a block whose squares overflow sums again scaled by 2^-e and records e, common.cuh).
// Then (grid: matrices) denominators[b] = safety·sqrt(Σ partials[b]) + eps, summed in a fixed order: no
//   atomics, so the result is bit-reproducible from run to run (and its scale 2^-e, 1 unless overflowed).
// Pass 2 (grid: chunks x batch): out[b, i, j] = G[b, i, j]·scale[b] / denominators[b], written contiguous in
//   the compute dtype.
// G is read through its strides (batch, row, column), so a transposed view is not copied.
// Bytes: 2 reads of G + 1 write of X: 2·sizeof(G) + sizeof(X) per element; fp32 arithmetic; 16-byte accesses
// (packs, common.cuh) for a stack of dense, aligned matrices.

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * 1024;  // elements per block

// Element e (row-major) of a matrix read through its strides.
template <typename G>
__device__ __forceinline__ float element_at(const G* base, int64_t e, int64_t n, int64_t row_stride,
                                            int64_t col_stride) {
  const int64_t i = e / n;
  const int64_t j = e - i * n;
  return to_float(base[i * row_stride + j * col_stride]);
}

// kPacked: dense rows (row_stride = n, col_stride = 1) and every matrix aligned for packs of N elements: whole
// 16-byte packs (chunk starts are multiples of kChunk, so of N), then the chunk's tail element by element.
template <typename G, bool kPacked>
__global__ void sum_squares_kernel(const G* __restrict__ g, float* __restrict__ partials, int64_t chunks, int64_t n,
                                   int64_t numel_per_matrix, int64_t batch_stride, int64_t row_stride,
                                   int64_t col_stride) {
  const int64_t b = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(start + kChunk, numel_per_matrix);
  const G* base = g + b * batch_stride;
  float sum = 0.0f;
  float largest = 0.0f;
  int64_t tail = start;
  if constexpr (kPacked) {
    constexpr int N = kPackOf<G>;
    const Pack<G, N>* packs = reinterpret_cast<const Pack<G, N>*>(base);
    for (int64_t k = start / N + threadIdx.x; k < end / N; k += blockDim.x) {
      const Pack<G, N> pack = packs[k];
#pragma unroll
      for (int v = 0; v < N; ++v) {
        const float x = to_float(pack.v[v]);
        sum += x * x;
        largest = fmaxf(largest, fabsf(x));
      }
    }
    tail = end / N * N;
  }
  for (int64_t e = tail + threadIdx.x; e < end; e += blockDim.x) {
    const float x = element_at(base, e, n, row_stride, col_stride);
    sum += x * x;
    largest = fmaxf(largest, fabsf(x));
  }
  sum = block_sum(sum);
  const int exponent = rescale_exponent(sum, block_max(largest));  // uniform across the block
  if (exponent != 0) {  // rare: finite entries whose squares overflow; sum again, scaled
    sum = 0.0f;
    for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
      const float x = scalbnf(element_at(base, e, n, row_stride, col_stride), -exponent);
      sum += x * x;
    }
    sum = block_sum(sum);
  }
  if (threadIdx.x == 0) {
    partials[b * 2 * chunks + blockIdx.x] = sum;
    partials[b * 2 * chunks + chunks + blockIdx.x] = static_cast<float>(exponent);
  }
}


template <typename G, typename X, bool kPacked>
__global__ void scale_cast_kernel(const G* __restrict__ g, X* __restrict__ out,
                                  const float* __restrict__ denominators, const float* __restrict__ scales,
                                  int64_t n, int64_t numel_per_matrix,
                                  int64_t batch_stride, int64_t row_stride, int64_t col_stride) {
  const int64_t b = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(start + kChunk, numel_per_matrix);
  const G* base = g + b * batch_stride;
  X* target = out + b * numel_per_matrix;
  const float denom = denominators[b];
  const float scale = scales[b];  // 1 unless the squares overflowed: then x·scale is exact
  int64_t tail = start;
  if constexpr (kPacked) {
    constexpr int N = kPackOf<G, X>;
    const Pack<G, N>* in = reinterpret_cast<const Pack<G, N>*>(base);
    Pack<X, N>* out_packs = reinterpret_cast<Pack<X, N>*>(target);
    for (int64_t k = start / N + threadIdx.x; k < end / N; k += blockDim.x) {
      const Pack<G, N> gg = in[k];
      Pack<X, N> xx;
#pragma unroll
      for (int v = 0; v < N; ++v) xx.v[v] = from_float<X>(to_float(gg.v[v]) * scale / denom);
      out_packs[k] = xx;
    }
    tail = end / N * N;
  }
  for (int64_t e = tail + threadIdx.x; e < end; e += blockDim.x) {
    target[e] = from_float<X>(element_at(base, e, n, row_stride, col_stride) * scale / denom);
  }
}

}  // namespace

int64_t ns_prologue_workspace_floats(int64_t batch, int64_t m, int64_t n) {
  return batch * 2 * ((m * n + kChunk - 1) / kChunk + 1);
}

cudaError_t launch_ns_prologue(const void* g, DType g_dtype, void* out, DType out_dtype, float* workspace,
                               int64_t batch, int64_t m, int64_t n, int64_t batch_stride, int64_t row_stride,
                               int64_t col_stride, float safety, float eps, cudaStream_t stream) {
  const int64_t numel = m * n;
  if (batch == 0 || numel == 0) return cudaSuccess;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  float* partials = workspace;                           // (batch, 2·chunks): sums, then exponents
  float* denominators = workspace + batch * 2 * chunks;  // (batch) denominators, then (batch) scales
  int64_t remaining = batch;
  int64_t first = 0;
  // gridDim.y is at most 65535: long stacks go in slices.
  while (remaining > 0) {
    const int64_t slice = remaining < 65535 ? remaining : 65535;
    const dim3 grid(static_cast<unsigned>((numel + kChunk - 1) / kChunk), static_cast<unsigned>(slice));
    cudaError_t err = dispatch_dtype(g_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      const G* g_slice = static_cast<const G*>(g) + first * batch_stride;
      // Dense rows, and every matrix of the stack at a pack-aligned address: 16-byte loads.
      const bool dense = (row_stride == n || m == 1) && (col_stride == 1 || n == 1);
      constexpr int NG = kPackOf<G>;
      const bool packed = dense && aligned_for_pack<G, NG>(g_slice) &&
                          (batch == 1 || (batch_stride * static_cast<int64_t>(sizeof(G))) % (NG * sizeof(G)) == 0);
      if (packed) {
        sum_squares_kernel<G, true><<<grid, kThreads, 0, stream>>>(g_slice, partials + first * 2 * chunks, chunks, n,
                                                                   numel, batch_stride, row_stride, col_stride);
      } else {
        sum_squares_kernel<G, false><<<grid, kThreads, 0, stream>>>(g_slice, partials + first * 2 * chunks, chunks, n,
                                                                    numel, batch_stride, row_stride, col_stride);
      }
      cudaError_t launch = cudaGetLastError();
      if (launch != cudaSuccess) return launch;
      matrix_denominators_kernel<<<grid_for(slice, 1, 65535 * 8), kThreads, 0, stream>>>(
          partials + first * 2 * chunks, denominators + 2 * first, chunks, slice, safety, eps);
      launch = cudaGetLastError();
      if (launch != cudaSuccess) return launch;
      return dispatch_dtype(out_dtype, [&](auto x_tag) {
        using X = decltype(x_tag);
        X* out_slice = static_cast<X*>(out) + first * numel;
        constexpr int N = kPackOf<G, X>;
        const bool packed_cast = dense && aligned_for_pack<G, N>(g_slice) && aligned_for_pack<X, N>(out_slice) &&
                                 (batch == 1 || (batch_stride % N == 0 && numel % N == 0));
        if (packed_cast) {
          scale_cast_kernel<G, X, true><<<grid, kThreads, 0, stream>>>(
              g_slice, out_slice, denominators + 2 * first, denominators + 2 * first + slice, n, numel, batch_stride,
              row_stride, col_stride);
        } else {
          scale_cast_kernel<G, X, false><<<grid, kThreads, 0, stream>>>(
              g_slice, out_slice, denominators + 2 * first, denominators + 2 * first + slice, n, numel, batch_stride,
              row_stride, col_stride);
        }
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
