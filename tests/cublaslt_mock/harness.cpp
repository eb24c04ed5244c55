// A CPU check of csrc/gemm_lt.cu without a GPU: this file implements the part of the cuBLASLt API that
// gemm_lt.cu calls (and cudaGetDevice / cudaDeviceGetAttribute) on host memory, with cuBLASLt's documented
// column-major semantics and its argument checks, then calls fastoptim::lt_gemm on row-major problems and
// compares with a plain row-major loop. It proves the row-major -> column-major mapping (operand order,
// transpose flags, layouts, leading dimensions, batch strides), the alignments handed to the heuristic,
// the batch chunking, the algorithm cache and the declined path; what it cannot prove (cuBLASLt's kernels,
// the real heuristic) is left to the GPU tests in tests/test_cuda_gemm_lt.py.
//
// Built and run by tests/test_cuda_gemm_lt.py:
//   g++ -std=c++17 -DFASTOPTIM_HAVE_CUBLASLT -I csrc -I $CUDA_HOME/include -isystem <cublasLt.h dir>
//       -x c++ csrc/gemm_lt.cu -x c++ tests/cublaslt_mock/harness.cpp -o harness && ./harness
// Prints one line per failed check and "ok N checks" at the end; exit status 1 when a check failed.

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "launchers.h"

// --------------------------------------------------------------------------------------------------
// The mock

namespace {

struct Layout {
  cudaDataType type;
  uint64_t rows, cols;
  int64_t ld;
  int32_t batch = 1;
  int64_t stride = 0;
};
struct Desc {
  cublasComputeType_t compute;
  cudaDataType scale;
  cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
};
struct Pref {
  uint64_t workspace = 0;
  uint32_t align[4] = {256, 256, 256, 256};
};

int heuristic_calls = 0;
int matmul_calls = 0;
bool decline_all = false;  // the heuristic finds no algorithm
int failures = 0;
int checks = 0;

void check(bool ok, const char* what, long a = 0, long b = 0) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s (%ld, %ld)\n", what, a, b);
  }
}

}  // namespace

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = reinterpret_cast<cublasLtHandle_t>(new int(0));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  *layout = reinterpret_cast<cublasLtMatrixLayout_t>(new Layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete reinterpret_cast<Layout*>(layout);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, size_t size) {
  Layout* l = reinterpret_cast<Layout*>(layout);
  if (attr == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT && size == sizeof(int32_t)) {
    l->batch = *static_cast<const int32_t*>(buf);
  } else if (attr == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET && size == sizeof(int64_t)) {
    l->stride = *static_cast<const int64_t*>(buf);
  } else {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute, cudaDataType scale) {
  *desc = reinterpret_cast<cublasLtMatmulDesc_t>(new Desc{compute, scale});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete reinterpret_cast<Desc*>(desc);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t size) {
  Desc* d = reinterpret_cast<Desc*>(desc);
  if (size != sizeof(cublasOperation_t)) return CUBLAS_STATUS_INVALID_VALUE;
  if (attr == CUBLASLT_MATMUL_DESC_TRANSA) {
    d->transa = *static_cast<const cublasOperation_t*>(buf);
  } else if (attr == CUBLASLT_MATMUL_DESC_TRANSB) {
    d->transb = *static_cast<const cublasOperation_t*>(buf);
  } else {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(new Pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete reinterpret_cast<Pref*>(pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    size_t size) {
  Pref* p = reinterpret_cast<Pref*>(pref);
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == sizeof(uint64_t)) {
    p->workspace = *static_cast<const uint64_t*>(buf);
    return CUBLAS_STATUS_SUCCESS;
  }
  const int index = attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES   ? 0
                    : attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES ? 1
                    : attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES ? 2
                    : attr == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES ? 3
                                                                         : -1;
  if (index < 0 || size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
  p->align[index] = *static_cast<const uint32_t*>(buf);
  return CUBLAS_STATUS_SUCCESS;
}

// cuBLASLt's shape rules: op(A) is m x k, op(B) k x n, C and D m x n, one batch count, ld >= rows.
static bool consistent(const Desc* d, const Layout* a, const Layout* b, const Layout* c, const Layout* dd) {
  const uint64_t m = dd->rows, n = dd->cols;
  const uint64_t a_rows = d->transa == CUBLAS_OP_N ? a->rows : a->cols;
  const uint64_t k = d->transa == CUBLAS_OP_N ? a->cols : a->rows;
  const uint64_t b_rows = d->transb == CUBLAS_OP_N ? b->rows : b->cols;
  const uint64_t b_cols = d->transb == CUBLAS_OP_N ? b->cols : b->rows;
  for (const Layout* l : {a, b, c, dd}) {
    if (l->type != CUDA_R_32F || l->ld < static_cast<int64_t>(l->rows) || l->batch != dd->batch) return false;
  }
  return a_rows == m && b_rows == k && b_cols == n && c->rows == m && c->cols == n;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref,
                                              int requested, cublasLtMatmulHeuristicResult_t results[],
                                              int* returned) {
  ++heuristic_calls;
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  const Desc* dd = reinterpret_cast<const Desc*>(desc);
  if (!consistent(dd, reinterpret_cast<Layout*>(a), reinterpret_cast<Layout*>(b), reinterpret_cast<Layout*>(c),
                  reinterpret_cast<Layout*>(d))) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (decline_all) {
    *returned = 0;
    return CUBLAS_STATUS_SUCCESS;
  }
  const Pref* p = reinterpret_cast<const Pref*>(pref);
  results[0] = cublasLtMatmulHeuristicResult_t{};
  for (int i = 0; i < 4; ++i) results[0].algo.data[i] = p->align[i];  // the algorithm assumes these alignments
  results[0].workspaceSize = p->workspace >= 1024 ? 1024 : 0;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b, const void* beta,
                              const void* C, cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                              cudaStream_t) {
  ++matmul_calls;
  const Desc* dd = reinterpret_cast<const Desc*>(desc);
  const Layout* la = reinterpret_cast<const Layout*>(a);
  const Layout* lb = reinterpret_cast<const Layout*>(b);
  const Layout* lc = reinterpret_cast<const Layout*>(c);
  const Layout* ld = reinterpret_cast<const Layout*>(d);
  if (!consistent(dd, la, lb, lc, ld) || algo == nullptr || C == nullptr || D == nullptr) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (workspace_bytes > 0 && workspace == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  // Every column (a row of the row-major view) of every matrix of the batch must be as aligned as the
  // algorithm was chosen for.
  const void* ptrs[4] = {A, B, C, D};
  const Layout* layouts[4] = {la, lb, lc, ld};
  for (int i = 0; i < 4; ++i) {
    const uint64_t need = algo->data[i];
    for (int32_t k = 0; k < layouts[i]->batch; ++k) {
      for (uint64_t col = 0; col < layouts[i]->cols; ++col) {
        const uintptr_t at = reinterpret_cast<uintptr_t>(ptrs[i]) +
                             4u * static_cast<uintptr_t>(k * layouts[i]->stride + col * layouts[i]->ld);
        if (at % need != 0) {
          check(false, "a column is less aligned than the alignment given to the heuristic", i,
                static_cast<long>(need));
          return CUBLAS_STATUS_INVALID_VALUE;
        }
      }
    }
  }
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  const uint64_t m = ld->rows, n = ld->cols;
  const uint64_t k = dd->transa == CUBLAS_OP_N ? la->cols : la->rows;
  for (int32_t batch = 0; batch < ld->batch; ++batch) {
    const float* pa = static_cast<const float*>(A) + batch * la->stride;
    const float* pb = static_cast<const float*>(B) + batch * lb->stride;
    const float* pc = static_cast<const float*>(C) + batch * lc->stride;
    float* pd = static_cast<float*>(D) + batch * ld->stride;
    for (uint64_t j = 0; j < n; ++j) {
      for (uint64_t i = 0; i < m; ++i) {
        double sum = 0.0;
        for (uint64_t p = 0; p < k; ++p) {
          const float x = dd->transa == CUBLAS_OP_N ? pa[i + p * la->ld] : pa[p + i * la->ld];
          const float y = dd->transb == CUBLAS_OP_N ? pb[p + j * lb->ld] : pb[j + p * lb->ld];
          sum += static_cast<double>(x) * y;
        }
        const float addend = be == 0.0f ? 0.0f : be * pc[i + j * lc->ld];  // C is not read when beta = 0
        pd[i + j * ld->ld] = static_cast<float>(al * sum) + addend;
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"

// --------------------------------------------------------------------------------------------------
// The checks

namespace {

std::mt19937 rng(0);

struct Matrix {  // a row-major (batch, rows, cols) operand with padded rows and batch gaps
  int64_t batch, rows, cols, ld, stride;
  std::vector<float> data;
  Matrix(int64_t b, int64_t r, int64_t c, int64_t pad_ld, int64_t pad_batch)
      : batch(b), rows(r), cols(c), ld(c + pad_ld), stride(r * (c + pad_ld) + pad_batch),
        data(static_cast<size_t>(b * stride + 8)) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& x : data) x = u(rng);
  }
  float at(int64_t b, int64_t i, int64_t j) const { return data[b * stride + i * ld + j]; }
};

// Row-major op(P): M x K. P stored M x K, or K x M when trans_p.
float op_at(const Matrix& P, bool trans, int64_t b, int64_t i, int64_t j) {
  return trans ? P.at(b, j, i) : P.at(b, i, j);
}

void run_case(int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_p, bool trans_q, int64_t pad_ld,
              int64_t pad_batch, float alpha, float beta, bool in_place, bool with_addend) {
  Matrix P(batch, trans_p ? K : M, trans_p ? M : K, pad_ld, pad_batch);
  Matrix Q(batch, trans_q ? N : K, trans_q ? K : N, pad_ld, pad_batch);
  Matrix C(batch, M, N, pad_ld, pad_batch);
  Matrix D(batch, M, N, pad_ld, pad_batch);
  const Matrix C0 = C;
  const Matrix D0 = D;
  Matrix& out = in_place ? C : D;
  std::vector<float> workspace(1024);
  const auto result = fastoptim::lt_gemm(
      fastoptim::DType::kFloat32, batch, M, N, K, P.data.data(), P.ld, P.stride, trans_p, Q.data.data(), Q.ld,
      Q.stride, trans_q, with_addend ? C.data.data() : nullptr, out.data.data(), out.ld, out.stride, alpha, beta,
      false, workspace.data(), static_cast<int64_t>(workspace.size() * sizeof(float)), nullptr);
  check(result == fastoptim::LtResult::kDone, "lt_gemm declined a problem the mock takes", M, N);
  if (result != fastoptim::LtResult::kDone) return;
  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        double sum = 0.0;
        for (int64_t p = 0; p < K; ++p) sum += double(op_at(P, trans_p, b, i, p)) * op_at(Q, trans_q, b, p, j);
        const double want = alpha * sum + (with_addend && beta != 0.0f ? beta * C0.at(b, i, j) : 0.0);
        worst = std::fmax(worst, std::fabs(want - out.at(b, i, j)));
      }
    }
  }
  check(worst < 1e-4, "lt_gemm's result differs from the row-major product", static_cast<long>(worst * 1e6), M);
  // The padding between rows and matrices is never written; the addend is never written unless it is D.
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = N; j < out.ld; ++j) {
        check(out.at(b, i, j) == (in_place ? C0 : D0).at(b, i, j), "a padding element of D was written", i, j);
      }
    }
  }
  if (!in_place) check(C.data == C0.data, "the addend was written", M, N);
}

}  // namespace

int main() {
  // Every transposition, odd sizes, padded leading dimensions and batch gaps, beta 0 without an addend,
  // C = D in place, 1 x 1 and 1 x N.
  const int64_t sizes[][4] = {{1, 1, 1, 1}, {1, 1, 7, 3}, {2, 3, 5, 4}, {3, 7, 2, 9}, {2, 16, 24, 8}, {1, 33, 17, 40}};
  for (const auto& s : sizes) {
    for (int t = 0; t < 4; ++t) {
      const bool trans_p = t & 1, trans_q = t & 2;
      run_case(s[0], s[1], s[2], s[3], trans_p, trans_q, 0, 0, 1.0f, 0.0f, false, false);
      run_case(s[0], s[1], s[2], s[3], trans_p, trans_q, 3, 5, 2.0315f, -4.775f, false, true);
      run_case(s[0], s[1], s[2], s[3], trans_p, trans_q, 1, 0, 1.0f, 3.4445f, true, true);
    }
  }
  // Alignment: a padded row of 3 floats (12 bytes) must not be reported as 16-byte aligned; the mock checks
  // every matrix of the batch against what the heuristic was told.
  run_case(3, 4, 5, 6, false, false, 3, 1, 1.0f, 1.0f, false, true);

  // Batches past one cuBLASLt call: two chunk sizes, each planned once; a second call hits the cache.
  {
    const int heuristics = heuristic_calls, matmuls = matmul_calls;
    run_case(65535 + 3, 1, 2, 1, false, true, 0, 0, 1.0f, 1.0f, false, true);
    check(heuristic_calls - heuristics == 2, "one heuristic query per chunk size", heuristic_calls - heuristics, 2);
    check(matmul_calls - matmuls == 2, "one matmul per chunk", matmul_calls - matmuls, 2);
    run_case(65535 + 3, 1, 2, 1, false, true, 0, 0, 1.0f, 1.0f, false, true);
    check(heuristic_calls - heuristics == 2, "the second call reuses the cached algorithms",
          heuristic_calls - heuristics, 2);
  }

  // Declined: no algorithm -> kDeclined and nothing written; the decline is cached too.
  {
    decline_all = true;
    Matrix P(1, 5, 6, 0, 0), Q(1, 6, 7, 0, 0), D(1, 5, 7, 0, 0);
    const Matrix D0 = D;
    for (int repeat = 0; repeat < 2; ++repeat) {
      const int matmuls = matmul_calls;
      const auto result = fastoptim::lt_gemm(fastoptim::DType::kFloat32, 1, 5, 7, 6, P.data.data(), 6, 30, false,
                                             Q.data.data(), 7, 42, false, nullptr, D.data.data(), 7, 35, 1.0f, 0.0f,
                                             false, nullptr, 0, nullptr);
      check(result == fastoptim::LtResult::kDeclined, "no algorithm: declined", static_cast<long>(result), 1);
      check(matmul_calls == matmuls && D.data == D0.data, "a declined call launches and writes nothing");
    }
    decline_all = false;
  }
  // Nothing to do: an empty problem is done without a call; K = 0 is left to the fallback (D = beta·C).
  {
    const int matmuls = matmul_calls;
    check(fastoptim::lt_gemm(fastoptim::DType::kFloat32, 0, 5, 7, 6, nullptr, 6, 0, false, nullptr, 7, 0, false,
                             nullptr, nullptr, 7, 0, 1.0f, 0.0f, false, nullptr, 0, nullptr) ==
              fastoptim::LtResult::kDone,
          "an empty batch is done");
    float x = 0.0f;
    check(fastoptim::lt_gemm(fastoptim::DType::kFloat32, 1, 1, 1, 0, &x, 1, 0, false, &x, 1, 0, false, &x, &x, 1, 0,
                             1.0f, 1.0f, false, nullptr, 0, nullptr) == fastoptim::LtResult::kDeclined,
          "K = 0 is declined");
    check(matmul_calls == matmuls, "neither launches anything");
  }
  check(fastoptim::lt_available(), "built with FASTOPTIM_HAVE_CUBLASLT: lt_available()");
  check(fastoptim::lt_workspace_bytes() == (32 << 20), "32 MiB of workspace on sm_90");
  if (failures > 0) {
    std::printf("%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("ok %d checks\n", checks);
  return 0;
}
