// The schemas of the kernels every backend implements: csrc/ops.cpp's library, and tests/cpp/cuda_emu.cpp's
// (the CUDA kernels compiled for the CPU) declare the same ops from here.
#pragma once

namespace dk {

// out[k*B + b] = coef_a[t[k, b]] * x0[b] + coef_b[t[k, b]] * philox_normal(out.shape, seed, offset)[k*B + b]
// (t is [K, B]: K = 1 for forward_noise, K = len(times) with stride-0 batch for forward_noise_multi).
constexpr const char* kForwardNoiseOut =
    "forward_noise_out(Tensor x0, Tensor t, Tensor coef_a, Tensor coef_b, Tensor seed, Tensor offset, "
    "Tensor(a!) out) -> ()";
// out = affine_c(clip(coef_a[t] * x_t + coef_b[t] * model_output)); model_output has x_t's shape (any strides).
constexpr const char* kTweedieOut =
    "tweedie_out(Tensor x_t, Tensor model_output, Tensor t, Tensor coef_a, Tensor coef_b, bool clip, Tensor? scale, "
    "Tensor? shift, Tensor(a!) out) -> ()";
constexpr const char* kPhiloxNormalOut = "philox_normal_out(Tensor seed, Tensor offset, Tensor(a!) out) -> ()";

}  // namespace dk
