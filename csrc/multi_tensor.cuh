// Multi-tensor launches: a table of tensor pointers and sizes travels in the kernel arguments (no
// device-side metadata, no copies of the tensors); each block takes one chunk of one tensor, so one
// launch covers up to kMaxTensors tensors of any sizes. Shared by sophia.cu and momentum.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastoptim {

// A launch's blocks: 2048, about four waves of a 132-SM GPU at four 512-thread blocks per SM (the 320 of a
// 4 KB table filled only 60% of an H100 once, and a large list took several launches).
// 4 pointer lists x 96 + 96 sizes + 2048 (tensor, chunk) pairs = 13.8 KB: kernel arguments up to 32764 bytes
// (CUDA 12.1 and newer, Volta and newer GPUs); older toolkits keep the 4 KB table (24 tensors, 320 blocks).
#if CUDART_VERSION >= 12010
constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 2048;
constexpr int kArgumentBytes = 32764;
#else
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int kArgumentBytes = 4096;
#endif
constexpr int64_t kChunk = 1 << 16;

struct TensorTable {
  void* ptr[4][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorTable) + 256 <= kArgumentBytes, "kernel arguments over the limit");
static_assert(kMaxTensors <= 256, "block_tensor is an unsigned char");

// Fills tables tensor by tensor, chunk by chunk, and calls launch(table, blocks) whenever a table is full.
template <typename Launch>
inline cudaError_t for_each_table(void* const* const* lists, int depth, const int64_t* numels, int64_t count,
                                  Launch&& launch) {
  TensorTable table;
  int tensors = 0;
  int blocks = 0;
  for (int64_t t = 0; t < count; ++t) {
    if (numels[t] == 0) continue;
    for (int d = 0; d < depth; ++d) table.ptr[d][tensors] = lists[d][t];
    table.numel[tensors] = numels[t];
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[blocks] = static_cast<unsigned char>(tensors);
      table.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && tensors + 1 == kMaxTensors)) {
        cudaError_t err = launch(table, blocks);
        if (err != cudaSuccess) return err;
        blocks = 0;
        if (!last_chunk) {
          // The rest of this tensor goes on in the next table, as its first entry.
          for (int d = 0; d < depth; ++d) table.ptr[d][0] = table.ptr[d][tensors];
          table.numel[0] = table.numel[tensors];
          tensors = 0;
        } else {
          tensors = -1;
        }
      }
    }
    ++tensors;
  }
  if (blocks > 0) return launch(table, blocks);
  return cudaSuccess;
}

}  // namespace fastoptim
