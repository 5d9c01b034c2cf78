// Accuracy of philox.h's branch-free Box-Muller math over every input the kernels can give it, against double
// precision: all 2^31 uniforms u1 for r = sqrt(-2 log max(u1, 1e-7)), all 2^31 angles 2*pi*u2 for sin and cos,
// and the device's sqrt step (sqrt_newton) from a reciprocal square root off by +-2^-22 over every float in r's
// range. tests/ops/test_build.py compiles it with and without FMA contraction (nvcc contracts the device code) and
// holds the errors to the bounds the normals' tolerance needs. Prints one line of "name value" pairs.
// Usage: math_check [STRIDE]: every STRIDE-th uniform only (default 1, all of them).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "philox.h"

namespace {
float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t n = int64_t{1} << 31;  // uint_to_uniform folds the sign, so k = 0 .. 2^31 - 1 is every input
  const int64_t stride = argc > 1 ? std::atoll(argv[1]) : 1;
  double r_rel = 0, sc_abs = 0, sqrt_ulp = 0;
#pragma omp parallel for reduction(max : r_rel, sc_abs) schedule(static, 1 << 20)
  for (int64_t k = 0; k < n; k += stride) {
    const float u = dk::uint_to_uniform(static_cast<uint32_t>(k));
    const uint32_t ub = to_bits(u), kb = to_bits(dk::kMinUniform);
    const float uc = from_bits(ub > kb ? ub : kb);
    const float r = dk::sqrt_positive(dk::neg2_log_unit(uc));
    const double rt = std::sqrt(-2.0 * std::log(static_cast<double>(uc)));
    r_rel = std::fmax(r_rel, std::fabs(r - rt) / rt);
    const float th = dk::kTwoPi * u;
    float s, c;
    dk::sincos_unit(th, s, c);
    sc_abs = std::fmax(sc_abs, std::fmax(std::fabs(s - std::sin(static_cast<double>(th))),
                                         std::fabs(c - std::cos(static_cast<double>(th)))));
  }
  // r^2 = -2 log u lies in [1.19e-7, 32.24]: every float there, 1/sqrt off by -2^-22, 0 and +2^-22
  const uint32_t lo = to_bits(1.0e-7f), hi = to_bits(33.0f);
#pragma omp parallel for reduction(max : sqrt_ulp) schedule(static, 1 << 16)
  for (int64_t b = lo; b <= static_cast<int64_t>(hi); ++b) {
    const float x = from_bits(static_cast<uint32_t>(b));
    const double t = std::sqrt(static_cast<double>(x));
    const float ulp = std::nextafter(static_cast<float>(t), 100.0f) - static_cast<float>(t);
    for (double e : {-0x1p-22, 0.0, 0x1p-22}) {
      const float r = static_cast<float>((1.0 + e) / t);
      sqrt_ulp = std::fmax(sqrt_ulp, std::fabs(dk::sqrt_newton(x, r) - t) / ulp);
    }
  }
  std::printf("r_rel %.3e sincos_abs %.3e sqrt_newton_ulp %.3f\n", r_rel, sc_abs, sqrt_ulp);
  return 0;
}
