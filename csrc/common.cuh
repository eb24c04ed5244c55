// Device helpers shared by the .cu files: fp32 conversion of the storage types, block reductions,
// and 16-byte vector loads. CUDA headers only (DESIGN.md, "Build").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtypes.cuh"

namespace fastoptim {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// torch.lerp's formula (aten/src/ATen/native/Lerp.h): exact at both ends, the same rounding as the
// torch backend in fp32.
__device__ __forceinline__ float lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024); the result is valid in every thread.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = lane < warps ? warp_sums[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// denominators[b] = safety·sqrt(Σ_c partials[b, c]) + eps for a (batch, chunks) table of per-block sums of
// squares: a strided sum per thread, then block_sum, so the order is fixed and the result bit-reproducible
// (no atomics). One block per matrix, grid-stride over the batch. Shared by the Newton–Schulz prologue and
// the bucket momentum's normalization (each translation unit gets its own copy).
namespace {
__global__ void matrix_denominators_kernel(const float* __restrict__ partials, float* __restrict__ denominators,
                                           int64_t chunks, int64_t batch, float safety, float eps) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {  // uniform per block: block_sum is safe
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) sum += partials[b * chunks + c];
    sum = block_sum(sum);
    if (threadIdx.x == 0) denominators[b] = safety * sqrtf(sum) + eps;
  }
}
}  // namespace

// Launch dispatch over the storage types: calls fn.template operator()<T>() with T the C++ type.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
    case DType::kFloat16:
      return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

inline unsigned grid_for(int64_t work, int threads, int64_t cap = 65535) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks > cap ? cap : blocks);
}

}  // namespace fastoptim

namespace fastoptim {

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// N consecutive elements loaded or stored as one N*sizeof(T)-byte access (a 16-byte LDG/STG for
// N = kVec<T>; two for a wider type read alongside, e.g. fp32 parameters beside a bf16 update).
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

template <typename T, int N>
inline bool aligned_for_pack(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (N * sizeof(T)) == 0;
}

}  // namespace fastoptim
