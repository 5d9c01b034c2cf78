// The CPU build's normals from two versions of csrc/philox.h, bit for bit: 2^24 Philox counters (key 12345, 678),
// four normals each, written as raw float32 to stdout. Build it once against each header and compare the files
// (README.md beside this file gives the commands).
#include <cstdio>
#include <cstring>

#include "philox.h"

int main() {
  for (uint32_t i = 0; i < (1u << 24); ++i) {
    uint32_t c0 = i, c1 = 0, c2 = 0, c3 = 0;
    dk::philox4x32_10(c0, c1, c2, c3, 12345u, 678u);
    float n[4];
    dk::box_muller(c0, c1, n[0], n[1]);
    dk::box_muller(c2, c3, n[2], n[3]);
    std::fwrite(n, sizeof(float), 4, stdout);
  }
  return 0;
}
