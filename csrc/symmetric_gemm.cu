// symmetric_gemm: the symmetric product of Newton–Schulz on tensor cores, upper-triangle tiles only.
//
//   C = alpha * X Xᵀ + beta * D       X: s x k per matrix (rows of length k, row stride x_row_stride)
//   C = alpha * XᵀX + beta * D        transposed: X is k x s (the Gram of a tall matrix, no copy made)
//
// C and D are s x s, rows contiguous, one matrix every out_batch_stride elements; D is optional
// (nullptr). With X = A symmetric, A·A = A Aᵀ, so the same kernel computes NS's B = c·A·A + b·A
// (alpha = c, beta = b, D = A). X is bf16 or fp16; products accumulate in fp32; C is X's dtype, or fp32
// (launch_symmetric_gemm_fp32_out). D has C's dtype and layout.
//
// Work. A full GEMM costs 2 s²k FLOPs per matrix. X Xᵀ is symmetric, so each block computes one tile
// (i, j) with j >= i and writes it together with its mirror (j, i): nt(nt+1)/2 tiles of
// 2·T²·k FLOPs, nt = ceil(s/T), i.e. s²k (1 + 1/nt) FLOPs, half the GEMM's for large s.
// Bytes (HBM, at least): read X once (2sk), D once (2s² if given), write C (2s², or 4s² for fp32).
// Tiles re-read X's row blocks from L2: about nt/2 times per row block.
//
// Why each choice:
// - mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) with operands loaded by ldmatrix: one code path
//   for sm_80 and sm_90 (wgmma would need sm_90a and a separate kernel).
// - Block tile T = 128 (64 when the 128-tile grid would not fill the SMs, e.g. a few small matrices),
//   BLOCK_K = 32, 8 warps as 2 x 4, each warp a (T/2) x (T/4) sub-tile: 64 fp32 accumulators per thread
//   at T = 128, two blocks per SM.
// - Both operands of the product are row blocks of the same X, stored in shared memory in X's memory
//   order: [T][BLOCK_K] (k contiguous) normally, [BLOCK_K][T] when transposed. The normal layout
//   feeds ldmatrix directly (A is row-major M x K, B is "col" N x K); the transposed layout uses
//   ldmatrix.trans. Either way no copy or transpose of X is made in global memory.
// - Rows padded by 8 elements (16 B): the 8 row addresses of one ldmatrix phase (80 B or 272 B apart)
//   then fall in 8 different 16-byte bank groups, conflict-free, and every row stays 16-byte aligned
//   for cp.async.
// - cp.async double buffering: tile kt+1 is in flight while tile kt is multiplied. Out-of-range
//   elements are zero-filled by cp.async's src-size operand (masked loads without branches on the
//   data). When X's rows are not 16-byte aligned (row stride not a multiple of 8, e.g. k = 100) a
//   fallback loads element by element with the same zero fill.
// - A diagonal tile (i == j) multiplies a row block by itself: loaded once, used as both operands;
//   warps whose sub-tile lies wholly below the diagonal skip the MMAs (nothing of theirs is written).
// - Epilogue through shared memory (fp32, half a tile at a time, rows padded to T + 1 floats so that
//   both row and column reads are conflict-free): the tile is written row by row and its mirror
//   column by column, both coalesced. On a diagonal tile only col >= row is computed and mirrored,
//   so C is exactly symmetric whenever D is (what NS relies on).
// - Grid (tiles, batch): the tile index t decodes to column j = floor((sqrt(8t+1)-1)/2) and row
//   i = t - j(j+1)/2; consecutive blocks share the column block j in L2. Batch offsets are int64;
//   batches beyond 65535 loop over blockIdx.y.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace fastoptim {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kBlockK = 32;
constexpr int kStages = 2;
constexpr int kChunk = 8;    // 16-bit elements in one 16-byte cp.async
constexpr int kPadding = 8;  // elements added to each shared-memory row (16 bytes)
constexpr int kMaxGridY = 65535;

template <int kTile, bool kTransposed>
struct TileShape {
  static constexpr int kWarpRows = kTile / kWarpsM;
  static constexpr int kWarpCols = kTile / kWarpsN;
  static constexpr int kMmaRows = kWarpRows / 16;  // m16 fragments per warp
  static constexpr int kMmaCols = kWarpCols / 8;   // n8 fragments per warp
  // One operand of one stage, in X's memory order.
  static constexpr int kLines = kTransposed ? kBlockK : kTile;
  static constexpr int kLineElems = kTransposed ? kTile : kBlockK;
  static constexpr int kLead = kLineElems + kPadding;
  static constexpr int kOperandElems = kLines * kLead;
  static constexpr int kPipelineBytes = kStages * 2 * kOperandElems * 2;
  // Epilogue: half a tile of fp32.
  static constexpr int kHalfRows = kTile / 2;
  static constexpr int kStagedLead = kTile + 1;
  static constexpr int kEpilogueBytes = kHalfRows * kStagedLead * 4;
  static constexpr int kSmemBytes = kPipelineBytes > kEpilogueBytes ? kPipelineBytes : kEpilogueBytes;

  static_assert(kMmaCols % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  static_assert(kLines * kLineElems % (kChunk * kThreads) == 0, "whole chunks per thread");
  static_assert(kWarpsM == 2, "the epilogue stages one warp row (half a tile) at a time");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory");
};

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared; bytes past src_bytes (0..16) are zero-filled and not read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&frag)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(address)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&frag)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(address)
               : "memory");
}

// acc += a (16x16, row) * b (16x8, col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "bf16 or fp16 inputs");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// One operand of one stage: Gram indices [row0, row0 + kTile) x reduction indices [k0, k0 + kBlockK),
// copied in X's memory order (a "line" is a row of X in memory: a Gram index normally, a reduction
// index when transposed). Elements outside s x k are zero. X's elements are moved as raw 16-bit words.
template <int kTile, bool kTransposed, bool kAsync>
__device__ __forceinline__ void load_operand(uint16_t* tile, const uint16_t* x, int64_t row_stride, int64_t s,
                                             int64_t k, int64_t row0, int64_t k0) {
  using Shape = TileShape<kTile, kTransposed>;
  constexpr int kLineChunks = Shape::kLineElems / kChunk;
  const int64_t line0 = kTransposed ? k0 : row0;
  const int64_t elem0 = kTransposed ? row0 : k0;
  const int64_t line_limit = kTransposed ? k : s;
  const int64_t elem_limit = kTransposed ? s : k;
#pragma unroll
  for (int it = 0; it < Shape::kLines * kLineChunks / kThreads; ++it) {
    const int chunk = it * kThreads + threadIdx.x;
    const int line = chunk / kLineChunks;
    const int elem = (chunk % kLineChunks) * kChunk;
    uint16_t* dst = tile + line * Shape::kLead + elem;
    const int64_t global_line = line0 + line;
    const int64_t global_elem = elem0 + elem;
    const int64_t remaining = global_line < line_limit ? elem_limit - global_elem : 0;
    const int valid = remaining <= 0 ? 0 : remaining < kChunk ? static_cast<int>(remaining) : kChunk;
    // Never form an address past X for masked chunks: they read nothing from the base pointer.
    const uint16_t* src = valid > 0 ? x + global_line * row_stride + global_elem : x;
    if constexpr (kAsync) {
      cp_async_16(shared_address(dst), src, valid * 2);
    } else {
      uint32_t words[kChunk / 2];
#pragma unroll
      for (int w = 0; w < kChunk / 2; ++w) {
        const uint32_t lo = 2 * w < valid ? src[2 * w] : 0u;
        const uint32_t hi = 2 * w + 1 < valid ? src[2 * w + 1] : 0u;
        words[w] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

template <typename T, typename OutT, int kTile, bool kTransposed, bool kAsync>
__global__ void __launch_bounds__(kThreads, 2)
    symmetric_gemm_kernel(const uint16_t* __restrict__ x, OutT* __restrict__ out, const OutT* __restrict__ addend,
                          int64_t batch, int64_t s, int64_t k, int64_t x_batch_stride, int64_t x_row_stride,
                          int64_t out_batch_stride, float alpha, float beta) {
  using Shape = TileShape<kTile, kTransposed>;
  __shared__ __align__(16) unsigned char smem[Shape::kSmemBytes];
  uint16_t* const operands = reinterpret_cast<uint16_t*>(smem);  // [stage][a, b][kOperandElems]
  float* const staged = reinterpret_cast<float*>(smem);           // epilogue, after the main loop

  // Upper-triangle tile t -> (i, j), j >= i, enumerated column by column: t = j(j+1)/2 + i.
  const int64_t t = blockIdx.x;
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (j * (j + 1) / 2 > t) --j;
  while ((j + 1) * (j + 2) / 2 <= t) ++j;
  const int64_t i = t - j * (j + 1) / 2;
  const bool diagonal = i == j;
  const int64_t row0 = i * kTile;
  const int64_t col0 = j * kTile;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int group = lane >> 2;  // row of the accumulator fragment
  const int quad = lane & 3;    // column pair of the accumulator fragment
  // On a diagonal tile only col >= row is written: a sub-tile wholly below the diagonal is skipped.
  const bool warp_below_diagonal =
      diagonal && (warp_n + 1) * Shape::kWarpCols <= warp_m * Shape::kWarpRows;
  const int64_t k_tiles = (k + kBlockK - 1) / kBlockK;

  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const uint16_t* xb = x + b * x_batch_stride;
    auto operand = [&](int stage, int which) { return operands + (2 * stage + which) * Shape::kOperandElems; };
    auto load_stage = [&](int stage, int64_t k0) {
      load_operand<kTile, kTransposed, kAsync>(operand(stage, 0), xb, x_row_stride, s, k, row0, k0);
      if (!diagonal) load_operand<kTile, kTransposed, kAsync>(operand(stage, 1), xb, x_row_stride, s, k, col0, k0);
    };

    float acc[Shape::kMmaRows][Shape::kMmaCols][4];
#pragma unroll
    for (int mi = 0; mi < Shape::kMmaRows; ++mi)
#pragma unroll
      for (int ni = 0; ni < Shape::kMmaCols; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

    if (k_tiles > 0) load_stage(0, 0);
    cp_async_commit();
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      const int stage = static_cast<int>(kt & 1);
      if (kt + 1 < k_tiles) load_stage(stage ^ 1, (kt + 1) * kBlockK);
      cp_async_commit();
      cp_async_wait<1>();  // stage kt has landed; kt + 1 stays in flight
      __syncthreads();
      if (!warp_below_diagonal) {
        const uint16_t* a_tile = operand(stage, 0);
        const uint16_t* b_tile = diagonal ? a_tile : operand(stage, 1);
#pragma unroll
        for (int ks = 0; ks < kBlockK; ks += 16) {
          uint32_t a_frag[Shape::kMmaRows][4];
          uint32_t b_frag[Shape::kMmaCols][2];
#pragma unroll
          for (int mi = 0; mi < Shape::kMmaRows; ++mi) {
            const int m = warp_m * Shape::kWarpRows + mi * 16;
            // Matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
            if constexpr (kTransposed) {
              const int kk = ks + (lane & 7) + (lane >> 4) * 8;
              ldmatrix_x4_trans(a_frag[mi], shared_address(a_tile + kk * Shape::kLead + m + ((lane >> 3) & 1) * 8));
            } else {
              const int row = m + (lane & 15);
              ldmatrix_x4(a_frag[mi], shared_address(a_tile + row * Shape::kLead + ks + (lane >> 4) * 8));
            }
          }
#pragma unroll
          for (int np = 0; np < Shape::kMmaCols / 2; ++np) {
            const int n = warp_n * Shape::kWarpCols + np * 16;
            // Matrices: (cols 0-7, k 0-7), (cols 0-7, k 8-15), (cols 8-15, k 0-7), (cols 8-15, k 8-15).
            uint32_t frag[4];
            if constexpr (kTransposed) {
              const int kk = ks + (lane & 7) + ((lane >> 3) & 1) * 8;
              ldmatrix_x4_trans(frag, shared_address(b_tile + kk * Shape::kLead + n + (lane >> 4) * 8));
            } else {
              const int col = n + (lane & 7) + (lane >> 4) * 8;
              ldmatrix_x4(frag, shared_address(b_tile + col * Shape::kLead + ks + ((lane >> 3) & 1) * 8));
            }
            b_frag[2 * np][0] = frag[0];
            b_frag[2 * np][1] = frag[1];
            b_frag[2 * np + 1][0] = frag[2];
            b_frag[2 * np + 1][1] = frag[3];
          }
#pragma unroll
          for (int mi = 0; mi < Shape::kMmaRows; ++mi)
#pragma unroll
            for (int ni = 0; ni < Shape::kMmaCols; ++ni) mma_m16n8k16<T>(acc[mi][ni], a_frag[mi], b_frag[ni]);
        }
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
    cp_async_wait<0>();

    // Epilogue, half a tile (one warp row) at a time: alpha * acc -> shared memory -> the tile and its mirror.
    OutT* out_b = out + b * out_batch_stride;
    const OutT* addend_b = addend == nullptr ? nullptr : addend + b * out_batch_stride;
    for (int half = 0; half < kWarpsM; ++half) {
      if (warp_m == half) {
#pragma unroll
        for (int mi = 0; mi < Shape::kMmaRows; ++mi)
#pragma unroll
          for (int ni = 0; ni < Shape::kMmaCols; ++ni) {
            const int r = mi * 16 + group;
            const int c = warp_n * Shape::kWarpCols + ni * 8 + 2 * quad;
            staged[r * Shape::kStagedLead + c] = alpha * acc[mi][ni][0];
            staged[r * Shape::kStagedLead + c + 1] = alpha * acc[mi][ni][1];
            staged[(r + 8) * Shape::kStagedLead + c] = alpha * acc[mi][ni][2];
            staged[(r + 8) * Shape::kStagedLead + c + 1] = alpha * acc[mi][ni][3];
          }
      }
      __syncthreads();
      const int64_t half_row0 = row0 + half * Shape::kHalfRows;
      // The tile: consecutive threads along a row of C.
#pragma unroll 4
      for (int e = threadIdx.x; e < Shape::kHalfRows * kTile; e += kThreads) {
        const int r = e / kTile;
        const int c = e % kTile;
        const int64_t row = half_row0 + r;
        const int64_t col = col0 + c;
        if (row < s && col < s && (!diagonal || col >= row)) {
          float value = staged[r * Shape::kStagedLead + c];
          if (addend_b != nullptr) value += beta * to_float(addend_b[row * s + col]);
          out_b[row * s + col] = from_float<OutT>(value);
        }
      }
      // Its mirror: consecutive threads along a row of Cᵀ, i.e. down a column of the staged tile.
#pragma unroll 4
      for (int e = threadIdx.x; e < Shape::kHalfRows * kTile; e += kThreads) {
        const int r = e % Shape::kHalfRows;
        const int c = e / Shape::kHalfRows;
        const int64_t row = half_row0 + r;
        const int64_t col = col0 + c;
        if (row < s && col < s && (!diagonal || col > row)) {
          float value = staged[r * Shape::kStagedLead + c];
          if (addend_b != nullptr) value += beta * to_float(addend_b[col * s + row]);
          out_b[col * s + row] = from_float<OutT>(value);
        }
      }
      __syncthreads();  // staged is rewritten by the next half, or by the next matrix's loads
    }
  }
}

template <typename T, typename OutT, int kTile, bool kTransposed, bool kAsync>
cudaError_t launch_tiled(const void* x, void* out, const void* addend, int64_t batch, int64_t s, int64_t k,
                         int64_t x_batch_stride, int64_t x_row_stride, int64_t out_batch_stride, float alpha,
                         float beta, cudaStream_t stream) {
  const int64_t tiles_per_side = (s + kTile - 1) / kTile;
  const int64_t tiles = tiles_per_side * (tiles_per_side + 1) / 2;
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(batch < kMaxGridY ? batch : kMaxGridY));
  symmetric_gemm_kernel<T, OutT, kTile, kTransposed, kAsync><<<grid, kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(x), static_cast<OutT*>(out), static_cast<const OutT*>(addend), batch, s, k,
      x_batch_stride, x_row_stride, out_batch_stride, alpha, beta);
  return cudaGetLastError();
}

template <typename T, typename OutT, int kTile>
cudaError_t launch_with_tile(const void* x, void* out, const void* addend, int64_t batch, int64_t s, int64_t k,
                             int64_t x_batch_stride, int64_t x_row_stride, int64_t out_batch_stride, bool transposed,
                             bool async, float alpha, float beta, cudaStream_t stream) {
  if (transposed) {
    return async ? launch_tiled<T, OutT, kTile, true, true>(x, out, addend, batch, s, k, x_batch_stride,
                                                             x_row_stride, out_batch_stride, alpha, beta, stream)
                 : launch_tiled<T, OutT, kTile, true, false>(x, out, addend, batch, s, k, x_batch_stride,
                                                              x_row_stride, out_batch_stride, alpha, beta, stream);
  }
  return async ? launch_tiled<T, OutT, kTile, false, true>(x, out, addend, batch, s, k, x_batch_stride,
                                                            x_row_stride, out_batch_stride, alpha, beta, stream)
               : launch_tiled<T, OutT, kTile, false, false>(x, out, addend, batch, s, k, x_batch_stride,
                                                             x_row_stride, out_batch_stride, alpha, beta, stream);
}

template <typename T, typename OutT>
cudaError_t launch_typed(const void* x, void* out, const void* addend, int64_t batch, int64_t s, int64_t k,
                         int64_t x_batch_stride, int64_t x_row_stride, int64_t out_batch_stride, bool transposed,
                         float alpha, float beta, cudaStream_t stream) {
  if (batch == 0 || s == 0) return cudaSuccess;
  if (batch < 0 || s < 0 || k < 0) return cudaErrorInvalidValue;
  if (beta == 0.0f) addend = nullptr;  // as in baddbmm: D is not read (its NaNs do not propagate)
  // cp.async moves 16-byte chunks: X's base, rows and matrices must start on 16-byte boundaries.
  const bool async = reinterpret_cast<uintptr_t>(x) % 16 == 0 && x_row_stride % kChunk == 0 &&
                     (batch == 1 || x_batch_stride % kChunk == 0);
  // The 128-tile grid must cover the SMs at least once, otherwise 64-tiles (4x the blocks) do better.
  int device = 0;
  int sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t side_128 = (s + 127) / 128;
  const bool small = side_128 * (side_128 + 1) / 2 * batch < sms;
  if (small) {
    return launch_with_tile<T, OutT, 64>(x, out, addend, batch, s, k, x_batch_stride, x_row_stride, out_batch_stride,
                                         transposed, async, alpha, beta, stream);
  }
  return launch_with_tile<T, OutT, 128>(x, out, addend, batch, s, k, x_batch_stride, x_row_stride, out_batch_stride,
                                        transposed, async, alpha, beta, stream);
}

}  // namespace

cudaError_t launch_symmetric_gemm(const void* x, void* out, const void* addend, DType dtype, int64_t batch,
                                  int64_t s, int64_t k, int64_t x_batch_stride, int64_t x_row_stride,
                                  int64_t out_batch_stride, bool transposed, float alpha, float beta,
                                  cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, __nv_bfloat16>(x, out, addend, batch, s, k, x_batch_stride, x_row_stride,
                                                        out_batch_stride, transposed, alpha, beta, stream);
    case DType::kFloat16:
      return launch_typed<__half, __half>(x, out, addend, batch, s, k, x_batch_stride, x_row_stride,
                                          out_batch_stride, transposed, alpha, beta, stream);
    case DType::kFloat32:
      break;  // no fp32 tensor-core path: fp32 inputs go to cuBLAS
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_symmetric_gemm_fp32_out(const void* x, float* out, const float* addend, DType dtype,
                                           int64_t batch, int64_t s, int64_t k, int64_t x_batch_stride,
                                           int64_t x_row_stride, int64_t out_batch_stride, bool transposed,
                                           float alpha, float beta, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, float>(x, out, addend, batch, s, k, x_batch_stride, x_row_stride,
                                                out_batch_stride, transposed, alpha, beta, stream);
    case DType::kFloat16:
      return launch_typed<__half, float>(x, out, addend, batch, s, k, x_batch_stride, x_row_stride,
                                         out_batch_stride, transposed, alpha, beta, stream);
    case DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastoptim
