// sophia_step_ and hessian_ema_: multi-tensor kernels. A table of tensor pointers and sizes travels
// in the kernel arguments (no device-side metadata, no copies of the tensors); each block takes one
// chunk of one tensor, so one launch covers up to kMaxTensors tensors of any sizes.
//
// sophia_step_ (Liu et al., arXiv:2305.14342, Algorithm 3; fastoptim.reference.sophia_step_):
//   p <- p (1 - lr wd);  m <- lerp(m, g, 1 - beta1);  r = m / max(rho h, eps);  p <- p - lr clip(r, -1, 1)
//   bytes per element: read p, g, m, h; write p, m  -> 3 sizeof(P) + 3 sizeof(S)
//   optionally counts |r| < 1 into a device int64 counter (block reduction + one atomic per block).
// hessian_ema_:  h <- lerp(h, ĥ, 1 - beta2); bytes per element: 2 sizeof(S) + sizeof(E).

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"
#include "multi_tensor.cuh"

namespace fastoptim {
namespace {

constexpr int kThreads = 512;

template <typename P, typename S>
__global__ void sophia_step_kernel(TensorTable table, float decay, float lr, float beta1, float rho, float eps,
                                   unsigned long long* unclipped) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  P* param = static_cast<P*>(table.ptr[0][t]);
  const P* grad = static_cast<const P*>(table.ptr[1][t]);
  S* exp_avg = static_cast<S*>(table.ptr[2][t]);
  const S* hessian = static_cast<const S*>(table.ptr[3][t]);
  float count = 0.0f;  // at most kChunk / kThreads per thread: exact in fp32
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float m = lerp(to_float(exp_avg[i]), to_float(grad[i]), 1.0f - beta1);
    exp_avg[i] = from_float<S>(m);
    const float ratio = m / fmaxf(rho * to_float(hessian[i]), eps);
    count += fabsf(ratio) < 1.0f ? 1.0f : 0.0f;
    const float clipped = fminf(fmaxf(ratio, -1.0f), 1.0f);
    param[i] = from_float<P>(to_float(param[i]) * (1.0f - decay) - lr * clipped);
  }
  if (unclipped != nullptr) {
    count = block_sum(count);
    if (threadIdx.x == 0) atomicAdd(unclipped, static_cast<unsigned long long>(count));
  }
}

template <typename S, typename E>
__global__ void hessian_ema_kernel(TensorTable table, float beta2) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  S* hessian = static_cast<S*>(table.ptr[0][t]);
  const E* estimate = static_cast<const E*>(table.ptr[1][t]);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    hessian[i] = from_float<S>(lerp(to_float(hessian[i]), to_float(estimate[i]), 1.0f - beta2));
  }
}

}  // namespace

cudaError_t launch_sophia_step(void* const* params, DType param_dtype, void* const* grads, void* const* exp_avgs,
                               void* const* hessians, DType state_dtype, const int64_t* numels, int64_t count,
                               float lr, float beta1, float rho, float weight_decay, float eps,
                               unsigned long long* unclipped, cudaStream_t stream) {
  void* const* lists[4] = {params, grads, exp_avgs, hessians};
  return dispatch_dtype(param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return dispatch_dtype(state_dtype, [&](auto s_tag) {
      using S = decltype(s_tag);
      return for_each_table(lists, 4, numels, count, [&](const TensorTable& table, int blocks) {
        sophia_step_kernel<P, S><<<blocks, kThreads, 0, stream>>>(table, lr * weight_decay, lr, beta1, rho, eps,
                                                                  unclipped);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_hessian_ema(void* const* hessians, DType hessian_dtype, void* const* estimates,
                               DType estimate_dtype, const int64_t* numels, int64_t count, float beta2,
                               cudaStream_t stream) {
  void* const* lists[2] = {hessians, estimates};
  return dispatch_dtype(hessian_dtype, [&](auto s_tag) {
    using S = decltype(s_tag);
    return dispatch_dtype(estimate_dtype, [&](auto e_tag) {
      using E = decltype(e_tag);
      return for_each_table(lists, 2, numels, count, [&](const TensorTable& table, int blocks) {
        hessian_ema_kernel<S, E><<<blocks, kThreads, 0, stream>>>(table, beta2);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace fastoptim
