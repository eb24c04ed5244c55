// muon_momentum_: Muon's momentum EMA and the Nesterov combination in one pass.
//
//   buf <- lerp(buf, grad, 1 - beta);  nesterov_out <- lerp(grad, buf, beta)   (if requested)
//
// Bytes per element: read buf and grad, write buf (and nesterov_out): 2 sizeof(B) + sizeof(G) (+ sizeof(B)); 16-byte
// accesses of the narrowest type (packs, common.cuh) where every pointer is aligned for them.
//
// muon_momentum_stack_: the same for P matrices of one shape bucket in one multi-tensor launch, writing
// each Newton–Schulz input (Nesterov combination, or the new buffer) into its slice of one (P, m, n)
// stack of dtype O: 2 sizeof(B) + sizeof(G) + sizeof(O) per element, no temporary, no copy. With
// partials != nullptr each block also writes the sum of squares of the values it stored to
// partials[matrix * 2 max_chunks + chunk] and its exponent to partials[... + max_chunks + chunk] (overflow-safe,
// common.cuh; no atomics: deterministic), and muon_stack_normalize then computes each matrix's denominator
// safety·sqrt(Σ its partials) + eps once (matrix_denominators_kernel, as the Newton–Schulz prologue) and
// divides the matrix by it in place: 2 sizeof(O) per element.
// A float16 stack cannot hold a momentum above 65504: with store_out false the momentum kernel sums the
// squares of the values before their cast and stores nothing, and muon_stack_recompute then recomputes each
// value from the new buffer (and the gradient, for Nesterov) and writes it normalized: sizeof(B) (+ sizeof(G))
// + sizeof(O) per element.

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"
#include "multi_tensor.cuh"

namespace fastoptim {
namespace {

// One element of the momentum: buf <- lerp(buf, grad, 1 - beta); returns the Newton–Schulz input in B.
// The reference rounds the new buffer to B before the Nesterov lerp reads it; so do we. one_minus_beta is
// 1 - beta rounded once from double (the reference's scalar), not 1.0f - beta.
template <typename B, typename G>
__device__ __forceinline__ B momentum_element(B& buf, G grad, float beta, float one_minus_beta, bool nesterov) {
  const float g = to_float(from_float<B>(to_float(grad)));
  const B updated = from_float<B>(lerp(to_float(buf), g, one_minus_beta));
  buf = updated;
  return nesterov ? from_float<B>(lerp(g, to_float(updated), beta)) : updated;
}

// kPacked: every pointer is aligned for packs of N = kPackOf<B, G> elements (16-byte accesses of the narrower
// type); whole packs first, then the numel % N tail element by element.
template <typename B, typename G, bool kPacked>
__global__ void muon_momentum_kernel(B* __restrict__ buf, const G* __restrict__ grad, B* __restrict__ nesterov_out,
                                     int64_t numel, float beta, float one_minus_beta) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool nesterov = nesterov_out != nullptr;
  int64_t tail = 0;
  if constexpr (kPacked) {
    constexpr int N = kPackOf<B, G>;
    Pack<B, N>* buf_packs = reinterpret_cast<Pack<B, N>*>(buf);
    const Pack<G, N>* grad_packs = reinterpret_cast<const Pack<G, N>*>(grad);
    Pack<B, N>* out_packs = reinterpret_cast<Pack<B, N>*>(nesterov_out);
    const int64_t packs = numel / N;
    for (int64_t k = first; k < packs; k += stride) {
      Pack<B, N> bb = buf_packs[k];
      const Pack<G, N> gg = grad_packs[k];
      Pack<B, N> oo;
#pragma unroll
      for (int e = 0; e < N; ++e) oo.v[e] = momentum_element(bb.v[e], gg.v[e], beta, one_minus_beta, nesterov);
      buf_packs[k] = bb;
      if (nesterov) out_packs[k] = oo;
    }
    tail = packs * N;
  }
  for (int64_t i = tail + first; i < numel; i += stride) {
    B b = buf[i];
    const B ns_input = momentum_element(b, grad[i], beta, one_minus_beta, nesterov);
    buf[i] = b;
    if (nesterov) nesterov_out[i] = ns_input;
  }
}

// The Newton–Schulz input again from the new buffer (and the gradient), with the momentum kernel's roundings.
template <typename B, typename G>
__device__ __forceinline__ float ns_input_of(B updated, G grad, float beta, bool nesterov) {
  if (!nesterov) return to_float(updated);
  const float g = to_float(from_float<B>(to_float(grad)));
  return to_float(from_float<B>(lerp(g, to_float(updated), beta)));
}

// One element of the bucket momentum: updates buf, returns the value the stack holds (or, not store_out, the
// Newton–Schulz input before its cast) and, store_out, writes it to out.
template <typename B, typename G, typename O>
__device__ __forceinline__ float momentum_stack_element(B& buf, G grad, O& out, float beta, float one_minus_beta,
                                                        bool nesterov, bool store_out) {
  // As the reference: the Nesterov value is rounded to buf's dtype, then cast to the stack's.
  const float value = to_float(momentum_element(buf, grad, beta, one_minus_beta, nesterov));
  if (!store_out) return value;
  out = from_float<O>(value);
  return to_float(out);
}

template <typename B, typename G, typename O, bool kPacked>
__global__ void muon_momentum_stack_kernel(TensorTable table, float beta, float one_minus_beta, bool nesterov,
                                           float* partials, bool store_out,
                                           const char* out_base, int64_t matrix_bytes, int64_t max_chunks) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t chunk = table.block_chunk[blockIdx.x];
  const int64_t start = chunk * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  B* buf = static_cast<B*>(table.ptr[0][t]);
  const G* grad = static_cast<const G*>(table.ptr[1][t]);
  O* out = static_cast<O*>(table.ptr[2][t]);
  float sum_squares = 0.0f;
  float largest = 0.0f;
  int64_t tail = start;
  if constexpr (kPacked) {  // chunk starts are multiples of kChunk, so of N: whole packs, then the tail
    constexpr int N = kPackOf<B, G, O>;
    Pack<B, N>* buf_packs = reinterpret_cast<Pack<B, N>*>(buf);
    const Pack<G, N>* grad_packs = reinterpret_cast<const Pack<G, N>*>(grad);
    Pack<O, N>* out_packs = reinterpret_cast<Pack<O, N>*>(out);
    for (int64_t k = start / N + threadIdx.x; k < end / N; k += blockDim.x) {
      Pack<B, N> bb = buf_packs[k];
      const Pack<G, N> gg = grad_packs[k];
      Pack<O, N> oo;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float value =
            momentum_stack_element(bb.v[e], gg.v[e], oo.v[e], beta, one_minus_beta, nesterov, store_out);
        sum_squares += value * value;
        largest = fmaxf(largest, fabsf(value));
      }
      buf_packs[k] = bb;
      if (store_out) out_packs[k] = oo;
    }
    tail = end / N * N;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    B b = buf[i];
    O o;
    const float value = momentum_stack_element(b, grad[i], o, beta, one_minus_beta, nesterov, store_out);
    buf[i] = b;
    if (store_out) out[i] = o;
    sum_squares += value * value;
    largest = fmaxf(largest, fabsf(value));
  }
  if (partials != nullptr) {  // uniform across the block: the block reductions' barriers are safe
    sum_squares = block_sum(sum_squares);
    const int exponent = rescale_exponent(sum_squares, block_max(largest));  // uniform across the block
    if (exponent != 0) {  // rare: finite values whose squares overflow; sum again, scaled
      // block_max's barriers made this block's stores to buf and out visible to all its threads.
      sum_squares = 0.0f;
      for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float value = store_out ? to_float(out[i]) : ns_input_of(buf[i], grad[i], beta, nesterov);
        const float scaled = scalbnf(value, -exponent);
        sum_squares += scaled * scaled;
      }
      sum_squares = block_sum(sum_squares);
    }
    if (threadIdx.x == 0) {
      const int64_t matrix = (reinterpret_cast<const char*>(out) - out_base) / matrix_bytes;
      partials[matrix * 2 * max_chunks + chunk] = sum_squares;
      partials[matrix * 2 * max_chunks + max_chunks + chunk] = static_cast<float>(exponent);
    }
  }
}

// The float16 stack: out[i] <- U_i·scale_i / denominator_i with U_i recomputed (see the top of the file).
template <typename B, typename G, typename O>
__global__ void muon_stack_recompute_kernel(TensorTable table, float beta, bool nesterov,
                                            const float* __restrict__ denominators, int64_t matrices,
                                            const char* out_base, int64_t matrix_bytes) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = table.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  const B* buf = static_cast<const B*>(table.ptr[0][t]);
  const G* grad = static_cast<const G*>(table.ptr[1][t]);
  O* out = static_cast<O*>(table.ptr[2][t]);
  const int64_t matrix = (reinterpret_cast<const char*>(out) - out_base) / matrix_bytes;
  const float denominator = denominators[matrix];
  const float scale = denominators[matrices + matrix];
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    out[i] = from_float<O>(ns_input_of(buf[i], grad[i], beta, nesterov) * scale / denominator);
  }
}

template <typename O>
__global__ void muon_stack_normalize_kernel(O* __restrict__ out, const float* __restrict__ denominators,
                                            const float* __restrict__ scales, int64_t numel) {
  const int64_t matrix = blockIdx.y;
  const float denominator = denominators[matrix];
  const float scale = scales[matrix];  // 1 unless the squares overflowed
  O* values = out + matrix * numel;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    values[i] = from_float<O>(to_float(values[i]) * scale / denominator);
  }
}

}  // namespace

cudaError_t launch_muon_momentum_stack(void* const* bufs, DType buf_dtype, void* const* grads, DType grad_dtype,
                                       void* const* outs, DType out_dtype, const int64_t* numels, int64_t count,
                                       float beta, float one_minus_beta, bool nesterov, float* partials,
                                       bool store_out, const void* out_base, int64_t matrix_bytes,
                                       int64_t max_chunks, cudaStream_t stream) {
  void* const* lists[3] = {bufs, grads, outs};
  constexpr int kStackThreads = 512;
  return dispatch_dtypes(buf_dtype, grad_dtype, out_dtype, [&](auto b_tag, auto g_tag, auto o_tag) {
    using B = decltype(b_tag);
    using G = decltype(g_tag);
    using O = decltype(o_tag);
    constexpr int N = kPackOf<B, G, O>;
    const bool packed = list_aligned_for_pack<B, N>(bufs, count) && list_aligned_for_pack<G, N>(grads, count) &&
                        list_aligned_for_pack<O, N>(outs, count);
    return for_each_table(lists, 3, numels, count, [&](const TensorTable& table, int blocks) {
      if (packed) {
        muon_momentum_stack_kernel<B, G, O, true><<<blocks, kStackThreads, 0, stream>>>(
            table, beta, one_minus_beta, nesterov, partials, store_out, static_cast<const char*>(out_base),
            matrix_bytes, max_chunks);
      } else {
        muon_momentum_stack_kernel<B, G, O, false><<<blocks, kStackThreads, 0, stream>>>(
            table, beta, one_minus_beta, nesterov, partials, store_out, static_cast<const char*>(out_base),
            matrix_bytes, max_chunks);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_matrix_denominators(const float* partials, float* denominators, int64_t matrices,
                                       int64_t max_chunks, float safety, float eps, cudaStream_t stream) {
  if (matrices == 0) return cudaSuccess;
  matrix_denominators_kernel<<<grid_for(matrices, 1, 65535 * 8), 256, 0, stream>>>(
      partials, denominators, max_chunks, matrices, safety, eps);
  return cudaGetLastError();
}

cudaError_t launch_muon_stack_recompute(void* const* bufs, DType buf_dtype, void* const* grads, DType grad_dtype,
                                       void* const* outs, DType out_dtype, const int64_t* numels, int64_t count,
                                       float beta, bool nesterov, const float* denominators, int64_t matrices,
                                       const void* out_base, int64_t matrix_bytes, cudaStream_t stream) {
  if (matrices == 0) return cudaSuccess;
  void* const* lists[3] = {bufs, grads, outs};
  constexpr int kStackThreads = 512;
  return dispatch_dtypes(buf_dtype, grad_dtype, out_dtype, [&](auto b_tag, auto g_tag, auto o_tag) {
    using B = decltype(b_tag);
    using G = decltype(g_tag);
    using O = decltype(o_tag);
    return for_each_table(lists, 3, numels, count, [&](const TensorTable& table, int blocks) {
      muon_stack_recompute_kernel<B, G, O><<<blocks, kStackThreads, 0, stream>>>(
          table, beta, nesterov, denominators, matrices, static_cast<const char*>(out_base), matrix_bytes);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_muon_stack_normalize(void* out, DType out_dtype, const float* partials, float* denominators,
                                       int64_t matrices, int64_t numel, int64_t max_chunks, float safety, float eps,
                                       cudaStream_t stream) {
  if (matrices == 0 || numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  constexpr int64_t kMaxGridY = 65535;
  const cudaError_t launch = launch_matrix_denominators(partials, denominators, matrices, max_chunks, safety, eps,
                                                        stream);
  if (launch != cudaSuccess) return launch;
  return dispatch_dtype(out_dtype, [&](auto o_tag) {
    using O = decltype(o_tag);
    // gridDim.y holds at most 65535 matrices: longer stacks go in slices.
    for (int64_t first = 0; first < matrices; first += kMaxGridY) {
      const int64_t slice = matrices - first < kMaxGridY ? matrices - first : kMaxGridY;
      const dim3 grid(grid_for(numel, kThreads), static_cast<unsigned>(slice));
      muon_stack_normalize_kernel<O><<<grid, kThreads, 0, stream>>>(
          static_cast<O*>(out) + first * numel, denominators + first, denominators + matrices + first, numel);
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
  return dispatch_dtype(buf_dtype, [&](auto b_tag) {
    using B = decltype(b_tag);
    return dispatch_dtype(grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      constexpr int N = kPackOf<B, G>;
      const bool packed = aligned_for_pack<B, N>(buf) && aligned_for_pack<G, N>(grad) &&
                          (nesterov_out == nullptr || aligned_for_pack<B, N>(nesterov_out));
      const unsigned blocks = memory_bound_grid(packed ? (numel + N - 1) / N : numel, kThreads);
      if (packed) {
        muon_momentum_kernel<B, G, true><<<blocks, kThreads, 0, stream>>>(
            static_cast<B*>(buf), static_cast<const G*>(grad), static_cast<B*>(nesterov_out), numel, beta,
            one_minus_beta);
      } else {
        muon_momentum_kernel<B, G, false><<<blocks, kThreads, 0, stream>>>(
            static_cast<B*>(buf), static_cast<const G*>(grad), static_cast<B*>(nesterov_out), numel, beta,
            one_minus_beta);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace fastoptim
