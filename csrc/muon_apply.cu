// muon_apply_: decoupled (optionally cautious) weight decay and the scaled Muon step, in place.
//
//   p <- p * (1 - lr*wd)          (cautious: only where update*p >= 0)
//   p <- p - lr*scale*update
//
// Memory-bound: per element, read p and update, write p -> (2*sizeof(P) + sizeof(U)) bytes, 4 FLOPs; 16-byte
// accesses when the tensors are aligned for them, a grid sized from the SM count.
// Arithmetic in fp32 whatever the storage type; int64 indexing (a stacked expert bank passes 2^31).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

__device__ __forceinline__ float muon_apply_element(float p, float u, float keep, float step, bool cautious) {
  // keep = 1 - lr*wd, rounded once from double on the host, as the reference's scalar is.
  const bool decay_here = !cautious || (u * p >= 0.0f);
  const float decayed = decay_here ? p * keep : p;
  return decayed - step * u;
}

// kPacked: param and update are aligned for packs of N = kPackOf<P, U> elements; each thread moves whole packs
// (16-byte accesses of the narrower type), then the numel % N tail element by element.
template <typename P, typename U, bool kPacked>
__global__ void muon_apply_kernel(P* __restrict__ param, const U* __restrict__ update, int64_t numel,
                                  float keep, float step, bool cautious) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if constexpr (kPacked) {
    constexpr int N = kPackOf<P, U>;
    Pack<P, N>* p_packs = reinterpret_cast<Pack<P, N>*>(param);
    const Pack<U, N>* u_packs = reinterpret_cast<const Pack<U, N>*>(update);
    const int64_t packs = numel / N;
    for (int64_t k = first; k < packs; k += stride) {
      Pack<P, N> pp = p_packs[k];
      const Pack<U, N> uu = u_packs[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        pp.v[e] = from_float<P>(muon_apply_element(to_float(pp.v[e]), to_float(uu.v[e]), keep, step, cautious));
      }
      p_packs[k] = pp;
    }
    tail = packs * N;
  }
  for (int64_t i = tail + first; i < numel; i += stride) {
    param[i] = from_float<P>(muon_apply_element(to_float(param[i]), to_float(update[i]), keep, step, cautious));
  }
}

template <typename P, typename U>
cudaError_t launch_typed(void* param, const void* update, int64_t numel, float keep, float step,
                         bool cautious, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int N = kPackOf<P, U>;
  const bool packed = aligned_for_pack<P, N>(param) && aligned_for_pack<U, N>(update);
  // Grid-stride loop: enough blocks to fill the GPU, never more than the work.
  const unsigned blocks = memory_bound_grid(packed ? (numel + N - 1) / N : numel, kThreads);
  if (packed) {
    muon_apply_kernel<P, U, true><<<blocks, kThreads, 0, stream>>>(
        static_cast<P*>(param), static_cast<const U*>(update), numel, keep, step, cautious);
  } else {
    muon_apply_kernel<P, U, false><<<blocks, kThreads, 0, stream>>>(
        static_cast<P*>(param), static_cast<const U*>(update), numel, keep, step, cautious);
  }
  return cudaGetLastError();
}

template <typename P>
cudaError_t dispatch_update(void* param, const void* update, DType update_dtype, int64_t numel,
                            float keep, float step, bool cautious, cudaStream_t stream) {
  switch (update_dtype) {
    case DType::kFloat32:
      return launch_typed<P, float>(param, update, numel, keep, step, cautious, stream);
    case DType::kBFloat16:
      return launch_typed<P, __nv_bfloat16>(param, update, numel, keep, step, cautious, stream);
    case DType::kFloat16:
      return launch_typed<P, __half>(param, update, numel, keep, step, cautious, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_muon_apply(void* param, DType param_dtype, const void* update, DType update_dtype,
                              int64_t numel, float keep, float step, bool cautious, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (param_dtype) {
    case DType::kFloat32:
      return dispatch_update<float>(param, update, update_dtype, numel, keep, step, cautious, stream);
    case DType::kBFloat16:
      return dispatch_update<__nv_bfloat16>(param, update, update_dtype, numel, keep, step, cautious, stream);
    case DType::kFloat16:
      return dispatch_update<__half>(param, update, update_dtype, numel, keep, step, cautious, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastoptim
