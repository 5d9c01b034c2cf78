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
// out = c1[b] * x0_hat + c2[b] * x_t + sigma * philox_normal(out.shape, seed, offset) + shift, left to right;
// x0_hat, x_t (and a per-element sigma, shift) share a shape and dtype (any strides); c1, c2 are [B] in the compute
// dtype; sigma is absent (no noise), [B] in the compute dtype (per sample) or of x_t's shape (per element).
constexpr const char* kReverseStepOut =
    "reverse_step_out(Tensor x0_hat, Tensor x_t, Tensor c1, Tensor c2, Tensor? sigma, Tensor? shift, Tensor seed, "
    "Tensor offset, Tensor(a!) out) -> ()";
// out = SiLU(GroupNorm(x) * weight + bias), or SiLU((GroupNorm(x) * weight + bias) * (1 + scale) + shift);
// x: [B, C, ...] (any strides), out of x's shape and dtype; weight, bias [C] and scale, shift [B, C] (both or
// neither) in the compute dtype (float32; float64 for float64 x), the statistics too.
constexpr const char* kGroupNormSiluOut =
    "group_norm_silu_out(Tensor x, int num_groups, Tensor weight, Tensor bias, float eps, Tensor? scale, "
    "Tensor? shift, Tensor(a!) out) -> ()";
constexpr const char* kGroupNormSiluBackwardOut =
    "group_norm_silu_backward_out(Tensor grad, Tensor x, int num_groups, Tensor weight, Tensor bias, float eps, "
    "Tensor? scale, Tensor? shift, Tensor(a!) dx, Tensor(b!) sums) -> ()";
constexpr const char* kPhiloxNormalOut = "philox_normal_out(Tensor seed, Tensor offset, Tensor(a!) out) -> ()";

}  // namespace dk
