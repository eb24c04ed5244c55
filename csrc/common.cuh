// Device helpers shared by the .cu files: fp32 conversion of the storage types, block reductions,
// 16-byte vector loads, and NorMuon's row arithmetic. CUDA headers only (DESIGN.md, "Build").
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

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op over a block (blockDim.x a multiple of 32, at most 1024), a butterfly in each warp and then over the warps'
// results, so the order of the operations is fixed; the result is valid in every thread. Lanes past the last
// warp contribute 0: the identity of SumOp, and of MaxOp for the non-negative values it is used on. Each
// instantiation has its own shared array.
template <typename Op>
__device__ __forceinline__ float block_reduce(float value, Op op) {
  __shared__ float warp_results[32];
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // warp_results may still be read by a previous call
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = lane < warps ? warp_results[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ __forceinline__ float block_sum(float value) { return block_reduce(value, SumOp{}); }

// Max of non-negative values over a block.
__device__ __forceinline__ float block_max(float value) { return block_reduce(value, MaxOp{}); }

// Overflow-safe Frobenius norms (fastoptim.reference.frobenius_normalized). A block whose sum of squares
// overflowed although its largest |entry| is finite sums again with its entries divided by 2^e and reports
// (sum, e), meaning sum·4^e; otherwise e = 0. Scaling by a power of two is exact, so wherever nothing overflows
// every result is bit for bit the unscaled formula's. The power of two to divide by (0: none):
__device__ __forceinline__ int rescale_exponent(float total, float largest) {
  if (!(isinf(total) && isfinite(largest))) return 0;
  const int exponent = ilogbf(largest);  // >= 63 here: the squares overflowed
  return exponent < 126 ? exponent : 126;  // 2^-126 is still a normal float
}

// denominators[b] = safety·sqrt(total) + eps·2^-e and denominators[batch + b] = 2^-e, where
// ‖matrix b‖² = total·4^e is combined from a (batch, 2·chunks) table whose row b holds the chunks' sums of
// squares, then their exponents (as floats): a strided sum per thread, then block_sum, so the order is fixed
// and the result bit-reproducible (no atomics); e = 0 and the plain formula unless something overflowed.
// One block per matrix, grid-stride over the batch. Shared by the Newton–Schulz prologue and the bucket
// momentum's normalization (each translation unit gets its own copy). The matrix is then x·2^-e / denominator.
namespace {
__global__ void matrix_denominators_kernel(const float* __restrict__ partials, float* __restrict__ denominators,
                                           int64_t chunks, int64_t batch, float safety, float eps) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {  // uniform per block: the block reductions are safe
    const float* sums = partials + b * 2 * chunks;
    const float* exponents = sums + chunks;
    float top = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) top = fmaxf(top, exponents[c]);
    const int exponent = static_cast<int>(block_max(top));
    float sum = 0.0f;
    float largest = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const float term = scalbnf(sums[c], 2 * (static_cast<int>(exponents[c]) - exponent));
      sum += term;
      largest = fmaxf(largest, term);
    }
    sum = block_sum(sum);
    largest = block_max(largest);
    int extra = 0;
    if (isinf(sum) && isfinite(largest)) {  // finite chunk sums whose total overflows: divide by 4^extra
      extra = ilogbf(largest) / 2 + 1;
      sum = 0.0f;
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        sum += scalbnf(sums[c], 2 * (static_cast<int>(exponents[c]) - exponent - extra));
      }
      sum = block_sum(sum);
    }
    if (threadIdx.x == 0) {
      const float scale = scalbnf(1.0f, -(exponent + extra));
      denominators[b] = safety * sqrtf(sum) + eps * scale;
      denominators[batch + b] = scale;
    }
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

// dispatch_dtype over three storage types at once: fn(a_tag, b_tag, c_tag).
template <typename Fn>
cudaError_t dispatch_dtypes(DType a, DType b, DType c, Fn&& fn) {
  return dispatch_dtype(a, [&](auto a_tag) {
    return dispatch_dtype(b, [&](auto b_tag) { return dispatch_dtype(c, [&](auto c_tag) { return fn(a_tag, b_tag, c_tag); }); });
  });
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

// Elements per pack of a kernel over several storage types: one 16-byte access of the narrowest (e.g. 8 for a
// bf16 gradient beside fp32 state: one 16-byte load of the gradient, two of each fp32 tensor).
template <typename T, typename... Rest>
constexpr int narrowest_size() {
  if constexpr (sizeof...(Rest) == 0) {
    return static_cast<int>(sizeof(T));
  } else {
    constexpr int rest = narrowest_size<Rest...>();
    return static_cast<int>(sizeof(T)) < rest ? static_cast<int>(sizeof(T)) : rest;
  }
}
template <typename... T>
constexpr int kPackOf = 16 / narrowest_size<T...>();

// Whether every pointer of a list is aligned for packs of N elements of T.
template <typename T, int N>
inline bool list_aligned_for_pack(void* const* ptrs, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!aligned_for_pack<T, N>(ptrs[i])) return false;
  }
  return true;
}

// Blocks for a memory-bound grid-stride kernel: enough resident blocks to fill every SM of the current GPU
// (2048 threads per SM), never more than the work (one element, or one pack, per thread).
inline unsigned memory_bound_grid(int64_t work, int threads) {
  static int multiprocessors[64] = {};  // per device; a benign race: every writer stores the same value
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) device = 0;
  if (multiprocessors[device] == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1) count = 1;
    multiprocessors[device] = count;
  }
  const int64_t resident = static_cast<int64_t>(multiprocessors[device]) * (2048 / threads);
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks > resident) blocks = resident;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace fastoptim

// NorMuon's row arithmetic (arXiv:2510.05491; fastoptim.reference.normuon_step_), shared by normuon.cu (one
// stack) and apply_stack.cu (a shape bucket's list of parameters) so that both round the same.
namespace fastoptim {

// This thread's share of Σ_j O_j² over a row of n elements (16-byte loads of O when kPacked); block_sum adds
// the shares in a fixed order.
template <typename U, bool kPacked>
__device__ __forceinline__ float normuon_row_sum_share(const U* __restrict__ o, int64_t n) {
  float sum = 0.0f;
  if (kPacked) {
    constexpr int N = kVec<U>;
    const Pack<U, N>* packed = reinterpret_cast<const Pack<U, N>*>(o);
    for (int64_t k = threadIdx.x; k < n / N; k += blockDim.x) {
      const Pack<U, N> pack = packed[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float x = to_float(pack.v[e]);
        sum += x * x;
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float x = to_float(o[j]);
      sum += x * x;
    }
  }
  return sum;
}

// Pass 1's result for one row with Σ_j O_j² = sum (by one thread): v <- lerp(v, sum / n, 1 - beta2); the
// row's contributions to ‖O‖² (sum) and to ‖Ô‖² (sum / (√v + eps)²).
__device__ __forceinline__ void normuon_row_moment(float sum, int64_t n, float* second_moment, float one_minus_beta2,
                                                   float eps, float* plain_sum, float* normalized_sum) {
  const float mean = sum / static_cast<float>(n > 0 ? n : 1);
  const float v = lerp(*second_moment, mean, one_minus_beta2);
  *second_moment = v;
  const float denom = sqrtf(v) + eps;
  *plain_sum = sum;
  *normalized_sum = sum / (denom * denom);
}

// Pass 2 over one row, this thread's elements: Ô_j = O_j · row_scale · norm_rescale with
// row_scale = 1 / (√v + eps) and norm_rescale = ‖O‖ / (‖Ô‖ + eps); p_j <- p_j·keep (cautious: only where
// Ô_j·p_j >= 0) - step·Ô_j. kPacked: 16-byte loads of O, p in packs of the same number of elements.
template <typename P, typename U, bool kPacked>
__device__ __forceinline__ void normuon_apply_row(P* __restrict__ p, const U* __restrict__ o, int64_t n,
                                                  float second_moment, float plain_norm_sq,
                                                  float normalized_norm_sq, float keep, float step, float eps,
                                                  bool cautious) {
  const float norm_rescale = sqrtf(plain_norm_sq) / (sqrtf(normalized_norm_sq) + eps);
  const float row_scale = 1.0f / (sqrtf(second_moment) + eps);
  if (kPacked) {
    constexpr int N = kVec<U>;
    Pack<P, N>* p4 = reinterpret_cast<Pack<P, N>*>(p);
    const Pack<U, N>* o4 = reinterpret_cast<const Pack<U, N>*>(o);
    for (int64_t k = threadIdx.x; k < n / N; k += blockDim.x) {
      Pack<P, N> pp = p4[k];
      const Pack<U, N> oo = o4[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float normalized = to_float(oo.v[e]) * row_scale * norm_rescale;
        const float pv = to_float(pp.v[e]);
        const float decayed = (!cautious || normalized * pv >= 0.0f) ? pv * keep : pv;
        pp.v[e] = from_float<P>(decayed - step * normalized);
      }
      p4[k] = pp;
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float normalized = to_float(o[j]) * row_scale * norm_rescale;
      const float pv = to_float(p[j]);
      const float decayed = (!cautious || normalized * pv >= 0.0f) ? pv * keep : pv;
      p[j] = from_float<P>(decayed - step * normalized);
    }
  }
}

// norms[b] = Σ of matrix b's row sums of O² (row_sums[b·m + r]), norms[batch + b] the same for Ô
// (row_sums[rows + b·m + r]); one block per matrix, a fixed order (no atomics: bit-reproducible).
namespace {
__global__ void matrix_norms_kernel(const float* __restrict__ row_sums, float* __restrict__ norms, int64_t rows,
                                    int64_t m, int64_t batch) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {  // uniform per block: block_sum is safe
    float plain = 0.0f;
    float hat = 0.0f;
    for (int64_t r = threadIdx.x; r < m; r += blockDim.x) {
      plain += row_sums[b * m + r];
      hat += row_sums[rows + b * m + r];
    }
    plain = block_sum(plain);
    hat = block_sum(hat);
    if (threadIdx.x == 0) {
      norms[b] = plain;
      norms[batch + b] = hat;
    }
  }
}
}  // namespace

// Threads per row-block: about one 16-byte vector per thread for short rows, 256 for long ones.
inline int normuon_threads_for_row(int64_t n) {
  const int64_t work = (n + 3) / 4;
  if (work <= 64) return 64;
  if (work <= 128) return 128;
  return 256;
}

}  // namespace fastoptim
