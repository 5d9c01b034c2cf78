// Standalone check of csrc/philox.h (no torch): prints the words and normals of a few counters, which
// tests/ops/test_build.py compares with the Python reference. Built by CMakeLists.txt (target philox_check).
#include <cinttypes>
#include <cstdio>
#include <cstdlib>

#include "philox.h"

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 0;
  const uint64_t offset = argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 0;
  for (uint64_t j = 0; j < 4; ++j) {
    const uint64_t ctr = offset + j;
    uint32_t c[4] = {static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0, 0};
    dk::philox4x32_10(c[0], c[1], c[2], c[3], static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    float n[4];
    dk::box_muller(c[0], c[1], n[0], n[1]);
    dk::box_muller(c[2], c[3], n[2], n[3]);
    std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 " %.9g %.9g %.9g %.9g\n", c[0], c[1], c[2], c[3],
                n[0], n[1], n[2], n[3]);
  }
  return 0;
}
