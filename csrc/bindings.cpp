// The one file with torch headers: tensor checks (TORCH_CHECK), the current stream, and the pybind module.
// Every check names the argument and what was expected; the Python layer validates first, these guard
// direct callers of fastoptim._C.

#include <c10/cuda/CUDAGuard.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "launchers.h"
#include "multi_tensor.cuh"

namespace {

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_SAME_SHAPE(x, y) \
  TORCH_CHECK((x).sizes() == (y).sizes(), #x " and " #y " must have the same shape, got ", (x).sizes(), " and ", (y).sizes())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", (x).device(), " and ", (y).device())
#define CHECK_CUDA_LAUNCH(err) \
  TORCH_CHECK((err) == cudaSuccess, "fastoptim CUDA kernel launch failed: ", cudaGetErrorString(err))

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

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
  CHECK_CUDA_LAUNCH(fastoptim::launch_muon_apply(param.data_ptr(), param_dtype, update.data_ptr(), update_dtype,
                                                 param.numel(), static_cast<float>(1.0 - lr * weight_decay),
                                                 static_cast<float>(lr * scale), cautious, current_stream()));
}

void muon_momentum_(at::Tensor buf, const at::Tensor& grad, std::optional<at::Tensor> nesterov_out, double beta) {
  CHECK_CUDA(buf);
  CHECK_CUDA(grad);
  CHECK_SAME_DEVICE(buf, grad);
  CHECK_CONTIGUOUS(buf);
  CHECK_CONTIGUOUS(grad);
  CHECK_SAME_SHAPE(buf, grad);
  void* out_ptr = nullptr;
  if (nesterov_out.has_value()) {
    const at::Tensor& out = *nesterov_out;
    CHECK_CUDA(out);
    CHECK_SAME_DEVICE(out, buf);
    CHECK_CONTIGUOUS(out);
    CHECK_SAME_SHAPE(out, buf);
    TORCH_CHECK(out.scalar_type() == buf.scalar_type(), "nesterov_out must have buf's dtype ", buf.scalar_type(),
                ", got ", out.scalar_type());
    out_ptr = out.data_ptr();
  }
  const c10::cuda::CUDAGuard guard(buf.device());
  CHECK_CUDA_LAUNCH(fastoptim::launch_muon_momentum(buf.data_ptr(), to_dtype(buf, "buf"), grad.data_ptr(),
                                                    to_dtype(grad, "grad"), out_ptr, buf.numel(),
                                                    static_cast<float>(beta), static_cast<float>(1.0 - beta),
                                                    current_stream()));
}

void normuon_step_(at::Tensor param, const at::Tensor& update, at::Tensor second_moment, double lr,
                   double weight_decay, double beta2, double eps, double scale, bool cautious) {
  CHECK_CUDA(param);
  CHECK_CUDA(update);
  CHECK_CUDA(second_moment);
  CHECK_SAME_DEVICE(param, update);
  CHECK_SAME_DEVICE(param, second_moment);
  CHECK_CONTIGUOUS(param);
  CHECK_CONTIGUOUS(update);
  CHECK_CONTIGUOUS(second_moment);
  CHECK_SAME_SHAPE(param, update);
  TORCH_CHECK(param.dim() >= 2, "param must be (..., m, n), got shape ", param.sizes());
  TORCH_CHECK(second_moment.scalar_type() == at::kFloat, "second_moment must be float32, got ",
              second_moment.scalar_type());
  TORCH_CHECK(second_moment.sizes() == param.sizes().slice(0, param.dim() - 1),
              "second_moment must have shape (..., m) of param ", param.sizes(), ", got ", second_moment.sizes());
  const int64_t m = param.size(-2);
  const int64_t n = param.size(-1);
  const int64_t batch = m == 0 || n == 0 ? 0 : param.numel() / (m * n);
  const int64_t stacked = m == 0 ? 0 : second_moment.numel() / m;
  const c10::cuda::CUDAGuard guard(param.device());
  // Row sums of O² and Ô², then per-matrix norms (launch_normuon_step fills it; no zeroing needed).
  at::Tensor workspace = at::empty({2 * (stacked * m + stacked)}, second_moment.options());
  CHECK_CUDA_LAUNCH(fastoptim::launch_normuon_step(
      param.data_ptr(), to_dtype(param, "param"), update.data_ptr(), to_dtype(update, "update"),
      second_moment.data_ptr<float>(), workspace.data_ptr<float>(), n == 0 ? stacked : batch, m, n,
      static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta2), static_cast<float>(eps),
      static_cast<float>(lr * scale), cautious, current_stream()));
}

// A shape bucket's update stack: a contiguous CUDA (count, m, n) tensor of a kernel dtype.
void check_update_stack(const at::Tensor& updates, size_t count) {
  CHECK_CUDA(updates);
  CHECK_CONTIGUOUS(updates);
  TORCH_CHECK(updates.dim() == 3 && updates.size(0) == static_cast<int64_t>(count), "updates must be a (", count,
              ", m, n) stack, one matrix per param, got shape ", updates.sizes());
}

// Pointers and dtypes of a bucket's parameters: each on updates' device, contiguous, with updates' m*n elements,
// not overlapping the stack it reads.
void collect_params(const std::vector<at::Tensor>& params, const at::Tensor& updates, std::vector<void*>& ptrs,
                    std::vector<fastoptim::DType>& dtypes) {
  const int64_t size = updates.size(1) * updates.size(2);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda() && p.device() == updates.device(), "params[", i, "] must be on ", updates.device(),
                ", got ", p.device());
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] must be contiguous");
    TORCH_CHECK(p.numel() == size, "params[", i, "] must have updates' m*n = ", size, " elements, got shape ",
                p.sizes());
    at::assert_no_overlap(p, updates);
    ptrs.push_back(p.data_ptr());
    dtypes.push_back(to_dtype(p, "params[i]"));
  }
}

// lr or weight_decay given as a 0-dim floating tensor on updates' device: its fp32 value's device address (a
// non-fp32 tensor is converted on the device, into `holder`: no host synchronization), else nullptr.
const float* device_scalar(const std::optional<at::Tensor>& value, const at::Tensor& updates, const char* name,
                           at::Tensor& holder) {
  if (!value.has_value()) return nullptr;
  const at::Tensor& t = *value;
  TORCH_CHECK(t.is_cuda() && t.device() == updates.device(), name, " must be on ", updates.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 0 && at::isFloatingType(t.scalar_type()), name,
              " must be a 0-dim floating-point tensor, got shape ", t.sizes(), " and dtype ", t.scalar_type());
  holder = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  return holder.data_ptr<float>();
}

fastoptim::StepScalars step_scalars(double lr, double weight_decay, double scale, const float* lr_device,
                                    const float* weight_decay_device) {
  // The float path's keep and step are rounded once from double, as for muon_apply_.
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr * scale), static_cast<float>(lr),
          static_cast<float>(weight_decay), static_cast<float>(scale), lr_device, weight_decay_device};
}

// muon_apply_ for each params[i] with updates[i] of the (P, m, n) stack; lr / weight_decay_tensor (0-dim,
// on the device) replace lr / weight_decay when given.
void muon_apply_stack_(const std::vector<at::Tensor>& params, const at::Tensor& updates, double lr,
                       double weight_decay, std::optional<at::Tensor> lr_tensor,
                       std::optional<at::Tensor> weight_decay_tensor, double scale, bool cautious) {
  check_update_stack(updates, params.size());
  const auto update_dtype = to_dtype(updates, "updates");
  std::vector<void*> ptrs;
  std::vector<fastoptim::DType> dtypes;
  collect_params(params, updates, ptrs, dtypes);
  at::Tensor lr_holder, weight_decay_holder;
  const float* lr_device = device_scalar(lr_tensor, updates, "lr_tensor", lr_holder);
  const float* weight_decay_device = device_scalar(weight_decay_tensor, updates, "weight_decay_tensor",
                                                  weight_decay_holder);
  if (params.empty() || updates.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(updates.device());
  CHECK_CUDA_LAUNCH(fastoptim::launch_muon_apply_stack(
      ptrs.data(), dtypes.data(), updates.data_ptr(), update_dtype, static_cast<int64_t>(ptrs.size()),
      updates.size(1) * updates.size(2), step_scalars(lr, weight_decay, scale, lr_device, weight_decay_device),
      cautious, current_stream()));
}

// normuon_step_ for each params[i] with updates[i] of the (P, m, n) stack and its row moments
// second_moments[i] (m fp32, contiguous); lr / weight_decay_tensor as in muon_apply_stack_.
void normuon_step_stack_(const std::vector<at::Tensor>& params, const at::Tensor& updates,
                         const std::vector<at::Tensor>& second_moments, double lr, double weight_decay,
                         std::optional<at::Tensor> lr_tensor, std::optional<at::Tensor> weight_decay_tensor,
                         double beta2, double eps, double scale, bool cautious) {
  check_update_stack(updates, params.size());
  TORCH_CHECK(second_moments.size() == params.size(), "second_moments must have as many tensors as params (",
              params.size(), "), got ", second_moments.size());
  const auto update_dtype = to_dtype(updates, "updates");
  std::vector<void*> ptrs;
  std::vector<fastoptim::DType> dtypes;
  collect_params(params, updates, ptrs, dtypes);
  const int64_t count = static_cast<int64_t>(params.size());
  const int64_t m = updates.size(1);
  const int64_t n = updates.size(2);
  std::vector<float*> moments;
  for (size_t i = 0; i < second_moments.size(); ++i) {
    const at::Tensor& v = second_moments[i];
    TORCH_CHECK(v.is_cuda() && v.device() == updates.device(), "second_moments[", i, "] must be on ",
                updates.device(), ", got ", v.device());
    TORCH_CHECK(v.is_contiguous(), "second_moments[", i, "] must be contiguous");
    TORCH_CHECK(v.scalar_type() == at::kFloat, "second_moments[", i, "] must be float32, got ", v.scalar_type());
    TORCH_CHECK(v.numel() == m, "second_moments[", i, "] must have m = ", m, " elements, got shape ", v.sizes());
    at::assert_no_overlap(v, updates);
    at::assert_no_overlap(v, params[i]);
    moments.push_back(v.data_ptr<float>());
  }
  at::Tensor lr_holder, weight_decay_holder;
  const float* lr_device = device_scalar(lr_tensor, updates, "lr_tensor", lr_holder);
  const float* weight_decay_device = device_scalar(weight_decay_tensor, updates, "weight_decay_tensor",
                                                  weight_decay_holder);
  if (count == 0 || m == 0) return;
  const c10::cuda::CUDAGuard guard(updates.device());
  // Row sums of O² and Ô², then per-matrix norms (the launcher fills it; no zeroing needed).
  at::Tensor workspace = at::empty({2 * (count * m + count)}, updates.options().dtype(at::kFloat));
  CHECK_CUDA_LAUNCH(fastoptim::launch_normuon_step_stack(
      ptrs.data(), dtypes.data(), moments.data(), updates.data_ptr(), update_dtype, workspace.data_ptr<float>(),
      count, m, n, step_scalars(lr, weight_decay, scale, lr_device, weight_decay_device),
      static_cast<float>(1.0 - beta2), static_cast<float>(eps), cautious, current_stream()));
}

// Pointers and sizes of a list of tensors, checked for one device, contiguity and one dtype.
struct TensorList {
  std::vector<void*> ptrs;
  fastoptim::DType dtype = fastoptim::DType::kFloat32;
};

TensorList list_of(const std::vector<at::Tensor>& tensors, const char* name, const at::Tensor& first,
                   const std::vector<at::Tensor>* same_shape_as) {
  TensorList list;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_cuda() && t.device() == first.device(), name, "[", i, "] must be on ", first.device(),
                ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), name, " must share one dtype: ", name, "[", i,
                "] is ", t.scalar_type(), ", ", name, "[0] is ", tensors[0].scalar_type());
    if (same_shape_as != nullptr) {
      TORCH_CHECK(t.sizes() == (*same_shape_as)[i].sizes(), name, "[", i, "] must have shape ",
                  (*same_shape_as)[i].sizes(), ", got ", t.sizes());
    }
    list.ptrs.push_back(t.data_ptr());
  }
  if (!tensors.empty()) list.dtype = to_dtype(tensors[0], name);
  return list;
}

void sophia_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                  std::optional<at::Tensor> unclipped_count, double lr, double beta1, double rho, double weight_decay,
                  double eps) {
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() && hessians.size() == params.size(),
              "params, grads, exp_avgs and hessians must have the same length");
  if (params.empty()) return;
  const at::Tensor& first = params[0];
  TensorList p = list_of(params, "params", first, nullptr);
  TensorList g = list_of(grads, "grads", first, &params);
  TensorList m = list_of(exp_avgs, "exp_avgs", first, &params);
  TensorList h = list_of(hessians, "hessians", first, &params);
  TORCH_CHECK(g.dtype == p.dtype, "grads must have the dtype of params");
  TORCH_CHECK(h.dtype == m.dtype, "hessians must have the dtype of exp_avgs");
  unsigned long long* counter = nullptr;
  if (unclipped_count.has_value()) {
    CHECK_CUDA(*unclipped_count);
    CHECK_SAME_DEVICE(*unclipped_count, first);
    TORCH_CHECK(unclipped_count->scalar_type() == at::kLong && unclipped_count->numel() == 1,
                "unclipped_count must be a one-element int64 tensor");
    counter = reinterpret_cast<unsigned long long*>(unclipped_count->data_ptr<int64_t>());
  }
  std::vector<int64_t> numels;
  for (const auto& t : params) numels.push_back(t.numel());
  const c10::cuda::CUDAGuard guard(first.device());
  CHECK_CUDA_LAUNCH(fastoptim::launch_sophia_step(
      p.ptrs.data(), p.dtype, g.ptrs.data(), m.ptrs.data(), h.ptrs.data(), m.dtype, numels.data(),
      static_cast<int64_t>(numels.size()), static_cast<float>(lr), static_cast<float>(1.0 - beta1),
      static_cast<float>(rho), static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(eps), counter,
      current_stream()));
}

namespace {
// The checks muon_momentum_stack_ and muon_stack_recompute_ make first; false: nothing to do (no matrices or an
// empty stack).
bool stack_has_work(const std::vector<at::Tensor>& bufs, const std::vector<at::Tensor>& grads, const at::Tensor& out,
                    const std::vector<int64_t>& indices) {
  TORCH_CHECK(grads.size() == bufs.size() && indices.size() == bufs.size(),
              "bufs, grads and indices must have the same length");
  CHECK_CUDA(out);
  CHECK_CONTIGUOUS(out);
  TORCH_CHECK(out.dim() == 3, "out must be a (P, m, n) stack, got ", out.sizes());
  return !bufs.empty() && out.numel() > 0;
}

// What muon_momentum_stack_ and muon_stack_recompute_ check and pass: the lists, each slice's address in the
// (P, m, n) stack out, and the (P, 2·max_chunks) partials (sums, then exponents).
struct StackArgs {
  TensorList b;
  TensorList g;
  std::vector<void*> outs;
  std::vector<int64_t> numels;
  char* base = nullptr;
  int64_t matrix_bytes = 0;
  float* partials = nullptr;
  int64_t max_chunks = 0;
};

StackArgs stack_args(const std::vector<at::Tensor>& bufs, const std::vector<at::Tensor>& grads, const at::Tensor& out,
                     const std::vector<int64_t>& indices, const std::optional<at::Tensor>& partials) {
  const int64_t size = out.size(1) * out.size(2);
  StackArgs args{list_of(bufs, "bufs", out, nullptr), list_of(grads, "grads", out, &bufs)};
  args.base = static_cast<char*>(out.data_ptr());
  args.matrix_bytes = size * out.element_size();
  for (size_t k = 0; k < bufs.size(); ++k) {
    TORCH_CHECK(indices[k] >= 0 && indices[k] < out.size(0), "indices[", k, "] out of range for out ", out.sizes());
    TORCH_CHECK(bufs[k].numel() == size, "bufs[", k, "] must have out's m*n = ", size, " elements, got ",
                bufs[k].sizes());
    args.outs.push_back(args.base + indices[k] * args.matrix_bytes);
    args.numels.push_back(size);
  }
  if (partials.has_value()) {
    CHECK_CUDA(*partials);
    CHECK_SAME_DEVICE(*partials, out);
    CHECK_CONTIGUOUS(*partials);
    TORCH_CHECK(partials->scalar_type() == at::kFloat && partials->dim() == 2 && partials->size(0) == out.size(0),
                "partials must be a float32 (P, 2*chunks) tensor, got ", partials->sizes());
    const int64_t chunks = (size + fastoptim::kChunk - 1) / fastoptim::kChunk;
    TORCH_CHECK(partials->size(1) % 2 == 0 && partials->size(1) / 2 >= chunks, "partials must have 2*c columns, c >= ",
                chunks, " (a sum and an exponent per ", fastoptim::kChunk, "-element chunk of an m*n = ", size,
                " matrix), got ", partials->sizes());
    args.partials = partials->data_ptr<float>();
    args.max_chunks = partials->size(1) / 2;
  }
  return args;
}
}  // namespace

// The momentum of bufs[k] goes into out[indices[k]] (out: the bucket's contiguous (P, m, n) stack). With
// partials ((P, 2·max_chunks) fp32), each chunk's sum of squares of the stored values (and its exponent) is
// written there too; a float16 out is then not written (its values may exceed 65504 before they are
// normalized): muon_stack_recompute_ writes it.
void muon_momentum_stack_(const std::vector<at::Tensor>& bufs, const std::vector<at::Tensor>& grads, at::Tensor out,
                          const std::vector<int64_t>& indices, double beta, bool nesterov,
                          std::optional<at::Tensor> partials) {
  if (!stack_has_work(bufs, grads, out, indices)) return;
  StackArgs args = stack_args(bufs, grads, out, indices, partials);
  const bool store_out = !(partials.has_value() && out.scalar_type() == at::kHalf);
  const c10::cuda::CUDAGuard guard(out.device());
  CHECK_CUDA_LAUNCH(fastoptim::launch_muon_momentum_stack(
      args.b.ptrs.data(), args.b.dtype, args.g.ptrs.data(), args.g.dtype, args.outs.data(), to_dtype(out, "out"),
      args.numels.data(), static_cast<int64_t>(args.numels.size()), static_cast<float>(beta),
      static_cast<float>(1.0 - beta), nesterov, args.partials, store_out, args.base, args.matrix_bytes,
      args.max_chunks, current_stream()));
}

// A float16 stack after muon_momentum_stack_(..., partials): out[indices[k]] <- U_k / (safety·‖U_k‖_F + eps)
// with U_k recomputed from the new bufs[k] (and grads[k]). bufs and grads may mix dtypes: every matrix's
// denominator is computed once, then one recompute launch per (buf dtype, grad dtype) group.
void muon_stack_recompute_(const std::vector<at::Tensor>& bufs, const std::vector<at::Tensor>& grads, at::Tensor out,
                           const std::vector<int64_t>& indices, double beta, bool nesterov, const at::Tensor& partials,
                           double safety, double eps) {
  if (!stack_has_work(bufs, grads, out, indices)) return;
  TORCH_CHECK(grads.size() == bufs.size(), "bufs and grads must have the same length");
  // Groups in order of first appearance.
  std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>> groups;
  for (size_t k = 0; k < bufs.size(); ++k) {
    const auto key = std::make_pair(bufs[k].scalar_type(), grads[k].scalar_type());
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (it == groups.end()) {
      groups.push_back({key, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(k);
  }
  std::vector<StackArgs> launches;  // every group checked before anything is launched
  for (const auto& group : groups) {
    std::vector<at::Tensor> b, g;
    std::vector<int64_t> i;
    for (size_t k : group.second) {
      b.push_back(bufs[k]);
      g.push_back(grads[k]);
      i.push_back(indices[k]);
    }
    launches.push_back(stack_args(b, g, out, i, partials));
  }
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor denominators = at::empty({2 * out.size(0)}, partials.options());
  CHECK_CUDA_LAUNCH(fastoptim::launch_matrix_denominators(partials.data_ptr<float>(), denominators.data_ptr<float>(),
                                                          out.size(0), launches[0].max_chunks,
                                                          static_cast<float>(safety), static_cast<float>(eps),
                                                          current_stream()));
  for (const StackArgs& args : launches) {
    CHECK_CUDA_LAUNCH(fastoptim::launch_muon_stack_recompute(
        args.b.ptrs.data(), args.b.dtype, args.g.ptrs.data(), args.g.dtype, args.outs.data(), to_dtype(out, "out"),
        args.numels.data(), static_cast<int64_t>(args.numels.size()), static_cast<float>(beta), nesterov,
        denominators.data_ptr<float>(), out.size(0), args.base, args.matrix_bytes, current_stream()));
  }
}

// out[i] <- out[i] / (safety·‖out[i]‖_F + eps), after muon_momentum_stack_ filled partials (sums, exponents).
void muon_stack_normalize_(at::Tensor out, const at::Tensor& partials, double safety, double eps) {
  CHECK_CUDA(out);
  CHECK_CONTIGUOUS(out);
  CHECK_CUDA(partials);
  CHECK_SAME_DEVICE(partials, out);
  CHECK_CONTIGUOUS(partials);
  TORCH_CHECK(out.dim() == 3, "out must be a (P, m, n) stack, got ", out.sizes());
  TORCH_CHECK(partials.scalar_type() == at::kFloat && partials.dim() == 2 && partials.size(0) == out.size(0) &&
                  partials.size(1) % 2 == 0,
              "partials must be a float32 (P, 2*chunks) tensor, got ", partials.sizes());
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor denominators = at::empty({2 * out.size(0)}, partials.options());
  CHECK_CUDA_LAUNCH(fastoptim::launch_muon_stack_normalize(
      out.data_ptr(), to_dtype(out, "out"), partials.data_ptr<float>(), denominators.data_ptr<float>(), out.size(0),
      out.size(1) * out.size(2), partials.size(1) / 2, static_cast<float>(safety), static_cast<float>(eps),
      current_stream()));
}

void hessian_ema_(const std::vector<at::Tensor>& hessians, const std::vector<at::Tensor>& estimates, double beta2) {
  TORCH_CHECK(estimates.size() == hessians.size(), "hessians and estimates must have the same length");
  if (hessians.empty()) return;
  const at::Tensor& first = hessians[0];
  TensorList h = list_of(hessians, "hessians", first, nullptr);
  TensorList e = list_of(estimates, "estimates", first, &hessians);
  std::vector<int64_t> numels;
  for (const auto& t : hessians) numels.push_back(t.numel());
  const c10::cuda::CUDAGuard guard(first.device());
  CHECK_CUDA_LAUNCH(fastoptim::launch_hessian_ema(h.ptrs.data(), h.dtype, e.ptrs.data(), e.dtype, numels.data(),
                                                  static_cast<int64_t>(numels.size()),
                                                  static_cast<float>(1.0 - beta2), current_stream()));
}

// out <- alpha * x @ x.mT + beta * addend (transposed: alpha * x.mT @ x + beta * addend), computing only the
// upper-triangle tiles and mirroring them (csrc/symmetric_gemm.cu).
void symmetric_gemm(const at::Tensor& x, at::Tensor out, std::optional<at::Tensor> addend, bool transposed,
                    double alpha, double beta) {
  CHECK_CUDA(x);
  CHECK_CUDA(out);
  CHECK_SAME_DEVICE(x, out);
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must be (batch, s, k) or (s, k)",
              transposed ? " (transposed: k before s)" : "", ", got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "x must have a contiguous last dimension, got strides ",
              x.strides());
  const at::Tensor x3 = x.dim() == 2 ? x.unsqueeze(0) : x;
  const int64_t batch = x3.size(0);
  const int64_t s = transposed ? x3.size(2) : x3.size(1);
  const int64_t k = transposed ? x3.size(1) : x3.size(2);
  const std::vector<int64_t> expected = x.dim() == 2 ? std::vector<int64_t>{s, s} : std::vector<int64_t>{batch, s, s};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), "out must have shape ", at::IntArrayRef(expected),
              " for x of shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() || out.scalar_type() == at::kFloat, "out must be ",
              x.scalar_type(), " (x's dtype) or float32, got ", out.scalar_type());
  CHECK_CONTIGUOUS(out);
  // Blocks write out while others still read x; the addend is read and written by the same thread, so
  // out may be the addend itself (B = c·A·A + b·A in place) but not a part of it.
  at::assert_no_overlap(out, x);
  const void* addend_ptr = nullptr;
  if (addend.has_value()) {
    const at::Tensor& d = *addend;
    CHECK_CUDA(d);
    CHECK_SAME_DEVICE(d, out);
    CHECK_CONTIGUOUS(d);
    TORCH_CHECK(d.sizes() == out.sizes(), "addend must have out's shape ", out.sizes(), ", got ", d.sizes());
    TORCH_CHECK(d.scalar_type() == out.scalar_type(), "addend must have out's dtype ", out.scalar_type(), ", got ",
                d.scalar_type());
    at::assert_no_partial_overlap(out, d);
    addend_ptr = d.data_ptr();
  }
  if (out.numel() == 0) return;
  const auto dtype = x.scalar_type() == at::kBFloat16 ? fastoptim::DType::kBFloat16 : fastoptim::DType::kFloat16;
  // Strides of size-1 dimensions are arbitrary in torch; 0 keeps the cp.async alignment test honest.
  const int64_t x_batch_stride = batch > 1 ? x3.stride(0) : 0;
  const int64_t x_row_stride = x3.size(1) > 1 ? x3.stride(1) : 0;
  const c10::cuda::CUDAGuard guard(x.device());
  if (out.scalar_type() == at::kFloat) {
    CHECK_CUDA_LAUNCH(fastoptim::launch_symmetric_gemm_fp32_out(
        x.data_ptr(), out.data_ptr<float>(), static_cast<const float*>(addend_ptr), dtype, batch, s, k,
        x_batch_stride, x_row_stride, s * s, transposed, static_cast<float>(alpha), static_cast<float>(beta),
        current_stream()));
  } else {
    CHECK_CUDA_LAUNCH(fastoptim::launch_symmetric_gemm(x.data_ptr(), out.data_ptr(), addend_ptr, dtype, batch, s, k,
                                                       x_batch_stride, x_row_stride, s * s, transposed,
                                                       static_cast<float>(alpha), static_cast<float>(beta),
                                                       current_stream()));
  }
}

// A (batch, rows, cols) operand as cuBLASLt reads it: rows contiguous (row-major, leading dimension = the
// row stride) or columns contiguous (a transposed view of a row-major cols x rows buffer). Size-1
// dimensions have arbitrary strides in torch: they are read as the packed value.
struct Operand {
  const void* data;
  int64_t ld;
  int64_t batch_stride;
  bool transposed;
};

std::optional<Operand> as_operand(const at::Tensor& t) {
  const int64_t rows = t.size(1), cols = t.size(2);
  const int64_t batch_stride = t.size(0) > 1 ? t.stride(0) : 0;
  if (cols == 1 || t.stride(2) == 1) {
    const int64_t ld = rows > 1 ? t.stride(1) : std::max<int64_t>(cols, 1);
    if (ld >= std::max<int64_t>(cols, 1)) return Operand{t.data_ptr(), ld, batch_stride, false};
  }
  if (rows == 1 || t.stride(1) == 1) {
    const int64_t ld = cols > 1 ? t.stride(2) : std::max<int64_t>(rows, 1);
    if (ld >= std::max<int64_t>(rows, 1)) return Operand{t.data_ptr(), ld, batch_stride, true};
  }
  return std::nullopt;
}

// out = alpha·p@q + beta·addend for (batch, M, K) @ (batch, K, N) -> (batch, M, N), all of one dtype on one
// device: on cuBLASLt (csrc/gemm_lt.cu, addend and out separate: no copy) when use_lt and it takes the
// problem, else through ATen (baddbmm_out copies the addend into out first). addend (nullopt when beta == 0)
// must have out's layout for cuBLASLt; out must not overlap p or q. `workspace` is allocated on first use.
// Returns whether cuBLASLt ran it.
bool gemm_into(at::Tensor& out, const at::Tensor& p, const at::Tensor& q, double alpha, double beta,
               const std::optional<at::Tensor>& addend, bool use_lt, at::Tensor& workspace) {
  const bool add = addend.has_value() && beta != 0.0;
  if (use_lt && fastoptim::lt_available()) {
    const auto P = as_operand(p);
    const auto Q = as_operand(q);
    const auto D = as_operand(out);
    const bool same_layout = !add || (addend->strides() == out.strides() && addend->sizes() == out.sizes());
    if (P && Q && D && !D->transposed && same_layout) {
      if (!workspace.defined()) {
        workspace = at::empty({fastoptim::lt_workspace_bytes()}, out.options().dtype(at::kByte));
      }
      const auto result = fastoptim::lt_gemm(
          to_dtype(out, "out"), out.size(0), out.size(1), out.size(2), p.size(2), P->data, P->ld, P->batch_stride,
          P->transposed, Q->data, Q->ld, Q->batch_stride, Q->transposed, add ? addend->data_ptr() : nullptr,
          out.data_ptr(), D->ld, D->batch_stride, static_cast<float>(alpha), static_cast<float>(add ? beta : 0.0),
          at::globalContext().allowTF32CuBLAS(), workspace.numel() > 0 ? workspace.data_ptr() : nullptr,
          workspace.numel(), current_stream());
      TORCH_CHECK(result != fastoptim::LtResult::kFailed,
                  "fastoptim cuBLASLt GEMM failed after its first batch chunk (batch ", out.size(0), ")");
      if (result == fastoptim::LtResult::kDone) return true;
    }
  }
  if (add) {
    at::baddbmm_out(out, *addend, p, q, beta, alpha);
  } else {
    at::bmm_out(out, p, q);
    if (alpha != 1.0) out.mul_(alpha);
  }
  return false;
}

// fastoptim._C.gemm_: gemm_into for Python callers (the Gram driver in _cuda_backend.py), with the checks.
bool gemm_(at::Tensor out, const at::Tensor& p, const at::Tensor& q, double alpha, double beta,
           std::optional<at::Tensor> addend, bool use_cublaslt) {
  CHECK_CUDA(out);
  CHECK_CUDA(p);
  CHECK_CUDA(q);
  CHECK_SAME_DEVICE(out, p);
  CHECK_SAME_DEVICE(out, q);
  TORCH_CHECK(out.dim() == 3 && p.dim() == 3 && q.dim() == 3, "out, p and q must be (batch, rows, cols), got ",
              out.sizes(), ", ", p.sizes(), " and ", q.sizes());
  TORCH_CHECK(p.size(0) == out.size(0) && q.size(0) == out.size(0) && p.size(1) == out.size(1) &&
                  q.size(2) == out.size(2) && p.size(2) == q.size(1),
              "p @ q must have out's shape: p (batch, M, K), q (batch, K, N), out (batch, M, N), got p ", p.sizes(),
              ", q ", q.sizes(), ", out ", out.sizes());
  TORCH_CHECK(p.scalar_type() == out.scalar_type() && q.scalar_type() == out.scalar_type(),
              "p and q must have out's dtype ", out.scalar_type(), ", got ", p.scalar_type(), " and ", q.scalar_type());
  to_dtype(out, "out");
  if (addend.has_value()) {
    CHECK_CUDA(*addend);
    CHECK_SAME_DEVICE(out, *addend);
    CHECK_SAME_SHAPE(*addend, out);
    TORCH_CHECK(addend->scalar_type() == out.scalar_type(), "addend must have out's dtype ", out.scalar_type(),
                ", got ", addend->scalar_type());
  } else {
    TORCH_CHECK(beta == 0.0, "beta must be 0 without an addend, got ", beta);
  }
  at::assert_no_overlap(out, p);
  at::assert_no_overlap(out, q);
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor workspace;
  return gemm_into(out, p, q, alpha, beta, addend, use_cublaslt, workspace);
}

// The whole Newton–Schulz iteration of a stack in one call, without returning to Python between steps
// (so the sequence is CUDA-graph capturable): the hand-written prologue (norm, scale, cast), then per
// (a, b, c) three GEMMs whose epilogues carry the linear terms, on cuBLASLt with the addend and the output
// in separate buffers (use_cublaslt; gemm_into: three launches per iteration, no copies), else through
// ATen's bmm/baddbmm (whose beta != 0 form copies its addend into the output first):
//   wide (m <= n): A = X Xᵀ;  B = b·A + c·A·A (baddbmm: beta=b, alpha=c);  X' = a·X + B·X (beta=a)
//   tall (m > n):  A = XᵀX;   B = b·A + c·A·A;                              X' = a·X + X·B
// Transposes are strides handed to cuBLAS, never copies. Workspaces (A, B, two X and cuBLASLt's) are
// allocated once.
// use_symmetric (16-bit compute only): A and B come from the upper-triangle tensor-core kernel instead
// of cuBLAS (half the FLOPs of those two products); the caller decides per shape from measured data.
at::Tensor newton_schulz(const at::Tensor& G, const std::vector<double>& coefficients, double safety, double eps,
                         at::ScalarType compute_dtype, bool use_symmetric, bool normalized, bool use_cublaslt) {
  CHECK_CUDA(G);
  TORCH_CHECK(G.dim() >= 2, "G must be (..., m, n), got shape ", G.sizes());
  TORCH_CHECK(coefficients.size() % 3 == 0, "coefficients must hold (a, b, c) triples, got ",
              coefficients.size(), " values");
  TORCH_CHECK(compute_dtype == at::kBFloat16 || compute_dtype == at::kHalf || compute_dtype == at::kFloat,
              "compute_dtype must be bfloat16, float16 or float32, got ", compute_dtype);
  const int64_t m = G.size(-2);
  const int64_t n = G.size(-1);
  // A stack view (batch, m, n) of G without a copy: collapsible leading dimensions are required. The batch
  // is the product of the leading sizes (view(-1, m, n) cannot infer it when m·n = 0).
  int64_t leading = 1;
  for (int64_t d = 0; d + 2 < G.dim(); ++d) leading *= G.size(d);
  const at::Tensor stack = G.dim() == 3 ? G : G.dim() == 2 ? G.unsqueeze(0) : G.view({leading, m, n});
  const int64_t batch = stack.size(0);
  const c10::cuda::CUDAGuard guard(G.device());
  const size_t steps = coefficients.size() / 3;
  const bool iterate = steps > 0 && batch > 0 && m > 0 && n > 0;
  // A normalized G already in the compute dtype is read by step 0 in place (never written): no copy.
  const bool read_in_place = normalized && iterate && stack.scalar_type() == compute_dtype && stack.is_contiguous();
  at::Tensor X = read_in_place ? stack : at::empty({batch, m, n}, G.options().dtype(compute_dtype));
  if (normalized && !read_in_place) {  // G is X₀ already: a cast into the workspace
    X.copy_(stack);
  } else if (!normalized) {
    at::Tensor workspace =
        at::empty({fastoptim::ns_prologue_workspace_floats(batch, m, n)}, G.options().dtype(at::kFloat));
    CHECK_CUDA_LAUNCH(fastoptim::launch_ns_prologue(
        stack.data_ptr(), to_dtype(stack, "G"), X.data_ptr(), to_dtype(X, "compute_dtype"),
        workspace.data_ptr<float>(), batch, m, n, stack.stride(0), stack.stride(1), stack.stride(2),
        static_cast<float>(safety), static_cast<float>(eps), current_stream()));
  }
  if (iterate) {
    const bool tall = m > n;
    const int64_t s = tall ? n : m;
    at::Tensor A = at::empty({batch, s, s}, X.options());
    at::Tensor B = at::empty({batch, s, s}, X.options());
    at::Tensor next = at::empty({batch, m, n}, X.options());
    const bool symmetric = use_symmetric && compute_dtype != at::kFloat;
    at::Tensor lt_workspace;  // cuBLASLt's, on first use
    for (size_t step = 0; step < steps; ++step) {
      const double a = coefficients[3 * step], b = coefficients[3 * step + 1], c = coefficients[3 * step + 2];
      if (symmetric) {
        symmetric_gemm(X, A, std::nullopt, tall, 1.0, 0.0);
        symmetric_gemm(A, B, A, /*transposed=*/false, /*alpha=*/c, /*beta=*/b);  // A·A = A·Aᵀ: A is symmetric
      } else {
        if (tall) {
          gemm_into(A, X.transpose(1, 2), X, 1.0, 0.0, std::nullopt, use_cublaslt, lt_workspace);
        } else {
          gemm_into(A, X, X.transpose(1, 2), 1.0, 0.0, std::nullopt, use_cublaslt, lt_workspace);
        }
        gemm_into(B, A, A, /*alpha=*/c, /*beta=*/b, A, use_cublaslt, lt_workspace);
      }
      if (tall) {
        gemm_into(next, X, B, /*alpha=*/1.0, /*beta=*/a, X, use_cublaslt, lt_workspace);
      } else {
        gemm_into(next, B, X, /*alpha=*/1.0, /*beta=*/a, X, use_cublaslt, lt_workspace);
      }
      if (X.is_same(stack)) {  // step 0 read G: the next step writes a workspace of its own
        X = next;
        next = at::empty({batch, m, n}, X.options());
      } else {
        std::swap(X, next);
      }
    }
  }
  return X.view(G.sizes());
}

}  // namespace

#define FASTOPTIM_STRINGIFY_(x) #x
#define FASTOPTIM_STRINGIFY(x) FASTOPTIM_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastoptim CUDA kernels";
  // torch.__version__ of the build (setup.py passes it): torch has no stable C++ ABI, so the backend
  // refuses an extension built against another torch instead of crashing in it.
#ifdef FASTOPTIM_TORCH_VERSION
  m.attr("TORCH_VERSION") = FASTOPTIM_STRINGIFY(FASTOPTIM_TORCH_VERSION);
#endif
  // Elements per block of the multi-tensor kernels: the chunk count of muon_momentum_stack_'s partials.
  m.attr("MULTI_TENSOR_CHUNK") = fastoptim::kChunk;
  m.def("muon_apply_", &muon_apply_, "p <- p*(1-lr*wd) [cautious]; p <- p - lr*scale*update (in place)",
        py::arg("param"), py::arg("update"), py::arg("lr"), py::arg("weight_decay"), py::arg("scale"),
        py::arg("cautious"));
  m.def("muon_momentum_", &muon_momentum_, "buf <- lerp(buf, grad, 1-beta); nesterov_out <- lerp(grad, buf, beta)",
        py::arg("buf"), py::arg("grad"), py::arg("nesterov_out"), py::arg("beta"));
  m.def("muon_momentum_stack_", &muon_momentum_stack_,
        "muon_momentum_ over a list of same-size matrices, Newton-Schulz inputs into one (P, m, n) stack",
        py::arg("bufs"), py::arg("grads"), py::arg("out"), py::arg("indices"), py::arg("beta"), py::arg("nesterov"),
        py::arg("partials"));
  m.def("muon_stack_normalize_", &muon_stack_normalize_, "out[i] /= safety * ||out[i]||_F + eps, from the partials",
        py::arg("out"), py::arg("partials"), py::arg("safety"), py::arg("eps"));
  m.def("muon_stack_recompute_", &muon_stack_recompute_,
        "float16 out[indices[k]] <- U_k / (safety * ||U_k||_F + eps), U_k recomputed from bufs[k], grads[k]",
        py::arg("bufs"), py::arg("grads"), py::arg("out"), py::arg("indices"), py::arg("beta"), py::arg("nesterov"),
        py::arg("partials"), py::arg("safety"), py::arg("eps"));
  m.def("muon_apply_stack_", &muon_apply_stack_,
        "muon_apply_ for each params[i] with updates[i] of a (P, m, n) stack, in one launch per table",
        py::arg("params"), py::arg("updates"), py::arg("lr"), py::arg("weight_decay"), py::arg("lr_tensor"),
        py::arg("weight_decay_tensor"), py::arg("scale"), py::arg("cautious"));
  m.def("normuon_step_stack_", &normuon_step_stack_,
        "normuon_step_ for each params[i] with updates[i] of a (P, m, n) stack and second_moments[i]",
        py::arg("params"), py::arg("updates"), py::arg("second_moments"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("lr_tensor"), py::arg("weight_decay_tensor"), py::arg("beta2"), py::arg("eps"), py::arg("scale"),
        py::arg("cautious"));
  m.def("normuon_step_", &normuon_step_, "NorMuon row normalization and step (in place on param, second_moment)",
        py::arg("param"), py::arg("update"), py::arg("second_moment"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("beta2"), py::arg("eps"), py::arg("scale"), py::arg("cautious"));
  m.def("sophia_step_", &sophia_step_, "multi-tensor Sophia step (in place on params, exp_avgs)", py::arg("params"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("hessians"), py::arg("unclipped_count"), py::arg("lr"),
        py::arg("beta1"), py::arg("rho"), py::arg("weight_decay"), py::arg("eps"));
  m.def("newton_schulz", &newton_schulz, "the whole Newton–Schulz iteration of a stack (returns a new tensor)",
        py::arg("G"), py::arg("coefficients"), py::arg("safety"), py::arg("eps"), py::arg("compute_dtype"),
        py::arg("use_symmetric") = false, py::arg("normalized") = false, py::arg("use_cublaslt") = true);
  m.def("gemm_", &gemm_,
        "out <- alpha * p @ q + beta * addend (batched; cuBLASLt with out and addend separate, else ATen); "
        "returns whether cuBLASLt ran it",
        py::arg("out"), py::arg("p"), py::arg("q"), py::arg("alpha"), py::arg("beta"), py::arg("addend"),
        py::arg("use_cublaslt") = true);
  // Whether this build links cuBLASLt (setup.py found its header and library): gemm_ and newton_schulz
  // use it when asked; without it they run ATen's bmm/baddbmm.
  m.attr("HAVE_CUBLASLT") = fastoptim::lt_available();
  m.def("symmetric_gemm", &symmetric_gemm, "out <- alpha * x x^T + beta * addend (upper-triangle tiles, mirrored)",
        py::arg("x"), py::arg("out"), py::arg("addend"), py::arg("transposed"), py::arg("alpha"), py::arg("beta"));
  m.def("hessian_ema_", &hessian_ema_, "multi-tensor h <- lerp(h, estimate, 1-beta2)", py::arg("hessians"),
        py::arg("estimates"), py::arg("beta2"));
}
