// muon_apply_stack_ and normuon_step_stack_: the parameter step of a whole shape bucket. P parameters of m·n
// elements each (contiguous, any shape: weights, conv kernels, experts of a bank) step by the P matrices of one
// contiguous (P, m, n) update stack (fastoptim.reference.muon_apply_stack_ / normuon_step_stack_: a loop of the
// per-matrix op), with the per-matrix kernels' arithmetic (muon_apply.cu; normuon.cu through common.cuh).
//
// muon_apply_stack_:  p_i <- p_i (1 - lr wd)  (cautious: only where U_i p_i >= 0);  p_i <- p_i - lr scale U_i
//   one block per kStackChunk elements of a matrix; bytes per element 2 sizeof(P) + sizeof(U); 16-byte loads of
//   U (and packs of as many elements of p) when every pointer of a launch is aligned.
// normuon_step_stack_, three launches as normuon.cu's, over the whole list:
//   1. one block per row: Σ_j O_ij², the row moment v, the row's share of ‖O‖² and ‖Ô‖² (row sums, no atomics)
//   2. matrix_norms_kernel: per matrix, its row sums in a fixed order (bit-reproducible)
//   3. one block per row: Ô and the step.  Bytes per element 2 sizeof(U) + 2 sizeof(P) (+ 8 B per row).
//
// Tables of pointers travel in the kernel arguments, as multi_tensor.cuh's (no device-side metadata, nothing
// to upload: a launch is graph-capturable as it is). All matrices have m·n elements, so a block finds its
// matrix and chunk by arithmetic; a table is just the parameters' (and row moments') pointers, with each one's
// index into the update stack: up to kStackMatrices matrices of one parameter dtype per launch, so a bucket
// of at most 128 same-dtype matrices is one launch per pass. Index arithmetic is int64.

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

constexpr int kStackMatrices = 128;
constexpr int64_t kStackChunk = 1 << 14;  // elements per block of muon_apply_stack: many blocks for small buckets
constexpr int kApplyThreads = 256;

// 128 x (8 + 8 + 8) bytes = 3 KB, with the other arguments under the 4 KB kernel-argument limit.
struct StackTable {
  void* param[kStackMatrices];
  float* second_moment[kStackMatrices];  // NorMuon only
  int64_t matrix[kStackMatrices];        // index of its matrix in the update stack (and the row-sum workspace)
};
static_assert(sizeof(StackTable) + sizeof(StepScalars) + 128 <= 4096, "kernel arguments over 4 KB");

// keep = 1 - lr*wd and step = lr*scale for this launch (launchers.h, StepScalars). The device path multiplies
// with __fmul_rn so that no fma contraction changes the fp32 rounding of torch's tensor arithmetic.
__device__ __forceinline__ void resolve_step(const StepScalars& s, float& keep, float& step) {
  if (s.lr_device == nullptr && s.weight_decay_device == nullptr) {
    keep = s.keep;
    step = s.step;
    return;
  }
  const float lr = s.lr_device != nullptr ? __ldg(s.lr_device) : s.lr;
  const float weight_decay = s.weight_decay_device != nullptr ? __ldg(s.weight_decay_device) : s.weight_decay;
  keep = 1.0f - __fmul_rn(lr, weight_decay);
  step = __fmul_rn(lr, s.scale);
}

// muon_apply.cu's element, unchanged: the same rounding.
__device__ __forceinline__ float muon_step(float p, float u, float keep, float step, bool cautious) {
  const bool decay_here = !cautious || (u * p >= 0.0f);
  const float decayed = decay_here ? p * keep : p;
  return decayed - step * u;
}

// Block b: matrix b / chunks of the table, its chunk b % chunks.
template <typename P, typename U, bool kPacked>
__global__ void muon_apply_stack_kernel(StackTable table, const U* __restrict__ updates, int64_t numel,
                                        int64_t chunks, StepScalars scalars, bool cautious) {
  const int64_t block = blockIdx.x;
  const int64_t t = block / chunks;
  const int64_t start = (block - t * chunks) * kStackChunk;
  const int64_t end = min(start + kStackChunk, numel);
  P* param = static_cast<P*>(table.param[t]);
  const U* update = updates + table.matrix[t] * numel;
  float keep, step;
  resolve_step(scalars, keep, step);
  if (kPacked) {  // numel, kStackChunk and every pointer are multiples of the pack
    constexpr int N = kVec<U>;
    Pack<P, N>* p_packs = reinterpret_cast<Pack<P, N>*>(param);
    const Pack<U, N>* u_packs = reinterpret_cast<const Pack<U, N>*>(update);
    for (int64_t k = start / N + threadIdx.x; k < end / N; k += blockDim.x) {
      Pack<P, N> pp = p_packs[k];
      const Pack<U, N> uu = u_packs[k];
#pragma unroll
      for (int e = 0; e < N; ++e) pp.v[e] = from_float<P>(muon_step(to_float(pp.v[e]), to_float(uu.v[e]), keep, step, cautious));
      p_packs[k] = pp;
    }
  } else {
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      param[i] = from_float<P>(muon_step(to_float(param[i]), to_float(update[i]), keep, step, cautious));
    }
  }
}

// Row r of the table's count*m rows: row r % m of its matrix r / m. row_sums (2, matrices*m) indexed by the
// matrix's row in the whole stack, as normuon.cu's.
template <typename U, bool kPacked>
__global__ void normuon_stack_row_stats_kernel(StackTable table, const U* __restrict__ updates,
                                               float* __restrict__ row_sums, int64_t count, int64_t stack_rows,
                                               int64_t m, int64_t n, float one_minus_beta2, float eps) {
  for (int64_t r = blockIdx.x; r < count * m; r += gridDim.x) {
    const int64_t t = r / m;
    const int64_t i = r - t * m;
    const int64_t row = table.matrix[t] * m + i;
    const float sum = block_sum(normuon_row_sum_share<U, kPacked>(updates + row * n, n));
    if (threadIdx.x == 0) {
      normuon_row_moment(sum, n, table.second_moment[t] + i, one_minus_beta2, eps, row_sums + row,
                         row_sums + stack_rows + row);
    }
  }
}

template <typename P, typename U, bool kPacked>
__global__ void normuon_stack_apply_kernel(StackTable table, const U* __restrict__ updates,
                                           const float* __restrict__ norms, int64_t count, int64_t matrices,
                                           int64_t m, int64_t n, StepScalars scalars, float eps, bool cautious) {
  float keep, step;
  resolve_step(scalars, keep, step);
  for (int64_t r = blockIdx.x; r < count * m; r += gridDim.x) {
    const int64_t t = r / m;
    const int64_t i = r - t * m;
    const int64_t b = table.matrix[t];
    normuon_apply_row<P, U, kPacked>(static_cast<P*>(table.param[t]) + i * n, updates + (b * m + i) * n, n,
                                     table.second_moment[t][i], norms[b], norms[matrices + b], keep, step, eps,
                                     cautious);
  }
}

// Calls launch(table, entries) for the matrices [0, count) in tables of up to `per_table`; with param_dtypes,
// only for those of parameter dtype `dtype` (a launch takes one).
template <typename Launch>
cudaError_t for_each_stack_table(void* const* params, const DType* param_dtypes, DType dtype,
                                 float* const* second_moments, int64_t count, int64_t per_table, Launch&& launch) {
  StackTable table;
  int entries = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (param_dtypes != nullptr && param_dtypes[i] != dtype) continue;
    table.param[entries] = params != nullptr ? params[i] : nullptr;
    table.second_moment[entries] = second_moments != nullptr ? second_moments[i] : nullptr;
    table.matrix[entries] = i;
    if (++entries == per_table) {
      const cudaError_t err = launch(table, entries);
      if (err != cudaSuccess) return err;
      entries = 0;
    }
  }
  return entries > 0 ? launch(table, entries) : cudaSuccess;
}

template <typename P, int N>
bool params_aligned(const StackTable& table, int entries) {
  for (int k = 0; k < entries; ++k) {
    if (!aligned_for_pack<P, N>(table.param[k])) return false;
  }
  return true;
}

constexpr DType kDTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

}  // namespace

cudaError_t launch_muon_apply_stack(void* const* params, const DType* param_dtypes, const void* updates,
                                    DType update_dtype, int64_t count, int64_t numel, StepScalars scalars,
                                    bool cautious, cudaStream_t stream) {
  if (count == 0 || numel == 0) return cudaSuccess;
  const int64_t chunks = (numel + kStackChunk - 1) / kStackChunk;
  // A 1-D grid of entries x chunks blocks stays under 2^31 - 1.
  int64_t per_table = INT_MAX / chunks;
  if (per_table > kStackMatrices) per_table = kStackMatrices;
  if (per_table < 1) return cudaErrorInvalidValue;
  for (const DType dtype : kDTypes) {
    const cudaError_t err = dispatch_dtype(dtype, [&](auto p_tag) {
      using P = decltype(p_tag);
      return dispatch_dtype(update_dtype, [&](auto u_tag) {
        using U = decltype(u_tag);
        constexpr int N = kVec<U>;
        const bool updates_packable = numel % N == 0 && aligned_for_pack<U, N>(updates);
        return for_each_stack_table(
            params, param_dtypes, dtype, nullptr, count, per_table, [&](const StackTable& table, int entries) {
              const unsigned blocks = static_cast<unsigned>(entries * chunks);
              const U* u = static_cast<const U*>(updates);
              if (updates_packable && params_aligned<P, N>(table, entries)) {
                muon_apply_stack_kernel<P, U, true>
                    <<<blocks, kApplyThreads, 0, stream>>>(table, u, numel, chunks, scalars, cautious);
              } else {
                muon_apply_stack_kernel<P, U, false>
                    <<<blocks, kApplyThreads, 0, stream>>>(table, u, numel, chunks, scalars, cautious);
              }
              return cudaGetLastError();
            });
      });
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_normuon_step_stack(void* const* params, const DType* param_dtypes, float* const* second_moments,
                                      const void* updates, DType update_dtype, float* workspace, int64_t count,
                                      int64_t m, int64_t n, StepScalars scalars, float one_minus_beta2, float eps,
                                      bool cautious, cudaStream_t stream) {
  const int64_t rows = count * m;
  if (rows == 0) return cudaSuccess;
  float* row_sums = workspace;          // (2, rows)
  float* norms = workspace + 2 * rows;  // (2, count)
  const int threads = normuon_threads_for_row(n);
  auto row_blocks = [](int64_t table_rows) {
    return static_cast<unsigned>(table_rows < 65535 * 8 ? table_rows : 65535 * 8);
  };
  // Pass 1 reads no parameter: tables over every matrix, whatever its parameter's dtype.
  cudaError_t err = dispatch_dtype(update_dtype, [&](auto u_tag) {
    using U = decltype(u_tag);
    const U* u = static_cast<const U*>(updates);
    const bool packed = n % kVec<U> == 0 && aligned_for_pack<U, kVec<U>>(updates);
    return for_each_stack_table(
        params, nullptr, DType::kFloat32, second_moments, count, kStackMatrices,
        [&](const StackTable& table, int entries) {
          const unsigned blocks = row_blocks(entries * m);
          if (packed) {
            normuon_stack_row_stats_kernel<U, true><<<blocks, threads, 0, stream>>>(
                table, u, row_sums, entries, rows, m, n, one_minus_beta2, eps);
          } else {
            normuon_stack_row_stats_kernel<U, false><<<blocks, threads, 0, stream>>>(
                table, u, row_sums, entries, rows, m, n, one_minus_beta2, eps);
          }
          return cudaGetLastError();
        });
  });
  if (err != cudaSuccess || n == 0) return err;  // n == 0: v moved toward 0, the params have no elements
  matrix_norms_kernel<<<grid_for(count, 1, 65535 * 8), 256, 0, stream>>>(row_sums, norms, rows, m, count);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  for (const DType dtype : kDTypes) {
    err = dispatch_dtype(dtype, [&](auto p_tag) {
      using P = decltype(p_tag);
      return dispatch_dtype(update_dtype, [&](auto u_tag) {
        using U = decltype(u_tag);
        constexpr int N = kVec<U>;
        const U* u = static_cast<const U*>(updates);
        const bool updates_packable = n % N == 0 && aligned_for_pack<U, N>(updates);
        return for_each_stack_table(
            params, param_dtypes, dtype, second_moments, count, kStackMatrices,
            [&](const StackTable& table, int entries) {
              const unsigned blocks = row_blocks(entries * m);
              if (updates_packable && params_aligned<P, N>(table, entries)) {
                normuon_stack_apply_kernel<P, U, true><<<blocks, threads, 0, stream>>>(
                    table, u, norms, entries, count, m, n, scalars, eps, cautious);
              } else {
                normuon_stack_apply_kernel<P, U, false><<<blocks, threads, 0, stream>>>(
                    table, u, norms, entries, count, m, n, scalars, eps, cautious);
              }
              return cudaGetLastError();
            });
      });
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace fastoptim
