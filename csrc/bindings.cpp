// The one file with torch headers: tensor checks (TORCH_CHECK), the current stream, and the pybind module.
// Every check names the argument and what was expected; the Python layer validates first, these guard
// direct callers of fastoptim._C.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "launchers.h"

namespace {

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_SAME_SHAPE(x, y) \
  TORCH_CHECK((x).sizes() == (y).sizes(), #x " and " #y " must have the same shape, got ", (x).sizes(), " and ", (y).sizes())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", (x).device(), " and ", (y).device())
#define CHECK_CUDA_LAUNCH(err) \
  TORCH_CHECK((err) == cudaSuccess, "fastoptim CUDA kernel launch failed: ", cudaGetErrorString(err))

fastoptim::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fastoptim::DType::kFloat32;
    case at::kBFloat16:
      return fastoptim::DType::kBFloat16;
    case at::kHalf:
      return fastoptim::DType::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void muon_apply_(at::Tensor param, const at::Tensor& update, double lr, double weight_decay, double scale,
                 bool cautious) {
  CHECK_CUDA(param);
  CHECK_CUDA(update);
  CHECK_SAME_DEVICE(param, update);
  CHECK_CONTIGUOUS(param);
  CHECK_CONTIGUOUS(update);
  CHECK_SAME_SHAPE(param, update);
  const auto param_dtype = to_dtype(param, "param");
  const auto update_dtype = to_dtype(update, "update");
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  CHECK_CUDA_LAUNCH(fastoptim::launch_muon_apply(param.data_ptr(), param_dtype, update.data_ptr(), update_dtype,
                                                 param.numel(), static_cast<float>(lr),
                                                 static_cast<float>(weight_decay), static_cast<float>(scale),
                                                 cautious, stream));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastoptim CUDA kernels";
  m.def("muon_apply_", &muon_apply_, "p <- p*(1-lr*wd) [cautious]; p <- p - lr*scale*update (in place)",
        py::arg("param"), py::arg("update"), py::arg("lr"), py::arg("weight_decay"), py::arg("scale"),
        py::arg("cautious"));
}
