// sophia_step_ and hessian_ema_: multi-tensor kernels. A table of tensor pointers and sizes travels
// in the kernel arguments (no device-side metadata, no copies of the tensors); each block takes one
// chunk of one tensor, so one launch covers up to kMaxTensors tensors of any sizes.
//
// sophia_step_ (Liu et al., arXiv:2305.14342, Algorithm 3; fastoptim.reference.sophia_step_):
//   p <- p (1 - lr wd);  m <- lerp(m, g, 1 - beta1);  r = m / max(rho h, eps);  p <- p - lr clip(r, -1, 1)
//   rounded as the reference: g cast to m's dtype before the EMA, r from the stored (rounded) m, and the
//   scalars 1 - lr wd and 1 - beta1 rounded once from double on the host; NaN propagates through the
//   max and the clip as through torch.clamp (fmaxf/fminf would drop it).
//   bytes per element: read p, g, m, h; write p, m  -> 3 sizeof(P) + 3 sizeof(S); 16-byte accesses of the
//   narrower type (packs, common.cuh) where every tensor is aligned for them.
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

// One coordinate; returns 1 where |r| < 1 (not clipped), else 0.
template <typename P, typename S>
__device__ __forceinline__ float sophia_element(P& param, P grad, S& exp_avg, S hessian, float keep, float lr,
                                                float one_minus_beta1, float rho, float eps) {
  const float g = to_float(from_float<S>(to_float(grad)));
  const S m = from_float<S>(lerp(to_float(exp_avg), g, one_minus_beta1));
  exp_avg = m;
  float denominator = rho * to_float(hessian);
  denominator = denominator < eps ? eps : denominator;
  const float ratio = to_float(m) / denominator;
  const float clipped = ratio < -1.0f ? -1.0f : (ratio > 1.0f ? 1.0f : ratio);
  param = from_float<P>(to_float(param) * keep - lr * clipped);
  return fabsf(ratio) < 1.0f ? 1.0f : 0.0f;
}

// kPacked: every tensor is aligned for packs of N = kPackOf<P, S> elements (16-byte accesses of the narrower
// type); chunk starts are multiples of kChunk, so of N: whole packs, then the chunk's tail element by element.
template <typename P, typename S, bool kPacked>
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
  int64_t tail = start;
  if constexpr (kPacked) {
    constexpr int N = kPackOf<P, S>;
    Pack<P, N>* param_packs = reinterpret_cast<Pack<P, N>*>(param);
    const Pack<P, N>* grad_packs = reinterpret_cast<const Pack<P, N>*>(grad);
    Pack<S, N>* exp_avg_packs = reinterpret_cast<Pack<S, N>*>(exp_avg);
    const Pack<S, N>* hessian_packs = reinterpret_cast<const Pack<S, N>*>(hessian);
    for (int64_t k = start / N + threadIdx.x; k < end / N; k += blockDim.x) {
      Pack<P, N> pp = param_packs[k];
      const Pack<P, N> gg = grad_packs[k];
      Pack<S, N> mm = exp_avg_packs[k];
      const Pack<S, N> hh = hessian_packs[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        count += sophia_element(pp.v[e], gg.v[e], mm.v[e], hh.v[e], keep, lr, one_minus_beta1, rho, eps);
      }
      param_packs[k] = pp;
      exp_avg_packs[k] = mm;
    }
    tail = end / N * N;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    P p = param[i];
    S m = exp_avg[i];
    count += sophia_element(p, grad[i], m, hessian[i], keep, lr, one_minus_beta1, rho, eps);
    param[i] = p;
    exp_avg[i] = m;
  }
  if (unclipped != nullptr) {
    count = block_sum(count);
    if (threadIdx.x == 0) atomicAdd(unclipped, static_cast<unsigned long long>(count));
  }
}

template <typename S, typename E>
__device__ __forceinline__ S hessian_ema_element(S hessian, E estimate, float one_minus_beta2) {
  // The reference casts the estimate to the hessian's dtype first (an fp16 overflow gives inf there too).
  const float e = to_float(from_float<S>(to_float(estimate)));
  return from_float<S>(lerp(to_float(hessian), e, one_minus_beta2));
}

template <typename S, typename E, bool kPacked>
__global__ void hessian_ema_kernel(TensorTable table, float one_minus_beta2) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, table.numel[t]);
  S* hessian = static_cast<S*>(table.ptr[0][t]);
  const E* estimate = static_cast<const E*>(table.ptr[1][t]);
  int64_t tail = start;
  if constexpr (kPacked) {
    constexpr int N = kPackOf<S, E>;
    Pack<S, N>* hessian_packs = reinterpret_cast<Pack<S, N>*>(hessian);
    const Pack<E, N>* estimate_packs = reinterpret_cast<const Pack<E, N>*>(estimate);
    for (int64_t k = start / N + threadIdx.x; k < end / N; k += blockDim.x) {
      Pack<S, N> hh = hessian_packs[k];
      const Pack<E, N> ee = estimate_packs[k];
#pragma unroll
      for (int e = 0; e < N; ++e) hh.v[e] = hessian_ema_element(hh.v[e], ee.v[e], one_minus_beta2);
      hessian_packs[k] = hh;
    }
    tail = end / N * N;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    hessian[i] = hessian_ema_element(hessian[i], estimate[i], one_minus_beta2);
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
      constexpr int N = kPackOf<P, S>;
      const bool packed = list_aligned_for_pack<P, N>(params, count) && list_aligned_for_pack<P, N>(grads, count) &&
                          list_aligned_for_pack<S, N>(exp_avgs, count) && list_aligned_for_pack<S, N>(hessians, count);
      return for_each_table(lists, 4, numels, count, [&](const TensorTable& table, int blocks) {
        if (packed) {
          sophia_step_kernel<P, S, true><<<blocks, kThreads, 0, stream>>>(table, keep, lr, one_minus_beta1, rho,
                                                                          eps, unclipped);
        } else {
          sophia_step_kernel<P, S, false><<<blocks, kThreads, 0, stream>>>(table, keep, lr, one_minus_beta1, rho,
                                                                           eps, unclipped);
        }
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
      constexpr int N = kPackOf<S, E>;
      const bool packed =
          list_aligned_for_pack<S, N>(hessians, count) && list_aligned_for_pack<E, N>(estimates, count);
      return for_each_table(lists, 2, numels, count, [&](const TensorTable& table, int blocks) {
        if (packed) {
          hessian_ema_kernel<S, E, true><<<blocks, kThreads, 0, stream>>>(table, one_minus_beta2);
        } else {
          hessian_ema_kernel<S, E, false><<<blocks, kThreads, 0, stream>>>(table, one_minus_beta2);
        }
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace fastoptim
