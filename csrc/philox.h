// Philox4x32-10 counter-based RNG and the Box-Muller normal transform, shared by host C++ and CUDA.
//
// The stream (docs/design.md section 5) follows Triton's tl.randn4x: flat element i of a tensor takes lane i % 4
// of the counter (offset + i / 4); counter word 0 is the low 32 bits of that 64-bit counter, word 1 the high
// 32 bits, words 2 and 3 are zero; the key is (seed low 32 bits, seed high 32 bits). Uniforms and normals
// use Triton's exact float32 conversion (uint_to_uniform_float, pair_uniform_to_normal).
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline __attribute__((always_inline))
#endif
// The device code paths: compiled by nvcc for the GPU, or for the CPU by tests/cpp/cuda_emu.h, which runs
// csrc/cuda_kernels.cu a thread at a time so CI tests that code without a GPU.
#if defined(__CUDA_ARCH__) || defined(DK_CUDA_EMU)
#define DK_DEVICE_PATH 1
#endif

namespace dk {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key schedule (sqrt(3) - 1)
constexpr float kUniformScale = 4.6566127342e-10f;  // largest s with (2^31 - 1) * s < 1 in float32
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

// Ten Philox rounds on the counter (c0..c3) with key (k0, k1), in place.
DK_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#else
#pragma GCC unroll 10  // straight-line code lets the caller's lane loop vectorise
#endif
  for (int r = 0; r < 10; ++r) {
#if defined(DK_DEVICE_PATH)
    // 32-bit halves: from the 64-bit product, NVVM widens the whole round to 64-bit masks and xors inside
    // the forward-noise kernels, and ptxas leaves an add of zero after every multiply (sm_90 SASS:
    // tools/sass_stats.py).
    const uint32_t h0 = __umulhi(kPhiloxM0, c0), l0 = kPhiloxM0 * c0;
    const uint32_t h1 = __umulhi(kPhiloxM1, c2), l1 = kPhiloxM1 * c2;
#else
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t h0 = static_cast<uint32_t>(p0 >> 32), l0 = static_cast<uint32_t>(p0);
    const uint32_t h1 = static_cast<uint32_t>(p1 >> 32), l1 = static_cast<uint32_t>(p1);
#endif
    const uint32_t n0 = h1 ^ c1 ^ k0;
    const uint32_t n2 = h0 ^ c3 ^ k1;
    c1 = l1;
    c3 = l0;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale into [0, 1).
DK_HD float uint_to_uniform(uint32_t v) {
  int32_t x = static_cast<int32_t>(v);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// Branch-free float32 log, sincos and sqrt on the ranges Box-Muller uses, one source for host and device, so
// CPU and CUDA compute the same normals. Host: GCC/Clang vectorise the loops that call them (libm calls would
// not without -ffast-math). Device: the libm functions carry guards for inputs that cannot occur here
// (denormals, zero, infinity, the huge-argument sincos reduction, which also puts a local-memory array in
// the kernel); their branches split the forward-noise kernels' Philox + Box-Muller code into blocks that ptxas
// cannot interleave (sm_90 SASS: tools/sass_stats.py). Accurate to about 1 ulp: log on [1e-7, 1), sincos on
// [0, 2*pi].
// Minimax polynomials of the classic Cephes single-precision routines.
DK_HD float bits_to_float(uint32_t b) {
#if defined(DK_DEVICE_PATH)
  return __uint_as_float(b);
#else
  return __builtin_bit_cast(float, b);
#endif
}
DK_HD uint32_t float_to_bits(float f) {
#if defined(DK_DEVICE_PATH)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// a * b + c, fused on the device (where the compiler would otherwise pick the instructions).
DK_HD float fma_f(float a, float b, float c) {
#if defined(DK_DEVICE_PATH)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// -2 log(x), the radius Box-Muller squares, for x positive, finite and normal. The -2 is folded into every
// coefficient: scaling by a power of two is exact and commutes with each rounding, so the result is bit for bit
// -2 * log(x) computed the plain way, one multiply fewer (the last add becomes a fused -2 * f + y).
DK_HD float neg2_log_unit(float x) {
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)): subtracting sqrt(1/2)'s bits makes the exponent field e and
  // leaves the mantissa to re-attach, with no data-dependent select (which would stop vectorisation).
  const int32_t d = static_cast<int32_t>(float_to_bits(x)) - 0x3f3504f3;
  const int32_t e = d >> 23;
  const float m = bits_to_float(static_cast<uint32_t>((d & 0x007fffff) + 0x3f3504f3));
  const float f = m - 1.0f;
  const float z = f * f;
  constexpr float k = -2.0f;  // the log's Cephes coefficients, each times -2 (exactly, at compile time)
  float p = k * 7.0376836292e-2f;
  p = p * f - k * 1.1514610310e-1f;
  p = p * f + k * 1.1676998740e-1f;
  p = p * f - k * 1.2420140846e-1f;
  p = p * f + k * 1.4249322787e-1f;
  p = p * f - k * 1.6668057665e-1f;
  p = p * f + k * 2.0000714765e-1f;
  p = p * f - k * 2.4999993993e-1f;
  p = p * f + k * 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y += (k * -2.12194440e-4f) * fe;
  y += z;  // -2 * (-0.5 * z)
  return fma_f(k, f, y) + (k * 0.693359375f) * fe;  // fused: as f + f, then a subtraction, it took two
}

DK_HD void sincos_unit(float x, float& s, float& c) {  // x in [0, 2*pi]
  // j = x * 2/pi rounded to the nearest integer by adding 1.5 * 2^23, where a float's ulp is 1: the sum's low
  // mantissa bits are then j's, so the quadrant needs no float-to-int conversion (a quarter-rate instruction on
  // the GPU). Fused or not, the sum rounds x * 2/pi to a nearest multiple; q and j come from the same sum.
  const float big = x * 0.63661977236758134f + 12582912.0f;
  const uint32_t q = float_to_bits(big);
  const float j = big - 12582912.0f;
  // y = x - j * pi/2 in two parts: j * 1.5703125 is exact for j <= 4 and so (Sterbenz) is the subtraction; the
  // second part's rounding (2.6e-12) times j is far below float32's. A third part serves only huge arguments.
  const float y = (x - j * 1.5703125f) - j * 4.8382679233327508e-4f;
  const float z = y * y;
  const float ps = y + y * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float pc = 1.0f - 0.5f * z +
                   z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const float sv = (q & 1) ? pc : ps;
  const float cv = (q & 1) ? ps : pc;
  // the signs as bit flips: sin is negative in quadrants 2 and 3 (q's bit 1), cos in 1 and 2 ((q + 1)'s bit 1)
  s = bits_to_float(float_to_bits(sv) ^ ((q << 30) & 0x80000000u));
  c = bits_to_float(float_to_bits(cv) ^ (((q + 1) << 30) & 0x80000000u));
}

// sqrt(x) from r, an approximate 1/sqrt(x): y = x * r, then one Newton step y + (x - y*y) * r / 2, which squares
// r's relative error (2^-22.9 for the hardware's rsqrt.approx) before the last rounding. sqrtf does the same on
// the device but first branches on special inputs. tests/cpp/math_check.cpp checks it on the host.
DK_HD float sqrt_newton(float x, float r) {
#if defined(DK_DEVICE_PATH)
  const float y = x * r;
  return fmaf(fmaf(-y, y, x), 0.5f * r, y);
#else
  const float y = x * r;
  return __builtin_fmaf(__builtin_fmaf(-y, y, x), 0.5f * r, y);
#endif
}

DK_HD float sqrt_positive(float x) {  // x positive, finite and normal
#if defined(__CUDA_ARCH__)
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return sqrt_newton(x, r);
#elif defined(DK_CUDA_EMU)  // the device path with an exact rsqrt (math_check.cpp covers rsqrt.approx's error)
  return sqrt_newton(x, 1.0f / __builtin_sqrtf(x));
#else
  return __builtin_sqrtf(x);
#endif
}

// Triton's pair_uniform_to_normal (Box-Muller) on the raw uint32 pair.
DK_HD void box_muller(uint32_t a, uint32_t b, float& n1, float& n2) {
  const float u1 = uint_to_uniform(a);
  const float th = kTwoPi * uint_to_uniform(b);
  // max(u1, 1e-7) as an integer max of the bit patterns (equal for non-negative floats): a float select
  // here lets GCC specialise the constant branch, and that control flow stops vectorisation.
  const uint32_t ub = float_to_bits(u1), kb = float_to_bits(kMinUniform);
  const float r = sqrt_positive(neg2_log_unit(bits_to_float(ub > kb ? ub : kb)));
  float s, c;
  sincos_unit(th, s, c);
  n1 = r * c;
  n2 = r * s;
}

// The x_t term of the Tweedie step, a * x. x0 prediction has a = 0 and, like the reference, ignores x_t
// altogether: 0 * inf or 0 * NaN would otherwise put NaN where the reference returns the model's output.
template <typename T>
DK_HD T xt_term(T a, T x) {
  return a == T(0) ? T(0) : a * x;
}

}  // namespace dk
