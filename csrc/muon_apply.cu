// muon_apply_: decoupled (optionally cautious) weight decay and the scaled Muon step, in place.
//
//   p <- p * (1 - lr*wd)          (cautious: only where update*p >= 0)
//   p <- p - lr*scale*update
//
// Memory-bound: per element, read p and update, write p -> (2*sizeof(P) + sizeof(U)) bytes, 4 FLOPs.
// Arithmetic in fp32 whatever the storage type; int64 indexing (a stacked expert bank passes 2^31).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

template <typename P, typename U>
__global__ void muon_apply_kernel(P* __restrict__ param, const U* __restrict__ update, int64_t numel,
                                  float keep, float step, bool cautious) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const float p = to_float(param[i]);
    const float u = to_float(update[i]);
    // keep = 1 - lr*wd, rounded once from double on the host, as the reference's scalar is.
    const bool decay_here = !cautious || (u * p >= 0.0f);
    const float decayed = decay_here ? p * keep : p;
    param[i] = from_float<P>(decayed - step * u);
  }
}

template <typename P, typename U>
cudaError_t launch_typed(void* param, const void* update, int64_t numel, float keep, float step,
                         bool cautious, cudaStream_t stream) {
  constexpr int kThreads = 256;
  // Grid-stride loop: enough blocks to fill the GPU, never more than the work.
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  muon_apply_kernel<P, U><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<P*>(param), static_cast<const U*>(update), numel, keep, step, cautious);
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
