// csrc/cuda_kernels.cu compiled for the CPU (see cuda_emu.h), its ops registered as
// torch.ops.diffaug_kernels_cuda_emu.* with csrc/schemas.h's schemas. Built and loaded by tests/cuda_emu.py.
#define DK_CUDA_EMU 1
#include "cuda_kernels.cu"
#include "schemas.h"

TORCH_LIBRARY(diffaug_kernels_cuda_emu, m) {
  m.def(dk::kForwardNoiseOut, &forward_noise_out);
  m.def(dk::kTweedieOut, &tweedie_out);
  m.def(dk::kReverseStepOut, &reverse_step_out);
  m.def(dk::kPhiloxNormalOut, &philox_normal_out);
}
