// Plain launchers of the .cu files: raw pointers, sizes and a stream; no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtypes.cuh"

namespace fastoptim {

// p <- p*(1 - lr*wd) [cautious: only where update*p >= 0]; p <- p - lr*scale*update. Contiguous, numel each.
cudaError_t launch_muon_apply(void* param, DType param_dtype, const void* update, DType update_dtype,
                              int64_t numel, float lr, float weight_decay, float scale, bool cautious,
                              cudaStream_t stream);

}  // namespace fastoptim
