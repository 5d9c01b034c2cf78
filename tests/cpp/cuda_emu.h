// The CUDA runtime, as much of it as csrc/cuda_kernels.cu uses, for running that file on the CPU
// (DK_CUDA_EMU; tests/cpp/cuda_emu.cpp compiles it, tests/cuda_emu.py loads it as the tests' "cuda" backend
// on a machine without a GPU, as TRITON_INTERPRET=1 does for Triton).
//
// A launch runs every thread of every block in turn, to completion: the kernels share no memory between
// threads and never synchronise, so that is one valid schedule of the GPU's. What it checks: the kernels' and
// launches' logic (indices, variants, tails, which kernel a layout takes, grid limits), every vector access's
// alignment (a GPU faults on a misaligned one), that no launch writes a byte twice, the device-side asserts;
// with philox.h's device code paths (DK_DEVICE_PATH), except rsqrt.approx (exact here; tests/cpp/math_check.cpp
// covers its error). What it cannot: timing, memory-model or compiler (nvcc/ptxas) issues: those need the GPU
// (pytest -m cuda, compute-sanitizer). Float results may differ from the GPU's in the last bits (nvcc contracts
// a*b+c into FMAs where g++ here does not).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The running thread's coordinates (a launch sets them; one thread at a time).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace dk_emu {
// [begin, end) of every store the running launch made (__stwb and cuda_kernels.cu's store1 record them).
inline std::vector<std::pair<uintptr_t, uintptr_t>> stores;
inline void record_store(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  stores.emplace_back(a, a + bytes);
}
}  // namespace dk_emu

inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
template <typename T>
inline void __stwb(T* p, const T& v) {
  dk_emu::record_store(p, sizeof(T));
  *p = v;
}

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) TORCH_CHECK(cond, "device-side assert: " #cond)

namespace c10::cuda {  // the host calls around a launch: nothing to do on the CPU
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline int getCurrentCUDAStream() { return 0; }
}  // namespace c10::cuda

namespace {

// The launch: the limits a GPU enforces, then each block's threads in order.
template <typename... P, typename S, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, S /*stream*/, A... args) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "emulated launch: bad block (", block.x, ", ",
              block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535, "emulated launch: bad grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  gridDim = grid;
  blockDim = block;
  dk_emu::stores.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx) {
              threadIdx = dim3(tx, ty, tz);
              kernel(args...);
            }
      }
  // No byte written twice (by two threads, or one twice): a launch covering some output more than once is
  // wasted work the comparisons cannot see (the values agree); unwritten bytes show as the tests' NaN poison.
  auto& st = dk_emu::stores;
  std::sort(st.begin(), st.end());
  for (size_t i = 1; i < st.size(); ++i)
    TORCH_CHECK(st[i].first >= st[i - 1].second, "emulated launch: bytes at ",
                reinterpret_cast<const void*>(st[i].first), " written twice (grid ", grid.x, "x", grid.y, ", block ",
                block.x, ")");
}

// SMs of the emulated device (DIFFAUG_CUDA_EMU_SMS, default 1): few, so the grid-stride loops take more than
// one pass on small test tensors.
int sm_count() {
  const char* env = std::getenv("DIFFAUG_CUDA_EMU_SMS");
  const int n = env != nullptr && *env != '\0' ? std::atoi(env) : 1;
  TORCH_CHECK(n >= 1, "DIFFAUG_CUDA_EMU_SMS must be a positive integer");
  return n;
}

template <typename T>
void store1(T* p, T v) {
  dk_emu::record_store(p, sizeof(T));
  *p = v;
}

template <typename V, typename T>
V* vec_at(T* p) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % alignof(V) == 0, "emulated device: misaligned ", sizeof(V),
              "-byte vector access at ", static_cast<const void*>(p));
  return reinterpret_cast<V*>(p);
}

}  // namespace
