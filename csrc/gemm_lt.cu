// lt_gemm: the batched GEMMs of the Newton–Schulz drivers on cuBLASLt, with the addend C and the output D
// in separate buffers.
//
//   D = alpha · op(P) · op(Q) + beta · C        row-major (batch, M, N); C has D's layout, C may be D
//
// Why: ATen's baddbmm_out(out, self, b1, b2) with beta != 0 first copies `self` into `out` (cuBLAS's
// gemm reads and writes the same C), so every iteration of NS (B = b·A + c·A·A, X' = a·X + B·X) paid two
// memory-bound copy kernels beside its three GEMMs. cublasLtMatmul reads C and writes D: three launches
// per iteration, nothing copied.
//
// Row-major to cuBLAS's column-major: a row-major r x c buffer with row stride ld is, read column-major, its
// transpose (c x r, leading dimension ld). So D = op(P)·op(Q) is computed as Dᵀ = op(Q)ᵀ·op(P)ᵀ: cuBLAS's
// first operand is Q's buffer (op N when Q is stored K x N, T when it is stored N x K), its second P's
// buffer (N when stored M x K, T when stored K x M), its C and D the N x M column-major views of C and D.
// Transposes are flags on the descriptors, never copies.
//
// Algorithms come from cublasLtMatmulAlgoGetHeuristic with the real alignment of every operand (the
// default preference assumes 256-byte alignment) and the caller's workspace; the first answer per
// problem (device, dtype, sizes, strides, alignments, compute type) is cached, so a step queries once.
// Nothing here synchronizes: the heuristic is a host call, the matmul is enqueued on `stream`, and the
// sequence is capturable in a CUDA graph (no allocation: the caller passes the workspace).
//
// Compiled against cuBLASLt only when setup.py found its header and library (FASTOPTIM_HAVE_CUBLASLT);
// otherwise lt_available() is false and lt_gemm declines every call. A declined call (no cuBLASLt, no
// algorithm, an error status before any launch) returns kDeclined, has written nothing, and the caller runs
// its ATen fallback.

#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

#ifdef FASTOPTIM_HAVE_CUBLASLT
#include <cublasLt.h>

#include <array>
#include <map>
#include <mutex>
#include <tuple>
#endif

namespace fastoptim {

#ifdef FASTOPTIM_HAVE_CUBLASLT
namespace {

constexpr int kMaxDevices = 64;
constexpr int64_t kMaxBatchPerCall = 65535;

// One cuBLASLt handle per device, created on first use and kept for the process (as ATen keeps its own).
cublasLtHandle_t handle_for(int device) {
  static std::array<cublasLtHandle_t, kMaxDevices> handles{};
  static std::mutex mutex;
  if (device < 0 || device >= kMaxDevices) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr && cublasLtCreate(&handles[device]) != CUBLAS_STATUS_SUCCESS) {
    handles[device] = nullptr;
  }
  return handles[device];
}

// Largest power of two <= 256 dividing the address and every byte offset added to it.
uint32_t alignment_of(const void* ptr, int64_t ld_bytes, int64_t batch_stride_bytes) {
  uint64_t bits = reinterpret_cast<uintptr_t>(ptr) | static_cast<uint64_t>(ld_bytes) |
                  static_cast<uint64_t>(batch_stride_bytes) | 256u;
  return static_cast<uint32_t>(bits & (~bits + 1));
}

// The algorithm cache: a problem is every number that the descriptors and preferences are made of.
using Problem = std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, uint64_t, uint64_t>;
struct Choice {
  bool found;
  cublasLtMatmulAlgo_t algo;
};

class Descriptors {
 public:
  ~Descriptors() {
    if (pref_) cublasLtMatmulPreferenceDestroy(pref_);
    for (auto layout : layouts_)
      if (layout) cublasLtMatrixLayoutDestroy(layout);
    if (op_) cublasLtMatmulDescDestroy(op_);
  }
  cublasLtMatmulDesc_t op_ = nullptr;
  std::array<cublasLtMatrixLayout_t, 3> layouts_{};  // first operand (Q), second (P), C = D
  cublasLtMatmulPreference_t pref_ = nullptr;
};

bool ok(cublasStatus_t status) { return status == CUBLAS_STATUS_SUCCESS; }

bool make_layout(cublasLtMatrixLayout_t* layout, cudaDataType type, int64_t rows, int64_t cols, int64_t ld,
                 int32_t batch, int64_t batch_stride) {
  if (!ok(cublasLtMatrixLayoutCreate(layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld))) {
    *layout = nullptr;
    return false;
  }
  return ok(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch))) &&
         ok(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &batch_stride,
                                             sizeof(batch_stride)));
}

}  // namespace

bool lt_available() { return true; }

int64_t lt_workspace_bytes() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return 4 << 20;
  }
  return major >= 9 ? (32 << 20) : (4 << 20);  // what ATen gives cuBLAS on Hopper / before it
}

LtResult lt_gemm(DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const void* P, int64_t ld_p,
             int64_t stride_p, bool trans_p, const void* Q, int64_t ld_q, int64_t stride_q, bool trans_q,
             const void* C, void* D, int64_t ld_d, int64_t stride_d, float alpha, float beta, bool allow_tf32,
             void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  if (batch <= 0 || M <= 0 || N <= 0) return LtResult::kDone;  // nothing to write
  if (K <= 0) return LtResult::kDeclined;                          // D = beta·C: the caller's fallback does it
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return LtResult::kDeclined;
  cublasLtHandle_t handle = handle_for(device);
  if (handle == nullptr) return LtResult::kDeclined;
  if (C == nullptr || beta == 0.0f) C = D;  // not read when beta = 0, but cuBLASLt wants a valid pointer
  const cudaDataType type = dtype == DType::kFloat32    ? CUDA_R_32F
                            : dtype == DType::kBFloat16 ? CUDA_R_16BF
                                                        : CUDA_R_16F;
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  const cublasComputeType_t compute =
      dtype == DType::kFloat32 && allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // Batches beyond kMaxBatchPerCall go in chunks: at most two chunk sizes, both planned before anything is
  // launched, so a declined call has written nothing (the fallback may then read C even when C is D).
  // Batch strides count in the alignments whenever batch > 1, so every chunk's pointers align alike.
  const bool many = batch > 1;
  const uint32_t align_q = alignment_of(Q, ld_q * elem, many ? stride_q * elem : 0);
  const uint32_t align_p = alignment_of(P, ld_p * elem, many ? stride_p * elem : 0);
  const uint32_t align_c = alignment_of(C, ld_d * elem, many ? stride_d * elem : 0);
  const uint32_t align_d = alignment_of(D, ld_d * elem, many ? stride_d * elem : 0);
  const uint64_t max_workspace = workspace == nullptr ? 0 : static_cast<uint64_t>(workspace_bytes);
  const int32_t full = static_cast<int32_t>(batch < kMaxBatchPerCall ? batch : kMaxBatchPerCall);
  const int32_t rest = static_cast<int32_t>(batch % full);
  Descriptors plans[2];
  Choice choices[2];
  for (int which = 0; which < (rest > 0 ? 2 : 1); ++which) {
    const int32_t count = which == 0 ? full : rest;
    Descriptors& desc = plans[which];
    const cublasOperation_t op_first = trans_q ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = trans_p ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (!ok(cublasLtMatmulDescCreate(&desc.op_, compute, CUDA_R_32F))) {
      desc.op_ = nullptr;
      return LtResult::kDeclined;
    }
    if (!ok(cublasLtMatmulDescSetAttribute(desc.op_, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first))) ||
        !ok(cublasLtMatmulDescSetAttribute(desc.op_, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)))) {
      return LtResult::kDeclined;
    }
    // Stored column-major shapes: Q's buffer is N x K (op N) or K x N (op T); P's is K x M or M x K.
    if (!make_layout(&desc.layouts_[0], type, trans_q ? K : N, trans_q ? N : K, ld_q, count, stride_q) ||
        !make_layout(&desc.layouts_[1], type, trans_p ? M : K, trans_p ? K : M, ld_p, count, stride_p) ||
        !make_layout(&desc.layouts_[2], type, N, M, ld_d, count, stride_d)) {
      return LtResult::kDeclined;
    }
    const Problem key{device, static_cast<int>(dtype), static_cast<int>(compute), M, N, K, ld_p, ld_q, ld_d,
                      many ? stride_p : 0, many ? stride_q : 0, many ? stride_d : 0, count,
                      (static_cast<int64_t>(trans_p) << 1) | static_cast<int64_t>(trans_q),
                      (static_cast<uint64_t>(align_q) << 32) | align_p,
                      (static_cast<uint64_t>(align_c) << 32) | align_d};
    static std::map<Problem, Choice> cache;
    static std::mutex cache_mutex;
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      auto it = cache.find(key);
      if (it != cache.end()) {
        choices[which] = it->second;
        if (!choices[which].found) return LtResult::kDeclined;
        continue;
      }
    }
    if (!ok(cublasLtMatmulPreferenceCreate(&desc.pref_))) {
      desc.pref_ = nullptr;
      return LtResult::kDeclined;
    }
    const bool set =
        ok(cublasLtMatmulPreferenceSetAttribute(desc.pref_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                                sizeof(max_workspace))) &&
        ok(cublasLtMatmulPreferenceSetAttribute(desc.pref_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_q,
                                                sizeof(align_q))) &&
        ok(cublasLtMatmulPreferenceSetAttribute(desc.pref_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_p,
                                                sizeof(align_p))) &&
        ok(cublasLtMatmulPreferenceSetAttribute(desc.pref_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                sizeof(align_c))) &&
        ok(cublasLtMatmulPreferenceSetAttribute(desc.pref_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d,
                                                sizeof(align_d)));
    if (!set) return LtResult::kDeclined;
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    const bool found = ok(cublasLtMatmulAlgoGetHeuristic(handle, desc.op_, desc.layouts_[0], desc.layouts_[1],
                                                         desc.layouts_[2], desc.layouts_[2], desc.pref_, 1, &result,
                                                         &returned)) &&
                       returned > 0 && ok(result.state) && result.workspaceSize <= max_workspace;
    choices[which] = Choice{found, result.algo};
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      cache.emplace(key, choices[which]);
    }
    if (!found) return LtResult::kDeclined;
  }
  for (int64_t start = 0; start < batch; start += full) {
    const int which = batch - start < full ? 1 : 0;
    Descriptors& desc = plans[which];
    const char* p = static_cast<const char*>(P) + start * stride_p * elem;
    const char* q = static_cast<const char*>(Q) + start * stride_q * elem;
    const char* c = static_cast<const char*>(C) + start * stride_d * elem;
    char* d = static_cast<char*>(D) + start * stride_d * elem;
    // An error status comes before the launch (invalid arguments): the first chunk's leaves D unwritten; a
    // later chunk's leaves D half done, which the caller must not paper over with a fallback.
    if (!ok(cublasLtMatmul(handle, desc.op_, &alpha, q, desc.layouts_[0], p, desc.layouts_[1], &beta, c,
                           desc.layouts_[2], d, desc.layouts_[2], &choices[which].algo, workspace,
                           static_cast<size_t>(max_workspace), stream))) {
      return start == 0 ? LtResult::kDeclined : LtResult::kFailed;
    }
  }
  return LtResult::kDone;
}

#else  // no cuBLASLt in this build

bool lt_available() { return false; }

int64_t lt_workspace_bytes() { return 0; }

LtResult lt_gemm(DType, int64_t, int64_t, int64_t, int64_t, const void*, int64_t, int64_t, bool, const void*,
                 int64_t, int64_t, bool, const void*, void*, int64_t, int64_t, float, float, bool, void*, int64_t,
                 cudaStream_t) {
  return LtResult::kDeclined;
}

#endif

}  // namespace fastoptim
