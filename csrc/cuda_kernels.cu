// CUDA kernels: forward noise (+ the ensemble expansion), Tweedie step, reverse step, Philox normals.
//
// Each thread takes a unit of E consecutive logical elements (16 bytes of input where the layout allows a
// vector load). Planar kernels (the common case: every (sample, channel) plane dense and 16-byte aligned,
// as in a contiguous tensor or its learned-sigma channel slice) give each block one slice of one plane, so
// t, the coefficients and the addresses are per block and nothing per element divides; on an H200 they run
// bf16 tweedie 3.5x faster than the general kernels (`python -m diffaug_kernels bench`; RESULTS.md); tweedie's
// run in memory order (a 1-D grid), 92-93% of the copy ceiling on an H100 against 89% plane-major
// (tools/variants.py; RESULTS.md). The general kernels (any [B, C, S] view: channels_last, strided)
// grid-stride over units with a grid sized to the device, with vector access where whole samples are dense.
// Seed and offset are read from device memory, so a captured CUDA graph replays with whatever the tensors hold
// (fresh noise) and no launch waits on the host.
//
// DK_CUDA_EMU: compiled by g++ for the CPU instead (tests/cpp/cuda_emu.h: the launch runs every thread of every
// block in turn), so the tests run this file's kernels and launch logic without a GPU.
#include <ATen/Dispatch.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <torch/library.h>
#if defined(DK_CUDA_EMU)
#include "cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "philox.h"
#include "view3.h"

namespace {

#if !defined(DK_CUDA_EMU)
// kernel<<<grid, block, 0, stream>>>(args...), checked; one launch path, which the CPU emulation replaces.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers this build does not need: ask the driver.
int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// A vector access at p (the CPU emulation's version checks the alignment a GPU would fault on).
template <typename V, typename T>
__device__ __forceinline__ V* vec_at(T* p) {
  return reinterpret_cast<V*>(p);
}

// One element's store (the CPU emulation's version, like its __stwb, also records the bytes, to check that a
// launch writes each output byte once).
template <typename T>
__device__ __forceinline__ void store1(T* p, T v) {
  *p = v;
}
#endif

using at::Tensor;
using dk::View3;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, int E>
struct alignas(sizeof(T) * E) Vec {
  T v[E];
};

constexpr int kThreads = 256;

// Vector access through integer vectors and the store intrinsic. A Vec of c10::BFloat16 or float stored as
// itself is split by the compiler into 2- and 4-byte stores (in the PTX of these kernels: six st.global.u16
// and one st.global.v2.u16 per bf16 unit), and so is a plain store of its int4 copy; __stwb (st.global.wb,
// the default store) keeps it one 16-, 8- or 4-byte store (tests/ops/test_build.py checks the stores). (The
// streaming hints __ldcs / __stcs are 2.5-3.5% slower for tweedie on an H100: RESULTS.md.)
template <typename V>
__device__ __forceinline__ V load16(const V* p) {
  static_assert(sizeof(V) == 16, "16-byte vectors only");
  const int4 r = *vec_at<const int4>(p);
  V v;
  memcpy(&v, &r, 16);
  return v;
}
template <typename V>
__device__ __forceinline__ void store_vec(V* p, const V& v) {
  if constexpr (sizeof(V) % 16 == 0) {
    int4 r[sizeof(V) / 16];
    memcpy(r, &v, sizeof(V));
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(V) / 16); ++i) __stwb(vec_at<int4>(p) + i, r[i]);
  } else if constexpr (sizeof(V) == 8) {
    uint2 r;
    memcpy(&r, &v, 8);
    __stwb(vec_at<uint2>(p), r);
  } else {  // a Vec is 16 input bytes at 2 to 8 bytes per output element: 4 to 64 bytes
    static_assert(sizeof(V) == 4, "a Vec of 4, 8 or a multiple of 16 bytes");
    unsigned int r;
    memcpy(&r, &v, 4);
    __stwb(vec_at<unsigned int>(p), r);
  }
}

// A grid-stride kernel's grid: 8 blocks per SM at most.
int grid_for(int64_t units) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((units + kThreads - 1) / kThreads, cap)));
}

// Whether units of E elements can use vector access on this tensor: dense samples, E | C*S, aligned.
template <typename T, int E>
bool vectorizable(const Tensor& x, const View3& v) {
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr());
  return v.sample_dense() && (v.C * v.S) % E == 0 && addr % (sizeof(T) * E) == 0 && (v.B == 1 || v.sb % E == 0);
}

// Whether a tensor suits the planar kernels: each (b, c) plane dense (unit stride), E | S, and every plane
// start aligned for vector access. Those kernels give each block one plane slice, so nothing per element
// divides (a 64-bit division costs about as much as the rest of tweedie's per-element work).
template <typename T, int E>
bool plane_vectorizable(const Tensor& x, const View3& v) {
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr());
  return (v.S == 1 || v.ss == 1) && v.S % E == 0 && addr % (sizeof(T) * E) == 0 && (v.B == 1 || v.sb % E == 0) &&
         (v.C == 1 || v.sc % E == 0);
}

// Planar launch shape: grid.x = planes, grid.y = slices of one plane; dim3's y is at most 65535. A block
// covers threads x U units of its plane (U units per thread, a block apart). Threads per block: the whole
// warps, from kThreads (or what the plane needs, if fewer) down to half that, that leave the fewest lanes
// idle in a plane's last slice; ties keep the larger block. A 224x224 bf16 plane (6272 units of 8) takes 28
// blocks of 224 threads at U = 1, where 256 would leave half of every plane's 25th block idle.
struct PlaneLaunch {
  dim3 grid, block;
  bool ok;
};
inline PlaneLaunch plane_launch(int64_t planes, int64_t units_per_plane, int64_t U = 1) {
  const int64_t need = (units_per_plane + U - 1) / U;  // threads one block per plane would need
  const int64_t most = std::min<int64_t>(kThreads, std::max<int64_t>(32, (need + 31) / 32 * 32));
  int64_t threads = most, idle = INT64_MAX;
  for (int64_t n = most; n >= std::max<int64_t>(32, most / 2); n -= 32) {
    const int64_t slices = (units_per_plane + n * U - 1) / (n * U), waste = slices * n * U - units_per_plane;
    if (slices <= 65535 && waste < idle) threads = n, idle = waste;  // (a huge plane keeps `most`)
  }
  const int64_t slices = (units_per_plane + threads * U - 1) / (threads * U);
  const bool ok = planes > 0 && planes < (int64_t{1} << 31) && slices <= 65535 && units_per_plane >= 32;
  return {dim3(static_cast<unsigned>(ok ? planes : 1), static_cast<unsigned>(ok ? slices : 1)),
          dim3(static_cast<unsigned>(threads)), ok};
}

__device__ __forceinline__ int64_t offset_of(int64_t i, const View3& v) {
  const int64_t s = i % v.S, bc = i / v.S;
  return (bc / v.C) * v.sb + (bc % v.C) * v.sc + s * v.ss;
}

// The E logical elements from i0 (CS elements per sample) into r: one vector load where vec (the unit is
// full and the layout allows it), else one strided load per element, zeros past N.
template <int E, typename T, typename A>
__device__ __forceinline__ void load_unit(const T* __restrict__ p, int64_t i0, int64_t CS, int64_t N,
                                          const View3& v, bool vec, A* r) {
  if (vec) {
    const int64_t b = i0 / CS;
    const auto w = *vec_at<const Vec<T, E>>(p + b * v.sb + (i0 - b * CS));
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = static_cast<A>(w.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = i0 + e < N ? static_cast<A>(p[offset_of(i0 + e, v)]) : A(0);
  }
}

// Clamp to [-1, 1]; NaN passes through.
template <typename T>
__device__ __forceinline__ T clip1(T y) {
  return y != y ? y : (y < T(-1) ? T(-1) : (y > T(1) ? T(1) : y));
}

// Box-Muller through CUDA's libm (logf, sqrtf, sincosf), for philox_normal only: DIFFAUG_CUDA_RNG_MATH=libm
// selects it (read per call), so tools/floor.py can time, in one process, what philox.h's branch-free log,
// sincos and sqrt save. The same normals to float32 rounding.
__device__ __forceinline__ void box_muller_libm(uint32_t a, uint32_t b, float& n1, float& n2) {
  const float u1 = dk::uint_to_uniform(a), th = dk::kTwoPi * dk::uint_to_uniform(b);
  const float r = sqrtf(-2.0f * logf(fmaxf(u1, dk::kMinUniform)));
  float s, c;
  sincosf(th, &s, &c);
  n1 = r * c;
  n2 = r * s;
}

// The four normals of one Philox counter; LIBM: through box_muller_libm (philox_normal's comparison build only).
template <bool LIBM = false>
__device__ __forceinline__ void normals4(uint64_t ctr, uint32_t k0, uint32_t k1, float* n) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  dk::philox4x32_10(c0, c1, c2, c3, k0, k1);
  if constexpr (LIBM) {
    box_muller_libm(c0, c1, n[0], n[1]);
    box_muller_libm(c2, c3, n[2], n[3]);
  } else {
    dk::box_muller(c0, c1, n[0], n[1]);
    dk::box_muller(c2, c3, n[2], n[3]);
  }
}

// ---------------------------------------------------------------------------------------- forward noise
template <typename in_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kThreads) forward_noise_kernel(
    const in_t* __restrict__ x, out_t* __restrict__ out, const int64_t* __restrict__ t, int64_t tk, int64_t tb,
    const acc_t<in_t>* __restrict__ ca, const acc_t<in_t>* __restrict__ cb, int64_t T,
    const int64_t* __restrict__ seed_p, const int64_t* __restrict__ off_p, int64_t N, int64_t K, View3 xv,
    View3 ov, bool x_vec, bool o_vec) {
  using acc = acc_t<in_t>;
  constexpr int E = 4 * VEC;  // VEC Philox counters per unit
  const uint64_t seed = static_cast<uint64_t>(*seed_p), off = static_cast<uint64_t>(*off_p);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t CS = xv.C * xv.S, B = xv.B, units = (N + E - 1) / E;
  const bool aligned = K == 1 || N % 4 == 0;  // block k of the output starts on a counter boundary
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = u * E;
    const bool full = i0 + E <= N;
    acc xr[E];
    load_unit<E>(x, i0, CS, N, xv, full && x_vec, xr);
    for (int64_t k = 0; k < K; ++k) {
      float nz[E];
      if (aligned) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) normals4(off + static_cast<uint64_t>((k * N + i0) / 4 + v), k0, k1, nz + 4 * v);
      } else {  // rare: K > 1 with N % 4 != 0; each element finds its own counter and lane
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int64_t el = k * N + i0 + e;
          float n4[4];
          normals4(off + static_cast<uint64_t>(el / 4), k0, k1, n4);
          const int64_t l = el % 4;  // a select, not n4[l]: a dynamic index would put n4 in local memory
          nz[e] = l == 0 ? n4[0] : l == 1 ? n4[1] : l == 2 ? n4[2] : n4[3];
        }
      }
      if (full && o_vec) {  // o_vec implies E | C*S: the unit lies in one sample
        const int64_t b = i0 / CS;
        const int64_t ti = t[k * tk + b * tb];
        CUDA_KERNEL_ASSERT(ti >= 0 && ti < T);
        const acc a = ca[ti], s = cb[ti];
        Vec<out_t, E> vo;
#pragma unroll
        for (int e = 0; e < E; ++e) vo.v[e] = static_cast<out_t>(a * xr[e] + s * static_cast<acc>(nz[e]));
        store_vec(vec_at<Vec<out_t, E>>(out + (k * B + b) * ov.sb + (i0 - b * CS)), vo);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int64_t i = i0 + e;
          if (i >= N) break;
          const int64_t b = i / CS, ti = t[k * tk + b * tb];
          CUDA_KERNEL_ASSERT(ti >= 0 && ti < T);
          store1(out + k * B * ov.sb + offset_of(i, ov),
                 static_cast<out_t>(ca[ti] * xr[e] + cb[ti] * static_cast<acc>(nz[e])));
        }
      }
    }
  }
}

// This thread's place in a planar launch (grid.x = planes, grid.y = slices of a plane; or, LIN, a 1-D grid of
// planes x slices blocks in memory order, `slices` per plane): its first E-element unit starts at element s0 of
// plane (b, c), its j-th (of U) at s0 + j * blockDim.x * E, so a warp's accesses stay contiguous; a unit at or
// past S is a spare in the last slice, with nothing to do.
struct PlaneSlot {
  int64_t s0, plane, b, c;
};
template <int E, int U = 1, bool LIN = false>
__device__ __forceinline__ PlaneSlot plane_slot(const View3& v, unsigned slices = 0) {
  // 1-D: one 32-bit division per thread (blockIdx.x < 2**31), not per element
  const unsigned plane32 = LIN ? blockIdx.x / slices : blockIdx.x;
  const unsigned slice = LIN ? blockIdx.x - plane32 * slices : blockIdx.y;
  const int64_t plane = plane32, b = plane / v.C;
  return {(static_cast<int64_t>(slice) * blockDim.x * U + threadIdx.x) * E, plane, b, plane - b * v.C};
}

// The planar kernels' shape: units per thread (a block apart), and the block order. LIN: a 1-D grid of blocks in
// memory order, sweeping the tensor as a copy does; else plane-major (grid.x = planes), which has a slice of
// every plane in flight at once. Tweedie (memory-bound), on an H100 (tools/variants.py, 256x3x224x224): memory
// order takes 83.4 us in bf16 (92.2% of the copy ceiling) and 156.9 us in float32 (as fast as a copy of the same
// bytes), plane-major 86.2-86.6 and 165.0 us; 2 and 4 units gain nothing (83.5, 85.5 us in bf16): default
// 1 unit, memory order. Forward noise (bound by the Philox + Box-Muller arithmetic) amortises each thread's
// set-up (plane, addresses, the Philox key schedule: 127 of the 529 sm_90 instructions a bf16 thread runs at
// 1 unit: tools/sass_stats.py) over more units. Timed on an H100 (tools/variants.py, 7 interleaved rounds;
// RESULTS.md): bf16 1 unit plane-major 114.3 us, 2 units 105.8, 4 units 111.7, 2 in memory order 106.7;
// float32 1 unit 139.9 us, 4 units in memory order 118.5 (the next best 4 plane-major, 129.8). Default: 2 units
// plane-major for 16-bit tensors (fp16 shares bf16's, untimed), 4 units in memory order for float32 (and
// float64, untimed).
// DIFFAUG_CUDA_TWEEDIE_UNITS and DIFFAUG_CUDA_NOISE_UNITS = 1, 2 or 4, with an "l" for memory order, pick another
// for every dtype, for tuning only (tools/variants.py times each; tools/gpu_check.sh's tune step reports
// the fastest). Read on every call (a getenv), so one process can compare them. They apply where output and
// input share a dtype (the DiffAug case, the one measured); other pairs take 1, plane-major.
struct PlaneVariant {
  int units;
  bool linear;
};
constexpr PlaneVariant kTweedieDefault{1, true};
// forward noise's default by element size (measured above)
template <typename T>
constexpr PlaneVariant kForwardNoiseDefault = sizeof(T) == 2 ? PlaneVariant{2, false} : PlaneVariant{4, true};
PlaneVariant plane_variant(const char* name, PlaneVariant dflt) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return dflt;
  const std::string v(env);
  const bool linear = v.size() == 2 && v[1] == 'l';
  TORCH_CHECK((v.size() == 1 || linear) && (v[0] == '1' || v[0] == '2' || v[0] == '4'), name,
              " must be 1, 2 or 4, optionally followed by l (blocks in memory order), not '", v, "'");
  return {v[0] - '0', linear};
}

// Calls run(integral_constant<int, U>, bool_constant<LIN>, grid) for the variant: the same-dtype case takes any,
// others (fewer kernels to compile) 1 unit, plane-major. LIN launches pl's blocks as a 1-D grid, which needs
// planes x slices < 2**31 (else plane-major).
template <bool kAny, typename F>
void with_plane_variant(PlaneVariant var, const PlaneLaunch& pl, F&& run) {
  using std::integral_constant;
  if constexpr (kAny) {
    const bool lin = var.linear && static_cast<int64_t>(pl.grid.x) * pl.grid.y < (int64_t{1} << 31);
    const dim3 grid = lin ? dim3(pl.grid.x * pl.grid.y) : pl.grid;
    const auto by_units = [&](auto l) {
      if (var.units == 2) run(integral_constant<int, 2>{}, l, grid);
      else if (var.units == 4) run(integral_constant<int, 4>{}, l, grid);
      else run(integral_constant<int, 1>{}, l, grid);
    };
    lin ? by_units(std::true_type{}) : by_units(std::false_type{});
  } else {
    run(integral_constant<int, 1>{}, std::false_type{}, pl.grid);
  }
}

// One block per slice of one (b, c) plane: t, the coefficients and the plane's addresses are per block. U units
// per thread, a block apart, every load issued first; LIN: blocks in memory order (see PlaneVariant).
template <typename in_t, typename out_t, int VEC, int U, bool LIN>
__global__ void __launch_bounds__(kThreads) forward_noise_plane_kernel(
    const in_t* __restrict__ x, out_t* __restrict__ out, const int64_t* __restrict__ t, int64_t tk, int64_t tb,
    const acc_t<in_t>* __restrict__ ca, const acc_t<in_t>* __restrict__ cb, int64_t T,
    const int64_t* __restrict__ seed_p, const int64_t* __restrict__ off_p, int64_t N, int64_t K, View3 xv,
    View3 ov, unsigned slices) {
  using acc = acc_t<in_t>;
  constexpr int E = 4 * VEC;
  const PlaneSlot p = plane_slot<E, U, LIN>(xv, slices);
  if (p.s0 >= xv.S) return;
  const int64_t s0 = p.s0, plane = p.plane, b = p.b, c = p.c, step = static_cast<int64_t>(blockDim.x) * E;
  const uint64_t seed = static_cast<uint64_t>(*seed_p), off = static_cast<uint64_t>(*off_p);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const in_t* xp = x + b * xv.sb + c * xv.sc + s0;
  Vec<in_t, E> xw[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (j == 0 || s0 + j * step < xv.S) xw[j] = *vec_at<const Vec<in_t, E>>(xp + j * step);
  }
  // N and S are multiples of 4 here, so element k * N + plane * S + s0 starts a counter.
  const uint64_t ctr0 = off + static_cast<uint64_t>(plane * xv.S + s0) / 4;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ti = t[k * tk + b * tb];
    CUDA_KERNEL_ASSERT(ti >= 0 && ti < T);
    const acc a = ca[ti], sg = cb[ti];
    out_t* op = out + (k * xv.B + b) * ov.sb + c * ov.sc + s0;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (j > 0 && s0 + j * step >= xv.S) break;
      float nz[E];
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        normals4(ctr0 + static_cast<uint64_t>(k * N + j * step) / 4 + v, k0, k1, nz + 4 * v);
      Vec<out_t, E> vo;
#pragma unroll
      for (int e = 0; e < E; ++e) vo.v[e] = static_cast<out_t>(a * static_cast<acc>(xw[j].v[e]) + sg * static_cast<acc>(nz[e]));
      store_vec(vec_at<Vec<out_t, E>>(op + j * step), vo);
    }
  }
}

void forward_noise_out(const Tensor& x0_, const Tensor& t, const Tensor& coef_a, const Tensor& coef_b,
                       const Tensor& seed, const Tensor& offset, Tensor out) {
  const c10::cuda::CUDAGuard guard(x0_.device());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == x0_.size(0) && t.scalar_type() == at::kLong, "internal: t must be [K, B] int64");
  Tensor x0 = x0_;
  const View3 xv = dk::view3(x0), ov = dk::out_view3(out);
  const int64_t N = x0.numel(), K = t.size(0);
  if (N == 0 || K == 0) return;
  const Tensor s = seed.to(x0.device(), at::kLong), o = offset.to(x0.device(), at::kLong);
  const Tensor ca = coef_a.contiguous(), cb = coef_b.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "forward_noise_in", [&] {
    using in_t = scalar_t;
    using acc = acc_t<in_t>;
    constexpr int VEC = sizeof(in_t) == 2 ? 2 : 1;  // 16-byte loads of 16-bit inputs take two counters
    constexpr int E = 4 * VEC;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "forward_noise_out", [&] {
      constexpr bool same = std::is_same_v<in_t, scalar_t>;
      const PlaneVariant var =
          same ? plane_variant("DIFFAUG_CUDA_NOISE_UNITS", kForwardNoiseDefault<in_t>) : PlaneVariant{1, false};
      const PlaneLaunch pl = plane_launch(xv.B * xv.C, xv.S / E, var.units);
      if (pl.ok && plane_vectorizable<in_t, E>(x0, xv) && plane_vectorizable<scalar_t, E>(out, ov)) {
        with_plane_variant<same>(var, pl, [&](auto u, auto lin, dim3 grid) {
          launch(forward_noise_plane_kernel<in_t, scalar_t, VEC, decltype(u)::value, decltype(lin)::value>, grid,
                 pl.block, stream, x0.data_ptr<in_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), t.stride(0),
                 t.stride(1), ca.data_ptr<acc>(), cb.data_ptr<acc>(), ca.numel(), s.data_ptr<int64_t>(),
                 o.data_ptr<int64_t>(), N, K, xv, ov, pl.grid.y);
        });
        return;
      }
      const bool x_vec = vectorizable<in_t, E>(x0, xv), o_vec = vectorizable<scalar_t, E>(out, ov);
      launch(forward_noise_kernel<in_t, scalar_t, VEC>, dim3(grid_for((N + E - 1) / E)), dim3(kThreads), stream,
             x0.data_ptr<in_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), t.stride(0), t.stride(1),
             ca.data_ptr<acc>(), cb.data_ptr<acc>(), ca.numel(), s.data_ptr<int64_t>(), o.data_ptr<int64_t>(), N, K,
             xv, ov, x_vec, o_vec);
    });
  });
}

// ---------------------------------------------------------------------------------------------- tweedie
template <typename in_t, typename out_t, int E>
__global__ void __launch_bounds__(kThreads) tweedie_kernel(
    const in_t* __restrict__ x, const in_t* __restrict__ m, out_t* __restrict__ out, const int64_t* __restrict__ t,
    int64_t tb, const acc_t<in_t>* __restrict__ ca, const acc_t<in_t>* __restrict__ cb, int64_t T, bool clip,
    const acc_t<in_t>* __restrict__ scale, const acc_t<in_t>* __restrict__ shift, int64_t N, View3 xv, View3 mv,
    View3 ov, bool x_vec, bool m_vec, bool o_vec, bool plane_units) {
  using acc = acc_t<in_t>;
  const int64_t CS = xv.C * xv.S, units = (N + E - 1) / E;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = u * E;
    const bool full = i0 + E <= N;
    const int64_t b0 = i0 / CS;
    acc xr[E], mr[E];
    load_unit<E>(x, i0, CS, N, xv, full && x_vec, xr);
    load_unit<E>(m, i0, CS, N, mv, full && m_vec, mr);
    // Sample b, channel c and position s of the unit's first element; later ones follow by carrying, so no
    // element pays a 64-bit division. With S % E == 0 (plane_units) the whole unit lies in one (b, c) plane.
    const int64_t rem0 = i0 - b0 * CS, c0 = rem0 / xv.S;
    out_t res[E];
    if (plane_units) {
      const int64_t ti = t[b0 * tb];
      CUDA_KERNEL_ASSERT(ti >= 0 && ti < T);
      const acc a = ca[ti], bb = cb[ti];
      const acc g = scale != nullptr ? scale[c0] : acc(1), h = scale != nullptr ? shift[c0] : acc(0);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        acc y = dk::xt_term(a, xr[e]) + bb * mr[e];
        if (clip) y = clip1(y);
        res[e] = static_cast<out_t>(scale != nullptr ? y * g + h : y);
      }
    } else {
      int64_t b = b0, c = c0, sp = rem0 - c0 * xv.S;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t ti = i0 + e < N ? t[b * tb] : 0;
        CUDA_KERNEL_ASSERT(ti >= 0 && ti < T);
        acc y = dk::xt_term(ca[ti], xr[e]) + cb[ti] * mr[e];
        if (clip) y = clip1(y);
        if (scale != nullptr) y = y * scale[c] + shift[c];
        res[e] = static_cast<out_t>(y);
        if (++sp == xv.S) {
          sp = 0;
          if (++c == xv.C) c = 0, ++b;
        }
      }
    }
    if (full && o_vec) {
      Vec<out_t, E> vo;
#pragma unroll
      for (int e = 0; e < E; ++e) vo.v[e] = res[e];
      store_vec(vec_at<Vec<out_t, E>>(out + b0 * ov.sb + (i0 - b0 * CS)), vo);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (i0 + e < N) store1(out + offset_of(i0 + e, ov), res[e]);
    }
  }
}

// U units per thread, every load issued before any arithmetic; LIN: blocks in memory order (see PlaneVariant).
template <typename in_t, typename out_t, int E, int U, bool LIN>
__global__ void __launch_bounds__(kThreads) tweedie_plane_kernel(
    const in_t* __restrict__ x, const in_t* __restrict__ m, out_t* __restrict__ out, const int64_t* __restrict__ t,
    int64_t tb, const acc_t<in_t>* __restrict__ ca, const acc_t<in_t>* __restrict__ cb, int64_t T, bool clip,
    const acc_t<in_t>* __restrict__ scale, const acc_t<in_t>* __restrict__ shift, View3 xv, View3 mv, View3 ov,
    unsigned slices) {
  using acc = acc_t<in_t>;
  const PlaneSlot p = plane_slot<E, U, LIN>(xv, slices);
  if (p.s0 >= xv.S) return;
  const int64_t b = p.b, c = p.c, step = static_cast<int64_t>(blockDim.x) * E;
  const in_t* xp = x + b * xv.sb + c * xv.sc + p.s0;
  const in_t* mp = m + b * mv.sb + c * mv.sc + p.s0;
  Vec<in_t, E> xw[U], mw[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (j == 0 || p.s0 + j * step < xv.S) {
      xw[j] = load16(vec_at<const Vec<in_t, E>>(xp + j * step));
      mw[j] = load16(vec_at<const Vec<in_t, E>>(mp + j * step));
    }
  }
  const int64_t ti = t[b * tb];
  CUDA_KERNEL_ASSERT(ti >= 0 && ti < T);
  const acc a = ca[ti], bb = cb[ti];
  const acc g = scale != nullptr ? scale[c] : acc(1), h = scale != nullptr ? shift[c] : acc(0);
  out_t* op = out + b * ov.sb + c * ov.sc + p.s0;
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (j > 0 && p.s0 + j * step >= xv.S) break;
    Vec<out_t, E> vo;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc y = dk::xt_term(a, static_cast<acc>(xw[j].v[e])) + bb * static_cast<acc>(mw[j].v[e]);
      if (clip) y = clip1(y);
      vo.v[e] = static_cast<out_t>(scale != nullptr ? y * g + h : y);
    }
    store_vec(vec_at<Vec<out_t, E>>(op + j * step), vo);
  }
}

void tweedie_out(const Tensor& x_t, const Tensor& model_output, const Tensor& t, const Tensor& coef_a,
                 const Tensor& coef_b, bool clip, const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
                 Tensor out) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  TORCH_CHECK(x_t.sizes() == model_output.sizes() && x_t.scalar_type() == model_output.scalar_type(),
              "internal: model_output must be narrowed and cast to x_t's shape and dtype");
  Tensor x = x_t, m = model_output;
  const View3 xv = dk::view3(x), mv = dk::view3(m), ov = dk::out_view3(out);
  const int64_t N = x.numel();
  if (N == 0) return;
  const Tensor ca = coef_a.contiguous(), cb = coef_b.contiguous();
  const Tensor sc = scale.has_value() ? scale->contiguous() : Tensor(), sh = shift.has_value() ? shift->contiguous() : Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tweedie_in", [&] {
    using in_t = scalar_t;
    using acc = acc_t<in_t>;
    constexpr int E = 16 / sizeof(in_t);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tweedie_out", [&] {
      const acc* scp = sc.defined() ? sc.data_ptr<acc>() : nullptr;
      const acc* shp = sh.defined() ? sh.data_ptr<acc>() : nullptr;
      // the choice applies where output and input share a dtype (the DiffAug case, the one measured); others take
      // the first shape, plane-major
      constexpr bool same = std::is_same_v<in_t, scalar_t>;
      const PlaneVariant var = same ? plane_variant("DIFFAUG_CUDA_TWEEDIE_UNITS", kTweedieDefault) : PlaneVariant{1, false};
      const PlaneLaunch pl = plane_launch(xv.B * xv.C, xv.S / E, var.units);
      if (pl.ok && plane_vectorizable<in_t, E>(x, xv) && plane_vectorizable<in_t, E>(m, mv) &&
          plane_vectorizable<scalar_t, E>(out, ov)) {
        with_plane_variant<same>(var, pl, [&](auto u, auto lin, dim3 grid) {
          launch(tweedie_plane_kernel<in_t, scalar_t, E, decltype(u)::value, decltype(lin)::value>, grid, pl.block,
                 stream, x.data_ptr<in_t>(), m.data_ptr<in_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
                 t.stride(0), ca.data_ptr<acc>(), cb.data_ptr<acc>(), ca.numel(), clip, scp, shp, xv, mv, ov,
                 pl.grid.y);
        });
        return;
      }
      launch(tweedie_kernel<in_t, scalar_t, E>, dim3(grid_for((N + E - 1) / E)), dim3(kThreads), stream,
             x.data_ptr<in_t>(), m.data_ptr<in_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), t.stride(0),
             ca.data_ptr<acc>(), cb.data_ptr<acc>(), ca.numel(), clip, scp, shp, N, xv, mv, ov,
             vectorizable<in_t, E>(x, xv), vectorizable<in_t, E>(m, mv), vectorizable<scalar_t, E>(out, ov),
             xv.S % E == 0);
    });
  });
}

// ----------------------------------------------------------------------------------------- reverse step
// One thread per unit of 4 logical elements, i.e. one Philox counter (unit u takes counter offset + u): its x0_hat,
// x_t, per-element sigma and shift by one vector load each where the tensor allows it (whole samples dense and
// aligned), else strided; the terms added in the reference's order, ((c1 x0_hat + c2 x_t) + sigma z) + shift.
// Grid-stride over units, a grid sized to the device. sigma: none (NOISE 0), per sample (1) or per element (2).
// Products rounded on their own, never contracted into an FMA with the sum that follows (nvcc contracts a * b + c by
// default): reverse_step gives the unfused PyTorch expression's result, bit for bit, as the CPU kernel does.
#if defined(DK_CUDA_EMU)
template <typename T>
inline T mul_rn(T a, T b) {
  return a * b;  // (g++'s rounding in the emulation; its tests hold it to the reference's tolerance)
}
#else
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#endif

// Sample b, or the last one for the zero-filled elements past N of a unit (their results are never stored).
__device__ __forceinline__ int64_t last_sample(int64_t b, int64_t B) { return b < B ? b : B - 1; }

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) reverse_step_kernel(
    const in_t* __restrict__ x0, const in_t* __restrict__ xt, const in_t* __restrict__ sig_e,
    const in_t* __restrict__ sh, out_t* __restrict__ out, const acc_t<in_t>* __restrict__ c1,
    const acc_t<in_t>* __restrict__ c2, const acc_t<in_t>* __restrict__ sig_b, const int64_t* __restrict__ seed_p,
    const int64_t* __restrict__ off_p, int64_t N, View3 v0, View3 vt, View3 vs, View3 vh, View3 ov, int noise,
    bool x0_vec, bool xt_vec, bool s_vec, bool h_vec, bool o_vec) {
  using acc = acc_t<in_t>;
  constexpr int E = 4;
  const uint64_t seed = static_cast<uint64_t>(*seed_p), off = static_cast<uint64_t>(*off_p);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t CS = vt.C * vt.S, units = (N + E - 1) / E;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = u * E;
    const bool full = i0 + E <= N;
    acc y[E], w[E];
    float nz[E];
    load_unit<E>(x0, i0, CS, N, v0, full && x0_vec, y);
    load_unit<E>(xt, i0, CS, N, vt, full && xt_vec, w);
    // o_vec implies E | C*S, so a full vectorised unit lies in one sample; otherwise each element finds its own
    const bool one_sample = full && o_vec;
    const int64_t b0 = i0 / CS;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int64_t b = one_sample ? b0 : last_sample((i0 + e) / CS, vt.B);
      y[e] = mul_rn(c1[b], y[e]) + mul_rn(c2[b], w[e]);
    }
    if (noise != 0) {
      normals4(off + static_cast<uint64_t>(u), k0, k1, nz);
      if (noise == 2) {
        load_unit<E>(sig_e, i0, CS, N, vs, full && s_vec, w);
#pragma unroll
        for (int e = 0; e < E; ++e) y[e] += mul_rn(w[e], static_cast<acc>(nz[e]));
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int64_t b = one_sample ? b0 : last_sample((i0 + e) / CS, vt.B);
          y[e] += mul_rn(sig_b[b], static_cast<acc>(nz[e]));
        }
      }
    }
    if (sh != nullptr) {
      load_unit<E>(sh, i0, CS, N, vh, full && h_vec, w);
#pragma unroll
      for (int e = 0; e < E; ++e) y[e] += w[e];
    }
    if (one_sample) {
      Vec<out_t, E> vo;
#pragma unroll
      for (int e = 0; e < E; ++e) vo.v[e] = static_cast<out_t>(y[e]);
      store_vec(vec_at<Vec<out_t, E>>(out + b0 * ov.sb + (i0 - b0 * CS)), vo);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (i0 + e < N) store1(out + offset_of(i0 + e, ov), static_cast<out_t>(y[e]));
    }
  }
}

void reverse_step_out(const Tensor& x0_hat, const Tensor& x_t, const Tensor& c1, const Tensor& c2,
                      const c10::optional<Tensor>& sigma, const c10::optional<Tensor>& shift, const Tensor& seed,
                      const Tensor& offset, Tensor out) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  TORCH_CHECK(x0_hat.sizes() == x_t.sizes() && x0_hat.scalar_type() == x_t.scalar_type(),
              "internal: x0_hat must have x_t's shape and dtype");
  Tensor x0 = x0_hat, xt = x_t;
  Tensor se = sigma.has_value() && sigma->dim() != 1 ? *sigma : Tensor();
  Tensor sh = shift.has_value() ? *shift : Tensor();
  const int noise = !sigma.has_value() ? 0 : (se.defined() ? 2 : 1);
  const View3 v0 = dk::view3(x0), vt = dk::view3(xt), ov = dk::out_view3(out);
  const View3 vs = se.defined() ? dk::view3(se) : View3{}, vh = sh.defined() ? dk::view3(sh) : View3{};
  const int64_t N = xt.numel();
  if (N == 0) return;
  const Tensor s = seed.to(xt.device(), at::kLong), o = offset.to(xt.device(), at::kLong);
  const Tensor a1 = c1.contiguous(), a2 = c2.contiguous();
  const Tensor sb = noise == 1 ? sigma->contiguous() : Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt.scalar_type(), "reverse_step_in", [&] {
    using in_t = scalar_t;
    using acc = acc_t<in_t>;
    constexpr int E = 4;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "reverse_step_out", [&] {
      launch(reverse_step_kernel<in_t, scalar_t>, dim3(grid_for((N + E - 1) / E)), dim3(kThreads), stream,
             x0.data_ptr<in_t>(), xt.data_ptr<in_t>(), se.defined() ? se.data_ptr<in_t>() : nullptr,
             sh.defined() ? sh.data_ptr<in_t>() : nullptr, out.data_ptr<scalar_t>(), a1.data_ptr<acc>(),
             a2.data_ptr<acc>(), sb.defined() ? sb.data_ptr<acc>() : nullptr, s.data_ptr<int64_t>(),
             o.data_ptr<int64_t>(), N, v0, vt, vs, vh, ov, noise, vectorizable<in_t, E>(x0, v0),
             vectorizable<in_t, E>(xt, vt), se.defined() && vectorizable<in_t, E>(se, vs),
             sh.defined() && vectorizable<in_t, E>(sh, vh), vectorizable<scalar_t, E>(out, ov));
    });
  });
}

// ---------------------------------------------------------------------------------------- philox_normal
bool rng_math_libm() {
  const char* env = std::getenv("DIFFAUG_CUDA_RNG_MATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "poly") == 0) return false;
  TORCH_CHECK(std::strcmp(env, "libm") == 0, "DIFFAUG_CUDA_RNG_MATH must be poly (the default) or libm, not '",
              env, "'");
  return true;
}

template <bool LIBM>
__global__ void __launch_bounds__(kThreads) philox_normal_kernel(
    float* __restrict__ out, const int64_t* __restrict__ seed_p, const int64_t* __restrict__ off_p, int64_t N,
    bool vec) {
  const uint64_t seed = static_cast<uint64_t>(*seed_p), off = static_cast<uint64_t>(*off_p);
  const int64_t units = (N + 3) / 4;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float n[4];
    normals4<LIBM>(off + static_cast<uint64_t>(u), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), n);
    if (vec && 4 * u + 4 <= N) {
      store1(vec_at<float4>(out + 4 * u), make_float4(n[0], n[1], n[2], n[3]));
    } else {
      for (int e = 0; e < 4 && 4 * u + e < N; ++e) store1(out + 4 * u + e, n[e]);
    }
  }
}

void philox_normal_out(const Tensor& seed, const Tensor& offset, Tensor out) {
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat, "internal: out must be contiguous float32");
  const int64_t N = out.numel();
  const bool libm = rng_math_libm();
  if (N == 0) return;
  const Tensor s = seed.to(out.device(), at::kLong), o = offset.to(out.device(), at::kLong);
  const bool vec = reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  launch(libm ? philox_normal_kernel<true> : philox_normal_kernel<false>, dim3(grid_for((N + 3) / 4)), dim3(kThreads),
         c10::cuda::getCurrentCUDAStream(), out.data_ptr<float>(), s.data_ptr<int64_t>(), o.data_ptr<int64_t>(), N,
         vec);
}

}  // namespace

#if !defined(DK_CUDA_EMU)  // (the emulation registers them under its own library)
TORCH_LIBRARY_IMPL(diffaug_kernels_C, CUDA, m) {
  m.impl("forward_noise_out", &forward_noise_out);
  m.impl("tweedie_out", &tweedie_out);
  m.impl("reverse_step_out", &reverse_step_out);
  m.impl("philox_normal_out", &philox_normal_out);
}
#endif
