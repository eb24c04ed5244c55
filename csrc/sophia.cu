// sophia_step_ and hessian_ema_: multi-tensor kernels. A table of tensor pointers and sizes travels
// in the kernel arguments (no device-side metadata, no copies of the tensors); each block takes one
// chunk of one tensor, so one launch covers up to kMaxTensors tensors of any sizes.
//
// sophia_step_ (Liu et al., arXiv:2305.14342, Algorithm 3; fastoptim.reference.sophia_step_):
//   p <- p (1 - lr wd);  m <- lerp(m, g, 1 - beta1);  r = m / max(rho h, eps);  p <- p - lr clip(r, -1, 1)
//   rounded as the reference: g cast to m's dtype before the EMA, r from the stored (rounded) m, and the
//   scalars 1 - lr wd and 1 - beta1 rounded once from double on the host; NaN propagates through the
//   max and the clip as through torch.clamp (fmaxf/fminf would drop it).
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
__global__ void sophia_step_kernel(TensorTable table, float keep, float lr, float one_minus_beta1, float rho,
                                   float eps, unsigned long long* unclipped) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  P* param = static_cast<P*>(table.ptr[0][t]);
  const P* grad = static_cast<const P*>(table.ptr[1][t]);
  S* exp_avg = static_cast<S*>(table.ptr[2][t]);
  const S* hessian = static_cast<const S*>(table.ptr[3][t]);
  float count = 0.0f;  // at most kChunk / kThreads per thread: exact in fp32
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = to_float(from_float<S>(to_float(grad[i])));
    const S m = from_float<S>(lerp(to_float(exp_avg[i]), g, one_minus_beta1));
    exp_avg[i] = m;
    float denominator = rho * to_float(hessian[i]);
    denominator = denominator < eps ? eps : denominator;
    const float ratio = to_float(m) / denominator;
    count += fabsf(ratio) < 1.0f ? 1.0f : 0.0f;
    const float clipped = ratio < -1.0f ? -1.0f : (ratio > 1.0f ? 1.0f : ratio);
    param[i] = from_float<P>(to_float(param[i]) * keep - lr * clipped);
  }
  if (unclipped != nullptr) {
    count = block_sum(count);
    if (threadIdx.x == 0) atomicAdd(unclipped, static_cast<unsigned long long>(count));
  }
}

template <typename S, typename E>
__global__ void hessian_ema_kernel(TensorTable table, float one_minus_beta2) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  S* hessian = static_cast<S*>(table.ptr[0][t]);
  const E* estimate = static_cast<const E*>(table.ptr[1][t]);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    // The reference casts the estimate to the hessian's dtype first (an fp16 overflow gives inf there too).
    const float e = to_float(from_float<S>(to_float(estimate[i])));
    hessian[i] = from_float<S>(lerp(to_float(hessian[i]), e, one_minus_beta2));
  }
}

}  // namespace

cudaError_t launch_sophia_step(void* const* params, DType param_dtype, void* const* grads, void* const* exp_avgs,
                               void* const* hessians, DType state_dtype, const int64_t* numels, int64_t count,
                               float lr, float one_minus_beta1, float rho, float keep, float eps,
                               unsigned long long* unclipped, cudaStream_t stream) {
  void* const* lists[4] = {params, grads, exp_avgs, hessians};
  return dispatch_dtype(param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return dispatch_dtype(state_dtype, [&](auto s_tag) {
      using S = decltype(s_tag);
      return for_each_table(lists, 4, numels, count, [&](const TensorTable& table, int blocks) {
        sophia_step_kernel<P, S><<<blocks, kThreads, 0, stream>>>(table, keep, lr, one_minus_beta1, rho, eps,
                                                                  unclipped);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_hessian_ema(void* const* hessians, DType hessian_dtype, void* const* estimates,
                               DType estimate_dtype, const int64_t* numels, int64_t count, float one_minus_beta2,
                               cudaStream_t stream) {
  void* const* lists[2] = {hessians, estimates};
  return dispatch_dtype(hessian_dtype, [&](auto s_tag) {
    using S = decltype(s_tag);
    return dispatch_dtype(estimate_dtype, [&](auto e_tag) {
      using E = decltype(e_tag);
      return for_each_table(lists, 2, numels, count, [&](const TensorTable& table, int blocks) {
        hessian_ema_kernel<S, E><<<blocks, kThreads, 0, stream>>>(table, one_minus_beta2);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace fastoptim
