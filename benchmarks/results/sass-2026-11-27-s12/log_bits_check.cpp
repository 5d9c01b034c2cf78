// neg2_log_unit (7fb1831) against session 10/11's -2.0f * log_unit (b26c984), bit for bit, on every input Box-Muller
// gives it (all 2^31 uniforms, clamped at 1e-7). old_philox.h: b26c984's header with its namespace renamed:
//   git show b26c984:csrc/philox.h | sed 's/namespace dk {/namespace dk_old {/; s/#pragma once//' > old_philox.h
//   g++ -O2 -std=c++17 -fopenmp -fno-math-errno [-ffp-contract=off | -mfma -ffp-contract=fast] -I ../../../csrc log_bits_check.cpp
#include <cstdio>
#include <cstring>
#include <cstdint>
#include "philox.h"  // csrc/philox.h (7fb1831 or later)
#undef DK_HD
#undef DK_DEVICE_PATH
#include "old_philox.h"
int main() {
  long diff = 0, n = 0;
  const uint32_t kb = dk::float_to_bits(dk::kMinUniform);
#pragma omp parallel for reduction(+ : diff, n)
  for (int64_t k = 0; k < (int64_t{1} << 31); ++k) {
    const float u = dk::uint_to_uniform(static_cast<uint32_t>(k));
    const uint32_t ub = dk::float_to_bits(u);
    const float uc = dk::bits_to_float(ub > kb ? ub : kb);
    const float a = -2.0f * dk_old::log_unit(uc), b = dk::neg2_log_unit(uc);
    diff += dk::float_to_bits(a) != dk::float_to_bits(b);
    ++n;
  }
  std::printf("inputs %ld, -2*log_unit (b26c984) vs neg2_log_unit bit differences: %ld\n", n, diff);
}
