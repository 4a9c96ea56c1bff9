// Operator schemas of the compiled extension and their CPU/CUDA registrations.
//
// FRAGMENT: the Python registry (siss_fast/ops.py) defines the public siss_fast:: ops (mixture_noise,
// siss_loss, siss_loss_backward) in the same namespace; the compiled kernels live under *_ext names and are
// wrapped by it (fake impls and autograd are registered there, not here).
//
// Importing siss_fast._C runs the static registrations below; the module itself only carries build facts.
#include <Python.h>

#include <initializer_list>

#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/kernels.h"
#include "siss_fast.h"

#ifdef SISS_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace siss_fast {
namespace {

void check_same_device(std::initializer_list<const at::Tensor*> tensors, const at::Device& device,
                       const char* op_name) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == device, op_name, ": all tensors must be on ", device, ", got one on ", t->device());
  }
}

Prepared prepare_loss_args(const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0,
                           const at::Tensor& a0, const at::Tensor& gamma, const at::Tensor& sigma,
                           const char* op_name) {
  TORCH_CHECK(pred.dim() >= 1 && pred.size(0) >= 1, op_name, ": pred must have shape (B, ...) with B >= 1, got ",
              pred.sizes());
  TORCH_CHECK(noisy.sizes() == pred.sizes() && x0.sizes() == pred.sizes() && a0.sizes() == pred.sizes(), op_name,
              ": pred, noisy, x0, a0 must share one shape, got ", pred.sizes(), ", ", noisy.sizes(), ", ",
              x0.sizes(), ", ", a0.sizes());
  TORCH_CHECK(x0.scalar_type() == noisy.scalar_type() && a0.scalar_type() == noisy.scalar_type(), op_name,
              ": noisy, x0, a0 must share one dtype, got ", noisy.scalar_type(), ", ", x0.scalar_type(), ", ",
              a0.scalar_type());
  const int64_t batch = pred.size(0);
  const at::ScalarType acc =
      pred.scalar_type() == at::kDouble || noisy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == batch && sigma.dim() == 1 && sigma.size(0) == batch, op_name,
              ": gamma and sigma must have shape (", batch, ",), got ", gamma.sizes(), " and ", sigma.sizes());
  TORCH_CHECK(gamma.scalar_type() == acc && sigma.scalar_type() == acc, op_name, ": gamma and sigma must be ", acc,
              " (the accumulation dtype), got ", gamma.scalar_type(), " and ", sigma.scalar_type());
  check_same_device({&noisy, &x0, &a0, &gamma, &sigma}, pred.device(), op_name);
  return Prepared{pred.contiguous(), noisy.contiguous(), x0.contiguous(), a0.contiguous(),
                  gamma.contiguous(), sigma.contiguous(), batch, pred.numel() / batch};
}

// Coerce a (B,) vector to a contiguous tensor of `dtype` (upstream gradients may be expanded scalars).
at::Tensor per_sample_vector(const at::Tensor& v, int64_t batch, at::ScalarType dtype, const char* name,
                             const char* op_name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == batch, op_name, ": ", name, " must have shape (", batch, ",), got ",
              v.sizes());
  if (v.scalar_type() == dtype && v.is_contiguous()) {
    return v;  // the common case (the Python registry passes contiguous vectors): no dispatcher round trips
  }
  return v.to(dtype).contiguous();
}

}  // namespace

PreparedForward prepare_loss_forward(const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0,
                                     const at::Tensor& a0, const at::Tensor& gamma, const at::Tensor& sigma,
                                     double lambd, const std::optional<double>& weight_clip, const char* op_name) {
  TORCH_CHECK(lambd >= 0.0 && lambd <= 1.0, op_name, ": lambd must be in [0, 1], got ", lambd);
  TORCH_CHECK(!weight_clip.has_value() || *weight_clip > 0.0, op_name, ": weight_clip must be > 0, got ",
              *weight_clip);
  PreparedForward f;
  f.in = prepare_loss_args(pred, noisy, x0, a0, gamma, sigma, op_name);
  f.params = make_weight_params(lambd, weight_clip, f.in.gamma.scalar_type());
  const auto vec_options = f.in.gamma.options();
  for (at::Tensor* out : {&f.ell_x, &f.ell_a, &f.w_x, &f.w_a}) {
    *out = at::empty({f.in.batch}, vec_options);
  }
  return f;
}

PreparedBackward prepare_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a,
                                       const at::Tensor& w_x, const at::Tensor& w_a, const at::Tensor& pred,
                                       const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,
                                       const at::Tensor& gamma, const at::Tensor& sigma, const char* op_name) {
  PreparedBackward p;
  p.in = prepare_loss_args(pred, noisy, x0, a0, gamma, sigma, op_name);
  check_same_device({&grad_ell_x, &grad_ell_a, &w_x, &w_a}, pred.device(), op_name);
  const int64_t batch = p.in.batch;
  const at::ScalarType acc = p.in.gamma.scalar_type();
  p.grad_x = per_sample_vector(grad_ell_x, batch, acc, "grad_ell_x", op_name);
  p.grad_a = per_sample_vector(grad_ell_a, batch, acc, "grad_ell_a", op_name);
  p.w_x = per_sample_vector(w_x, batch, acc, "w_x", op_name);
  p.w_a = per_sample_vector(w_a, batch, acc, "w_a", op_name);
  p.out = at::empty(p.in.pred.sizes(), p.in.pred.options());
  return p;
}

PreparedMixture prepare_mixture_args(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,
                                     const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask,
                                     const char* op_name) {
  TORCH_CHECK(x0.dim() >= 1 && x0.size(0) >= 1, op_name, ": x0 must have shape (B, ...) with B >= 1, got ",
              x0.sizes());
  TORCH_CHECK(a0.sizes() == x0.sizes() && noise.sizes() == x0.sizes(), op_name,
              ": x0, a0, noise must share one shape, got ", x0.sizes(), ", ", a0.sizes(), ", ", noise.sizes());
  TORCH_CHECK(a0.scalar_type() == x0.scalar_type() && noise.scalar_type() == x0.scalar_type(), op_name,
              ": x0, a0, noise must share one dtype");
  const int64_t batch = x0.size(0);
  const at::ScalarType acc = x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == batch && sigma.dim() == 1 && sigma.size(0) == batch &&
                  mask.dim() == 1 && mask.size(0) == batch,
              op_name, ": gamma, sigma, mask must have shape (", batch, ",)");
  TORCH_CHECK(gamma.scalar_type() == acc && sigma.scalar_type() == acc, op_name, ": gamma and sigma must be ", acc);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op_name, ": mask must be bool, got ", mask.scalar_type());
  check_same_device({&a0, &noise, &gamma, &sigma, &mask}, x0.device(), op_name);
  const at::Tensor x0c = x0.contiguous();
  return PreparedMixture{x0c, a0.contiguous(), noise.contiguous(), gamma.contiguous(), sigma.contiguous(),
                         mask.contiguous(), at::empty(x0c.sizes(), x0c.options()), batch, x0.numel() / batch};
}

}  // namespace siss_fast

TORCH_LIBRARY_FRAGMENT(siss_fast, m) {
  m.def("mixture_noise_ext(Tensor x0, Tensor a0, Tensor noise, Tensor gamma, Tensor sigma, Tensor mask) -> Tensor");
  m.def(
      "siss_loss_forward_ext(Tensor pred, Tensor noisy, Tensor x0, Tensor a0, Tensor gamma, Tensor sigma, "
      "float lambd, float? weight_clip) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "siss_loss_backward_ext(Tensor grad_ell_x, Tensor grad_ell_a, Tensor w_x, Tensor w_a, Tensor pred, "
      "Tensor noisy, Tensor x0, Tensor a0, Tensor gamma, Tensor sigma) -> Tensor");
}

TORCH_LIBRARY_IMPL(siss_fast, CPU, m) {
  m.impl("mixture_noise_ext", &siss_fast::cpu::mixture_noise);
  m.impl("siss_loss_forward_ext", &siss_fast::cpu::siss_loss_forward);
  m.impl("siss_loss_backward_ext", &siss_fast::cpu::siss_loss_backward);
}

#ifdef SISS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(siss_fast, CUDA, m) {
  m.impl("mixture_noise_ext", &siss_fast::cuda::mixture_noise);
  m.impl("siss_loss_forward_ext", &siss_fast::cuda::siss_loss_forward);
  m.impl("siss_loss_backward_ext", &siss_fast::cuda::siss_loss_backward);
}
#endif

// A plain CPython module (no pybind11: it keeps this translation unit small) that records how it was built and
// exposes the CPU capability dispatch of csrc/cpu/kernels.h.
namespace {

PyObject* cpu_capability(PyObject* /*self*/, PyObject* /*args*/) {
  return PyUnicode_FromString(siss_fast::cpu::capability_name(siss_fast::cpu::kernels().capability));
}

PyObject* supported_cpu_capabilities(PyObject* /*self*/, PyObject* /*args*/) {
  const std::vector<std::string> names = siss_fast::cpu::supported_capabilities();
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (result == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), name);
  }
  return result;
}

PyObject* set_cpu_capability(PyObject* /*self*/, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) {
    return nullptr;
  }
  if (!siss_fast::cpu::set_capability(name)) {
    PyErr_Format(PyExc_ValueError,
                 "siss_fast: CPU capability '%s' is not one this build and CPU support (see "
                 "supported_cpu_capabilities())",
                 name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef siss_fast_c_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernel build in use: 'default', 'avx2' or 'avx512'."},
    {"supported_cpu_capabilities", supported_cpu_capabilities, METH_NOARGS,
     "The CPU kernel builds compiled in that this CPU can run, lowest first."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Switch the CPU kernels to the given supported capability (for tests and benchmarks)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef siss_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "siss_fast compiled kernels; importing registers the siss_fast::*_ext operators.",
    -1,
    siss_fast_c_methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&siss_fast_c_module);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef SISS_FAST_WITH_CUDA
  const long with_cuda = 1;
  const long cuda_runtime_version = CUDART_VERSION;  // e.g. 13000 for CUDA 13.0
#else
  const long with_cuda = 0;
  const long cuda_runtime_version = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(module, "cuda_runtime_version", cuda_runtime_version) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
