// Schemas of the compiled kernels (one library, one schema per op; CPU and CUDA files add implementations),
// and the empty Python module whose import loads this library.
#include <Python.h>
#include <torch/library.h>

#ifndef DK_SOURCES_HASH
#define DK_SOURCES_HASH 0LL  // set by setup.py: diffaug_kernels/_sources.py's hash of csrc/ at build time
#endif

static int64_t sources_hash() { return DK_SOURCES_HASH; }

TORCH_LIBRARY(diffaug_kernels_C, m) {
  m.def("sources_hash() -> int", &sources_hash);
  // out[k*B + b] = coef_a[t[k, b]] * x0[b] + coef_b[t[k, b]] * philox_normal(out.shape, seed, offset)[k*B + b]
  // (t is [K, B]: K = 1 for forward_noise, K = len(times) with stride-0 batch for forward_noise_multi).
  m.def("noise_out(Tensor x0, Tensor t, Tensor coef_a, Tensor coef_b, Tensor seed, Tensor offset, Tensor(a!) out) -> ()");
  // out = affine_c(clip(coef_a[t] * x_t + coef_b[t] * model_output)); model_output has x_t's shape (any strides).
  m.def("tweedie_out(Tensor x_t, Tensor model_output, Tensor t, Tensor coef_a, Tensor coef_b, bool clip, Tensor? scale, Tensor? shift, Tensor(a!) out) -> ()");
  m.def("philox_normal_out(Tensor seed, Tensor offset, Tensor(a!) out) -> ()");
  m.def("philox_uint32_out(Tensor seed, Tensor offset, Tensor(a!) out) -> ()");
  // An uninitialised CPU tensor for a fused op's output: large ones come from a pool of reused buffers.
  m.def("empty_cpu_output(int[] size, int[] stride, ScalarType dtype) -> Tensor");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "diffaug_kernels compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
