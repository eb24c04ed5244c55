// muon_momentum_: Muon's momentum EMA and the Nesterov combination in one pass.
//
//   buf <- lerp(buf, grad, 1 - beta);  nesterov_out <- lerp(grad, buf, beta)   (if requested)
//
// Bytes per element: read buf and grad, write buf (and nesterov_out): 2 sizeof(B) + sizeof(G) (+ sizeof(B)).

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

template <typename B, typename G>
__global__ void muon_momentum_kernel(B* __restrict__ buf, const G* __restrict__ grad, B* __restrict__ nesterov_out,
                                     int64_t numel, float beta) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    // The reference rounds the new buffer to B before the Nesterov lerp reads it; so do we.
    const float g = to_float(from_float<B>(to_float(grad[i])));
    const B updated = from_float<B>(lerp(to_float(buf[i]), g, 1.0f - beta));
    buf[i] = updated;
    if (nesterov_out != nullptr) nesterov_out[i] = from_float<B>(lerp(g, to_float(updated), beta));
  }
}

}  // namespace

cudaError_t launch_muon_momentum(void* buf, DType buf_dtype, const void* grad, DType grad_dtype, void* nesterov_out,
                                 int64_t numel, float beta, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = grid_for(numel, kThreads);
  return dispatch_dtype(buf_dtype, [&](auto b_tag) {
    using B = decltype(b_tag);
    return dispatch_dtype(grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      muon_momentum_kernel<B, G><<<blocks, kThreads, 0, stream>>>(
          static_cast<B*>(buf), static_cast<const G*>(grad), static_cast<B*>(nesterov_out), numel, beta);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastoptim
