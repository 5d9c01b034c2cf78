// Fused CPU kernels: forward noise (in-kernel Philox normals), Tweedie step, reverse step, GroupNorm + SiLU
// (and its backward for channels_last), raw Philox streams.
//
// Work is split into (row, chunk) tasks over a [B, C, S] view of each tensor (S = the collapsed spatial
// dims, contiguous or channels_last; GroupNorm + SiLU: one task per (sample, block of whole groups) for
// channels_last, per (sample, group) otherwise), run by at::parallel_for
// (torch's OpenMP pool). The inner loops are plain counted loops over float buffers so the compiler vectorises
// them (-O3 -march=native; see `python setup.py build_ext` with DIFFAUG_VEC_REPORT=1 for GCC's -fopt-info-vec
// report), except the Philox words, written with AVX-512 intrinsics where the build targets it (philox16),
// scalar otherwise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <sys/mman.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "philox.h"
#include "view3.h"

namespace {

using at::Tensor;
using dk::View3;
using dk::out_view3;
using dk::view3;

constexpr int64_t kChunk = 512;         // elements per task: a multiple of 4 (one counter = 4 elements)
constexpr int64_t kChunkCtr = kChunk / 4 + 1;  // counters a chunk can touch when it starts mid-counter

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Element conversions. bfloat16 is done on the bits (as c10 does, NaN -> 0x7FC0, round to nearest even) but
// without c10's branch, so the loops that use it vectorise; other types use the ordinary casts.
template <typename acc, typename T>
inline acc to_acc(T v) {
  return static_cast<acc>(v);
}
template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}
template <typename T, typename acc>
inline T from_acc(acc y) {
  return static_cast<T>(y);
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float y) {
  const uint32_t u = __builtin_bit_cast(uint32_t, y);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(y != y ? 0x7FC0u : r), c10::BFloat16::from_bits());
}

uint64_t seed_of(const Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && !seed.is_floating_point(), "seed must be a single integer");
  return static_cast<uint64_t>(seed.cpu().item<int64_t>());
}

#if defined(__AVX512F__)
// Sixteen counters at once. GCC vectorises the scalar rounds with 64-bit lanes and vpmullq; Philox needs only
// the 32x32 -> 64 products that vpmuludq gives for the even lanes (and, shifted, the odd ones), which halves
// the cost of the words (bit-exact; RESULTS.md has `python -m diffaug_kernels bench --device cpu` with and
// without it).
inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline void philox16(uint64_t ctr0, uint32_t k0, uint32_t k1, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                     uint32_t* w3) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(dk::kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(dk::kPhiloxM1));
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr0)));
  const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr0 >> 32)));
  __m512i c0 = _mm512_add_epi32(base_lo, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base_lo);  // the low word wrapped: the high word + 1
  __m512i c1 = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(c0, m0, hi0, lo0);
    mulhilo16(c2, m1, hi1, lo1);
    const __m512i n0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // xor3
    const __m512i n2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    c0 = n0;
    c2 = n2;
    k0 += dk::kPhiloxW0;
    k1 += dk::kPhiloxW1;
  }
  _mm512_storeu_si512(w0, c0);
  _mm512_storeu_si512(w1, c1);
  _mm512_storeu_si512(w2, c2);
  _mm512_storeu_si512(w3, c3);
}
#endif

// The four Philox words of counters ctr0 .. ctr0 + n - 1, one array per word.
inline void philox_words(uint64_t ctr0, int64_t n, uint32_t k0, uint32_t k1, uint32_t* __restrict w0,
                         uint32_t* __restrict w1, uint32_t* __restrict w2, uint32_t* __restrict w3) {
  int64_t l = 0;
#if defined(__AVX512F__)
  for (; l + 16 <= n; l += 16) philox16(ctr0 + static_cast<uint64_t>(l), k0, k1, w0 + l, w1 + l, w2 + l, w3 + l);
#endif
#pragma omp simd
  for (int64_t j = l; j < n; ++j) {
    const uint64_t ctr = ctr0 + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
    dk::philox4x32_10(c0, c1, c2, c3, k0, k1);
    w0[j] = c0;
    w1[j] = c1;
    w2[j] = c2;
    w3[j] = c3;
  }
}

// Fills out[0 .. 4*n) with the normals of counters ctr0 .. ctr0 + n - 1 (element order: lane fastest).
inline void philox_normals(uint64_t ctr0, int64_t n, uint32_t k0, uint32_t k1, float* __restrict out) {
  alignas(64) uint32_t w0[kChunkCtr], w1[kChunkCtr], w2[kChunkCtr], w3[kChunkCtr];
  alignas(64) float n0[kChunkCtr], n1[kChunkCtr], n2[kChunkCtr], n3[kChunkCtr];
  philox_words(ctr0, n, k0, k1, w0, w1, w2, w3);
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    dk::box_muller(w0[l], w1[l], n0[l], n1[l]);
    dk::box_muller(w2[l], w3[l], n2[l], n3[l]);
  }
  for (int64_t l = 0; l < n; ++l) {
    out[4 * l + 0] = n0[l];
    out[4 * l + 1] = n1[l];
    out[4 * l + 2] = n2[l];
    out[4 * l + 3] = n3[l];
  }
}

// ----------------------------------------------------------------------------------- output buffers
// A large output (>= 16 MiB) would be fresh memory on every call (glibc mmaps anything above 32 MiB and
// unmaps it on free), and faulting it in 4 KiB at a time costs about as much as the kernel (38 MB: ~8 ms of
// faults against ~10 ms of noise work on 2 cores). So large outputs come from a small pool of buffers that go
// back to the pool when their tensor dies, asking for transparent huge pages when first mapped. The pool holds
// at most DIFFAUG_CPU_POOL_MB (default 512) of idle buffers; DIFFAUG_NO_HUGEPAGES=1 skips the madvise.
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may die after static destructors
    return *pool;
  }

  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.find(nbytes);
      if (it != idle_.end()) {
        void* p = it->second;
        idle_.erase(it);
        held_ -= nbytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(kHuge, nbytes);
    TORCH_CHECK(p != nullptr, "diffaug_kernels: out of memory allocating ", nbytes, " bytes");
    if (!no_huge_) madvise(p, nbytes, MADV_HUGEPAGE);  // a hint; harmless where THP is off
    return p;
  }

  void give(void* p, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (held_ + nbytes > limit_) {
      std::free(p);
      return;
    }
    idle_.emplace(nbytes, p);
    held_ += nbytes;
  }

  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = size_t(16) << 20;

 private:
  BufferPool() {
    const char* mb = std::getenv("DIFFAUG_CPU_POOL_MB");
    limit_ = (mb ? std::strtoull(mb, nullptr, 10) : 512) << 20;
    no_huge_ = std::getenv("DIFFAUG_NO_HUGEPAGES") != nullptr;
  }
  std::mutex mu_;
  std::multimap<size_t, void*> idle_;
  size_t held_ = 0, limit_ = 0;
  bool no_huge_ = false;
};

Tensor empty_cpu_output(c10::IntArrayRef size, c10::IntArrayRef stride, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t nbytes = at::detail::computeStorageNbytes(size, stride, c10::elementSize(dtype));
  if (nbytes < BufferPool::kMinBytes) return at::empty_strided(size, stride, opts);
  const size_t rounded = (nbytes + BufferPool::kHuge - 1) / BufferPool::kHuge * BufferPool::kHuge;
  void* p = BufferPool::get().take(rounded);
  return at::from_blob(p, size, stride, [rounded](void* q) { BufferPool::get().give(q, rounded); }, opts);
}

void check_t(const Tensor& t, int64_t T) {
  const auto tc = t.contiguous();
  const int64_t* p = tc.data_ptr<int64_t>();
  for (int64_t i = 0; i < tc.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < T, "t must lie in [0, ", T, "), got ", p[i]);
}

// -------------------------------------------------------------------------------------- forward noise
template <typename in_t, typename out_t>
void forward_noise_kernel(const Tensor& x0_, const Tensor& t, const Tensor& ca_, const Tensor& cb_, uint64_t seed,
                          uint64_t offset, Tensor& out) {
  using acc_t = acc_type_t<in_t>;
  Tensor x0 = x0_;
  const View3 xv = view3(x0);
  const View3 ov = out_view3(out);
  const int64_t K = t.size(0), B = xv.B, C = xv.C, S = xv.S;
  const int64_t tk = t.stride(0), tb = t.stride(1);
  const int64_t* tp = t.data_ptr<int64_t>();
  const Tensor ca = ca_.contiguous(), cb = cb_.contiguous();
  const acc_t* pa = ca.data_ptr<acc_t>();
  const acc_t* pb = cb.data_ptr<acc_t>();
  const in_t* px = x0.data_ptr<in_t>();
  out_t* po = out.data_ptr<out_t>();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t nchunks = (S + kChunk - 1) / kChunk;
  const int64_t tasks = B * C * nchunks;

  at::parallel_for(0, tasks, std::max<int64_t>(1, 32768 / kChunk), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t xb[kChunk];
    alignas(64) float nb[4 * kChunkCtr];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, s0 = (task % nchunks) * kChunk;
      const int64_t b = row / C, c = row % C;
      const int64_t len = std::min(kChunk, S - s0);
      const in_t* __restrict xs = px + b * xv.sb + c * xv.sc + s0 * xv.ss;
      if (xv.ss == 1) {
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) xb[e] = to_acc<acc_t>(xs[e]);
      } else {
        for (int64_t e = 0; e < len; ++e) xb[e] = to_acc<acc_t>(xs[e * xv.ss]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t ti = tp[k * tk + b * tb];
        const acc_t a = pa[ti], s = pb[ti];
        const uint64_t i0 = static_cast<uint64_t>(((k * B + b) * C + c) * S + s0);  // logical flat index
        const int64_t lane0 = static_cast<int64_t>(i0 & 3u);
        philox_normals(offset + (i0 >> 2), (lane0 + len + 3) / 4, k0, k1, nb);
        const float* nz = nb + lane0;
        out_t* __restrict os = po + (k * B + b) * ov.sb + c * ov.sc + s0 * ov.ss;
        if (ov.ss == 1) {
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) os[e] = from_acc<out_t>(a * xb[e] + s * static_cast<acc_t>(nz[e]));
        } else {
          for (int64_t e = 0; e < len; ++e)
            os[e * ov.ss] = from_acc<out_t>(a * xb[e] + s * static_cast<acc_t>(nz[e]));
        }
      }
    }
  });
}

void forward_noise_out(const Tensor& x0, const Tensor& t, const Tensor& coef_a, const Tensor& coef_b,
                       const Tensor& seed, const Tensor& offset, Tensor out) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == x0.size(0) && t.scalar_type() == at::kLong, "internal: t must be [K, B] int64");
  TORCH_CHECK(out.size(0) == t.size(0) * x0.size(0), "internal: out must have K*B rows");
  check_t(t, coef_a.numel());
  const uint64_t s = seed_of(seed), o = seed_of(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "forward_noise_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "forward_noise_out", [&] {
      forward_noise_kernel<in_t, scalar_t>(x0, t, coef_a, coef_b, s, o, out);
    });
  });
}

// -------------------------------------------------------------------------------------------- tweedie
template <typename in_t, typename out_t>
void tweedie_kernel(const Tensor& x_, const Tensor& m_, const Tensor& t, const Tensor& ca_, const Tensor& cb_,
                    bool clip, const Tensor& scale, const Tensor& shift, Tensor& out) {
  using acc_t = acc_type_t<in_t>;
  Tensor x = x_, m = m_;
  const View3 xv = view3(x), mv = view3(m);
  const View3 ov = out_view3(out);
  const int64_t B = xv.B, C = xv.C, S = xv.S;
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t tb = t.stride(0);
  const Tensor ca = ca_.contiguous(), cb = cb_.contiguous();
  const acc_t* pa = ca.data_ptr<acc_t>();
  const acc_t* pb = cb.data_ptr<acc_t>();
  const bool norm = scale.defined();
  const acc_t* psc = norm ? scale.data_ptr<acc_t>() : nullptr;
  const acc_t* psh = norm ? shift.data_ptr<acc_t>() : nullptr;
  const in_t* px = x.data_ptr<in_t>();
  const in_t* pm = m.data_ptr<in_t>();
  out_t* po = out.data_ptr<out_t>();
  const int64_t nchunks = (S + kChunk - 1) / kChunk;
  const acc_t lo = clip ? acc_t(-1) : -std::numeric_limits<acc_t>::infinity();
  const acc_t hi = clip ? acc_t(1) : std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * C * nchunks, std::max<int64_t>(1, 32768 / kChunk), [&](int64_t begin, int64_t end) {
    const acc_t lo_ = lo, hi_ = hi;  // locals, not captured references the stores might alias (no vectorising)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, s0 = (task % nchunks) * kChunk;
      const int64_t b = row / C, c = row % C;
      const int64_t len = std::min(kChunk, S - s0);
      const int64_t ti = tp[b * tb];
      const acc_t a = pa[ti], s = pb[ti];
      const acc_t g = norm ? psc[c] : acc_t(1), h = norm ? psh[c] : acc_t(0);
      const in_t* __restrict xs = px + b * xv.sb + c * xv.sc + s0 * xv.ss;
      const in_t* __restrict ms = pm + b * mv.sb + c * mv.sc + s0 * mv.ss;
      out_t* __restrict os = po + b * ov.sb + c * ov.sc + s0 * ov.ss;
      if (xv.ss == 1 && mv.ss == 1 && ov.ss == 1) {
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) {
          acc_t y = dk::xt_term(a, to_acc<acc_t>(xs[e])) + s * to_acc<acc_t>(ms[e]);
          y = y < lo_ ? lo_ : (y > hi_ ? hi_ : y);  // NaN stays NaN
          os[e] = from_acc<out_t>(y * g + h);
        }
      } else {
        for (int64_t e = 0; e < len; ++e) {
          acc_t y = dk::xt_term(a, to_acc<acc_t>(xs[e * xv.ss])) + s * to_acc<acc_t>(ms[e * mv.ss]);
          y = y < lo_ ? lo_ : (y > hi_ ? hi_ : y);  // NaN stays NaN
          os[e * ov.ss] = from_acc<out_t>(y * g + h);
        }
      }
    }
  });
}

void tweedie_out(const Tensor& x_t, const Tensor& model_output, const Tensor& t, const Tensor& coef_a,
                 const Tensor& coef_b, bool clip, const c10::optional<Tensor>& scale,
                 const c10::optional<Tensor>& shift, Tensor out) {
  TORCH_CHECK(x_t.sizes() == model_output.sizes() && x_t.scalar_type() == model_output.scalar_type(),
              "internal: model_output must be narrowed and cast to x_t's shape and dtype");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x_t.size(0) && t.scalar_type() == at::kLong, "internal: t must be [B] int64");
  check_t(t, coef_a.numel());
  const Tensor sc = scale.has_value() ? scale->contiguous() : Tensor();
  const Tensor sh = shift.has_value() ? shift->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "tweedie_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tweedie_out", [&] {
      tweedie_kernel<in_t, scalar_t>(x_t, model_output, t, coef_a, coef_b, clip, sc, sh, out);
    });
  });
}

// --------------------------------------------------------------------------------------- reverse step
// len elements from p at stride ss into buf, widened to the compute type.
template <typename acc_t, typename in_t>
inline void load_chunk(const in_t* __restrict p, int64_t ss, int64_t len, acc_t* __restrict buf) {
  if (ss == 1) {
#pragma omp simd
    for (int64_t e = 0; e < len; ++e) buf[e] = to_acc<acc_t>(p[e]);
  } else {
    for (int64_t e = 0; e < len; ++e) buf[e] = to_acc<acc_t>(p[e * ss]);
  }
}

// The terms are added in the reference's order, ((c1 x0_hat + c2 x_t) + sigma z) + shift, each product and sum in
// its own counted loop over chunk buffers (vectorised). A product passes through memory before it is added, so the
// compiler cannot contract the pair into an FMA: the result is the unfused PyTorch expression's, bit for bit (the
// samplers' numbers do not depend on the backend that runs their steps).
template <typename in_t, typename out_t>
void reverse_step_kernel(const Tensor& x0_, const Tensor& xt_, const Tensor& c1_, const Tensor& c2_,
                         const Tensor& sigma_, const Tensor& shift_, uint64_t seed, uint64_t offset, Tensor& out) {
  using acc_t = acc_type_t<in_t>;
  Tensor x0 = x0_, xt = xt_, se = sigma_, sh = shift_;
  const bool noise = sigma_.defined(), per_elem = noise && sigma_.dim() != 1, shift = shift_.defined();
  const View3 v0 = view3(x0), vt = view3(xt), ov = out_view3(out);
  const View3 vs = per_elem ? view3(se) : View3{}, vh = shift ? view3(sh) : View3{};
  const int64_t B = vt.B, C = vt.C, S = vt.S;
  const Tensor c1 = c1_.contiguous(), c2 = c2_.contiguous();
  const Tensor sb = noise && !per_elem ? sigma_.contiguous() : Tensor();
  const acc_t* p1 = c1.data_ptr<acc_t>();
  const acc_t* p2 = c2.data_ptr<acc_t>();
  const acc_t* psb = sb.defined() ? sb.data_ptr<acc_t>() : nullptr;
  const in_t* px0 = x0.data_ptr<in_t>();
  const in_t* pxt = xt.data_ptr<in_t>();
  const in_t* pse = per_elem ? se.data_ptr<in_t>() : nullptr;
  const in_t* psh = shift ? sh.data_ptr<in_t>() : nullptr;
  out_t* po = out.data_ptr<out_t>();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t nchunks = (S + kChunk - 1) / kChunk;

  at::parallel_for(0, B * C * nchunks, std::max<int64_t>(1, 32768 / kChunk), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t y[kChunk], w[kChunk];
    alignas(64) float nb[4 * kChunkCtr];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, s0 = (task % nchunks) * kChunk;
      const int64_t b = row / C, c = row % C;
      const int64_t len = std::min(kChunk, S - s0);
      const acc_t a1 = p1[b], a2 = p2[b];
      load_chunk(px0 + b * v0.sb + c * v0.sc + s0 * v0.ss, v0.ss, len, y);
      load_chunk(pxt + b * vt.sb + c * vt.sc + s0 * vt.ss, vt.ss, len, w);
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) y[e] = a1 * y[e];
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) w[e] = a2 * w[e];
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) y[e] = y[e] + w[e];
      if (noise) {
        const uint64_t i0 = static_cast<uint64_t>((b * C + c) * S + s0);  // logical flat index
        const int64_t lane0 = static_cast<int64_t>(i0 & 3u);
        philox_normals(offset + (i0 >> 2), (lane0 + len + 3) / 4, k0, k1, nb);
        const float* nz = nb + lane0;
        if (per_elem) {
          load_chunk(pse + b * vs.sb + c * vs.sc + s0 * vs.ss, vs.ss, len, w);
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) w[e] = w[e] * static_cast<acc_t>(nz[e]);
        } else {
          const acc_t sg = psb[b];
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) w[e] = sg * static_cast<acc_t>(nz[e]);
        }
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) y[e] = y[e] + w[e];
      }
      if (shift) {
        load_chunk(psh + b * vh.sb + c * vh.sc + s0 * vh.ss, vh.ss, len, w);
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) y[e] += w[e];
      }
      out_t* __restrict os = po + b * ov.sb + c * ov.sc + s0 * ov.ss;
      if (ov.ss == 1) {
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) os[e] = from_acc<out_t>(y[e]);
      } else {
        for (int64_t e = 0; e < len; ++e) os[e * ov.ss] = from_acc<out_t>(y[e]);
      }
    }
  });
}

void reverse_step_out(const Tensor& x0_hat, const Tensor& x_t, const Tensor& c1, const Tensor& c2,
                      const c10::optional<Tensor>& sigma, const c10::optional<Tensor>& shift, const Tensor& seed,
                      const Tensor& offset, Tensor out) {
  TORCH_CHECK(x0_hat.sizes() == x_t.sizes() && x0_hat.scalar_type() == x_t.scalar_type(),
              "internal: x0_hat must have x_t's shape and dtype");
  const auto acc = x_t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x_t.size(0);
  TORCH_CHECK(c1.dim() == 1 && c1.size(0) == B && c2.dim() == 1 && c2.size(0) == B && c1.scalar_type() == acc &&
                  c2.scalar_type() == acc, "internal: c1, c2 must be [B] in the compute dtype");
  const Tensor sg = sigma.has_value() ? *sigma : Tensor(), sh = shift.has_value() ? *shift : Tensor();
  if (sg.defined())
    TORCH_CHECK(sg.dim() == 1 ? (sg.size(0) == B && sg.scalar_type() == acc)
                              : (sg.sizes() == x_t.sizes() && sg.scalar_type() == x_t.scalar_type()),
                "internal: sigma must be [B] in the compute dtype or of x_t's shape and dtype");
  if (sh.defined())
    TORCH_CHECK(sh.sizes() == x_t.sizes() && sh.scalar_type() == x_t.scalar_type(),
                "internal: shift must have x_t's shape and dtype");
  const uint64_t s = seed_of(seed), o = seed_of(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "reverse_step_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "reverse_step_out", [&] {
      reverse_step_kernel<in_t, scalar_t>(x0_hat, x_t, c1, c2, sg, sh, s, o, out);
    });
  });
}

// ------------------------------------------------------------------------------------ group norm + SiLU
// a where c, else b, on the bits: a ternary in front of the division in silu() becomes a branch GCC will not
// if-convert (floating-point compares may trap), and the loop would stay scalar.
inline float pick(bool c, float a, float b) {
  const uint32_t m = -static_cast<uint32_t>(c);
  return __builtin_bit_cast(float, (__builtin_bit_cast(uint32_t, a) & m) | (__builtin_bit_cast(uint32_t, b) & ~m));
}

// exp(x) in float32 without a libm call, so the loops that use it vectorise (GCC vectorises expf only with
// -ffast-math's vector math library): Cephes' expf, about 1 ulp, with x clamped to [-87, 88] where 2^n stays
// a normal float (SiLU needs only 1 + exp(-y), which saturates there); NaN passes the clamp. n = round(x / ln 2)
// by the 1.5 * 2^23 trick (floorf does not vectorise without -ffast-math).
inline float exp_float(float x) {
  x = pick(x < -87.0f, -87.0f, pick(x > 88.0f, 88.0f, x));
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2 in two parts (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline float silu(float y) { return y / (1.0f + exp_float(-y)); }
inline double silu(double y) { return y / (1.0 + std::exp(-y)); }  // float64 is for gradcheck: libm's exp
inline float exp_acc(float x) { return exp_float(x); }
inline double exp_acc(double x) { return std::exp(x); }

// Running (count, mean, M2) of a group's values, merged chunk by chunk (Chan, Golub and LeVeque's pairwise
// update) in double: each chunk's mean and M2 come from two passes over the chunk in cache, so the variance
// never takes the difference of two large sums.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(double nb, double mb, double m2b) {
    const double tot = n + nb, d = mb - mean;
    mean += d * (nb / tot);
    m2 += m2b + d * d * (n * nb / tot);
    n = tot;
  }
};

// n values of a run with stride st into an L1 buffer as x - k, and back (vectorised when st is 1).
template <typename acc_t, typename in_t>
inline void load_run(const in_t* p, int64_t st, int64_t n, acc_t k, acc_t* __restrict buf) {
  if (st == 1) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) buf[e] = to_acc<acc_t>(p[e]) - k;
  } else {
    for (int64_t e = 0; e < n; ++e) buf[e] = to_acc<acc_t>(p[e * st]) - k;
  }
}

template <typename out_t, typename acc_t>
inline void store_run(const acc_t* __restrict buf, int64_t st, int64_t n, out_t* p) {
  if (st == 1) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) p[e] = from_acc<out_t>(buf[e]);
  } else {
    for (int64_t e = 0; e < n; ++e) p[e * st] = from_acc<out_t>(buf[e]);
  }
}

// channels_last (a pixel's channels adjacent, pixels a row apart): one task per (sample, block of whole groups,
// about kRowBlock channels), with one accumulator per channel, so every inner loop runs along the contiguous
// channels and reads whole cache lines (a task per group would read CG values of every row: 4 bytes in 128 for
// ADM's first level, where that ran about 4x slower; against inductor's compiled pair: `python -m
// diffaug_kernels bench --ops group_norm_silu --shapes 8x64x32x32 --layout channels_last --device cpu`).
// Statistics: per channel, of x - k_c (k_c the channel's first value), pixel chunk by pixel chunk (sum, then
// squares about the chunk's mean, the chunk in L1), merged across chunks in double; then the group's channels
// merged exactly (equal counts). Apply: out = SiLU((x - k_c - d_c) * a_c + h_c), d_c = mean - k_c.
constexpr int64_t kRowBlock = 64;     // channels per task (whole groups; more when a group is wider)
constexpr int64_t kRowChunk = 2048;   // values per statistics chunk (pixels = kRowChunk / block width, at least 1)

// The block width: whole groups, and a multiple of 32 channels where that costs at most 4 blocks' worth, so
// blocks start on 64-byte lines (bf16) and the vector loops need no remainder (groups of 6 channels in blocks of
// 60 ran at half the speed of blocks of 96).
inline int64_t row_block(int64_t CG) {
  const int64_t l = std::lcm(CG, int64_t(32));
  const int64_t w = l <= 4 * kRowBlock ? l : CG;
  return w * std::max<int64_t>(1, kRowBlock / w);
}

// A block's statistics (channels_last): per channel its shift k_c (its first value), d_c = mu_g - k_c and its
// group's rstd, from nc channels (whole groups of CG) of S pixels whose rows lie ss apart. The per-channel sums run
// pixel chunk by pixel chunk (kRowChunk values: the sum, then the squares about the chunk's mean, in L1), merged
// across chunks in double (Chan et al.: equal counts per channel); then each group's channels merge exactly.
template <typename T>
struct RowStats {
  using acc_t = acc_type_t<T>;
  std::vector<acc_t> k, d, s, q;
  std::vector<double> mean, m2, rstd;
  explicit RowStats(int64_t CB) : k(CB), d(CB), s(CB), q(CB), mean(CB), m2(CB), rstd(CB) {}

  void compute(const T* xs, int64_t ss, int64_t S, int64_t nc, int64_t CG, double eps) {
    const int64_t P = std::max<int64_t>(1, kRowChunk / nc);
    for (int64_t c = 0; c < nc; ++c) k[c] = to_acc<acc_t>(xs[c]);
    std::fill(mean.begin(), mean.end(), 0.0);
    std::fill(m2.begin(), m2.end(), 0.0);
    double n = 0;
    for (int64_t p0 = 0; p0 < S; p0 += P) {
      const int64_t np = std::min(P, S - p0);
      const T* xc = xs + p0 * ss;
      std::fill(s.begin(), s.end(), acc_t(0));
      std::fill(q.begin(), q.end(), acc_t(0));
      for (int64_t p = 0; p < np; ++p) {
        const T* __restrict r = xc + p * ss;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) s[c] += to_acc<acc_t>(r[c]) - k[c];
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(np);
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) s[c] *= inv;  // the chunk's mean of x - k_c
      for (int64_t p = 0; p < np; ++p) {
        const T* __restrict r = xc + p * ss;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const acc_t e = to_acc<acc_t>(r[c]) - k[c] - s[c];
          q[c] += e * e;
        }
      }
      const double tot = n + np, wb = np / tot, wd = n * np / tot;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) {
        const double dm = static_cast<double>(s[c]) - mean[c];
        mean[c] += dm * wb;
        m2[c] += static_cast<double>(q[c]) + dm * dm * wd;
      }
      n = tot;
    }
    for (int64_t g0 = 0; g0 < nc; g0 += CG) {
      double mu = 0;
      for (int64_t c = g0; c < g0 + CG; ++c) mu += static_cast<double>(k[c]) + mean[c];
      mu /= static_cast<double>(CG);
      double m2g = 0;
      for (int64_t c = g0; c < g0 + CG; ++c) {
        const double dc = static_cast<double>(k[c]) + mean[c] - mu;
        m2g += m2[c] + n * dc * dc;
      }
      const double r = 1.0 / std::sqrt(m2g / (n * static_cast<double>(CG)) + eps);
      for (int64_t c = g0; c < g0 + CG; ++c) {
        rstd[c] = r;
        d[c] = static_cast<acc_t>(mu - static_cast<double>(k[c]));
      }
    }
  }
};

// Channel c0 + c of sample b, for c < nc: a_c = mult_c * w * (1 + scale) (mult null: 1) and h_c = bias * (1 +
// scale) + shift, folded in double and rounded once.
template <typename acc_t>
inline void fold_affine(int64_t b, int64_t c0, int64_t nc, int64_t C, const double* mult, const acc_t* pw,
                        const acc_t* pb, const acc_t* psc, const acc_t* psh, acc_t* a, acc_t* h) {
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t ch = c0 + c;
    const double gm = psc ? 1.0 + static_cast<double>(psc[b * C + ch]) : 1.0;
    a[c] = static_cast<acc_t>((mult ? mult[c] : 1.0) * static_cast<double>(pw[ch]) * gm);
    h[c] = static_cast<acc_t>(static_cast<double>(pb[ch]) * gm + (psh ? static_cast<double>(psh[b * C + ch]) : 0.0));
  }
}

// Tasks of channels_last blocks: (sample, block of whole groups, row_block(CG) channels), what fn(b, c0, nc)
// computes.
template <typename F>
void for_row_blocks(const View3& xv, int64_t CG, F&& fn) {
  const int64_t CB = row_block(CG), nblk = (xv.C + CB - 1) / CB;
  at::parallel_for(0, xv.B * nblk, std::max<int64_t>(1, 32768 / std::max<int64_t>(CB * xv.S, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t task = begin; task < end; ++task) {
                       const int64_t c0 = (task % nblk) * CB;
                       fn(task / nblk, c0, std::min(CB, xv.C - c0), CB);
                     }
                   });
}

template <typename T>
void group_norm_silu_rows(const T* px, T* po, const View3& xv, const View3& ov, int64_t G, const acc_type_t<T>* pw,
                          const acc_type_t<T>* pb, const acc_type_t<T>* psc, const acc_type_t<T>* psh, double eps) {
  using acc_t = acc_type_t<T>;
  const int64_t C = xv.C, S = xv.S, CG = C / G;
  for_row_blocks(xv, CG, [&](int64_t b, int64_t c0, int64_t nc, int64_t CB) {
    thread_local std::vector<acc_t> a, h;
    RowStats<T> st(CB);
    a.resize(CB);
    h.resize(CB);
    const T* xs = px + b * xv.sb + c0;
    T* os = po + b * ov.sb + c0 * ov.sc;
    st.compute(xs, xv.ss, S, nc, CG, eps);
    fold_affine(b, c0, nc, C, st.rstd.data(), pw, pb, psc, psh, a.data(), h.data());
    const acc_t *k = st.k.data(), *d = st.d.data();
    for (int64_t p = 0; p < S; ++p) {
      const T* __restrict r = xs + p * xv.ss;
      T* __restrict o = os + p * ov.ss;
      if (ov.sc == 1) {
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) o[c] = from_acc<T>(silu((to_acc<acc_t>(r[c]) - k[c] - d[c]) * a[c] + h[c]));
      } else {
        for (int64_t c = 0; c < nc; ++c)
          o[c * ov.sc] = from_acc<T>(silu((to_acc<acc_t>(r[c]) - k[c] - d[c]) * a[c] + h[c]));
      }
    }
  });
}

// The backward of SiLU(z), z = xhat * w_c * (1 + scale_bc) + b_c * (1 + scale_bc) + shift_bc, xhat = (x - mu_g) *
// rstd_g, for channels_last x, grad and dx: dx, and per (sample, channel) A = sum over pixels of dz and X = sum of
// dz * xhat (dz = grad * SiLU'(z)), from which the caller forms the other gradients. Per block: the forward's
// statistics, then one pass computing dz (kept in a buffer of the block) and A, X per channel, then the group sums
// m1 = mean of dxhat, m2 = mean of dxhat * xhat (dxhat = dz * w_c * (1 + scale_bc)), and a last pass
// dx = rstd * (dxhat - m1 - xhat * m2).
template <typename T>
void group_norm_silu_backward_rows(const T* pg, const T* px, T* pdx, const View3& gv, const View3& xv,
                                   const View3& dv, int64_t G, const acc_type_t<T>* pw, const acc_type_t<T>* pb,
                                   const acc_type_t<T>* psc, const acc_type_t<T>* psh, double eps,
                                   acc_type_t<T>* sums) {
  using acc_t = acc_type_t<T>;
  const int64_t B = xv.B, C = xv.C, S = xv.S, CG = C / G;
  for_row_blocks(xv, CG, [&](int64_t b, int64_t c0, int64_t nc, int64_t CB) {
    thread_local std::vector<acc_t> aw, h, rs, sa, sx, dzb;
    thread_local std::vector<double> ta, tx;
    RowStats<T> st(CB);
    for (auto* v : {&aw, &h, &rs, &sa, &sx}) v->resize(CB);
    ta.assign(CB, 0.0);
    tx.assign(CB, 0.0);
    dzb.resize(nc * S);
    const T* xs = px + b * xv.sb + c0;
    const T* gs = pg + b * gv.sb + c0;
    T* ds = pdx + b * dv.sb + c0;
    st.compute(xs, xv.ss, S, nc, CG, eps);
    fold_affine(b, c0, nc, C, nullptr, pw, pb, psc, psh, aw.data(), h.data());
    for (int64_t c = 0; c < nc; ++c) rs[c] = static_cast<acc_t>(st.rstd[c]);
    const acc_t *k = st.k.data(), *d = st.d.data();
    const int64_t P = std::max<int64_t>(1, kRowChunk / nc);
    for (int64_t p0 = 0; p0 < S; p0 += P) {  // dz, and A, X in float per chunk, summed in double
      const int64_t np = std::min(P, S - p0);
      std::fill(sa.begin(), sa.end(), acc_t(0));
      std::fill(sx.begin(), sx.end(), acc_t(0));
      for (int64_t p = p0; p < p0 + np; ++p) {
        const T* __restrict r = xs + p * xv.ss;
        const T* __restrict g = gs + p * gv.ss;
        acc_t* __restrict dz = dzb.data() + p * nc;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const acc_t xh = (to_acc<acc_t>(r[c]) - k[c] - d[c]) * rs[c];
          const acc_t z = xh * aw[c] + h[c];
          const acc_t sg = acc_t(1) / (acc_t(1) + exp_acc(-z));
          const acc_t v = to_acc<acc_t>(g[c]) * sg * (acc_t(1) + z * (acc_t(1) - sg));
          dz[c] = v;
          sa[c] += v;
          sx[c] += v * xh;
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        ta[c] += static_cast<double>(sa[c]);
        tx[c] += static_cast<double>(sx[c]);
      }
    }
    std::vector<acc_t> m1(nc), m2(nc);  // per channel, its group's means
    for (int64_t g0 = 0; g0 < nc; g0 += CG) {
      double s1 = 0, s2 = 0;
      for (int64_t c = g0; c < g0 + CG; ++c) {
        s1 += static_cast<double>(aw[c]) * ta[c];
        s2 += static_cast<double>(aw[c]) * tx[c];
      }
      const double n = static_cast<double>(CG) * static_cast<double>(S);
      for (int64_t c = g0; c < g0 + CG; ++c) {
        m1[c] = static_cast<acc_t>(s1 / n);
        m2[c] = static_cast<acc_t>(s2 / n);
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      sums[b * C + c0 + c] = static_cast<acc_t>(ta[c]);
      sums[(B + b) * C + c0 + c] = static_cast<acc_t>(tx[c]);
    }
    for (int64_t p = 0; p < S; ++p) {
      const T* __restrict r = xs + p * xv.ss;
      const acc_t* __restrict dz = dzb.data() + p * nc;
      T* __restrict o = ds + p * dv.ss;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) {
        const acc_t xh = (to_acc<acc_t>(r[c]) - k[c] - d[c]) * rs[c];
        o[c] = from_acc<T>(rs[c] * (dz[c] * aw[c] - m1[c] - xh * m2[c]));
      }
    }
  });
}

// Other layouts (NCHW, strided views): one task per (sample, group), two reads of its slice: statistics of x - k
// (k the slice's first value, so a mean that dwarfs the spread keeps its digits in the apply pass), then
// out = SiLU((x - k - mean) * a_c + h_c) with a_c = rstd * w_c * (1 + scale_bc) and h_c = b_c * (1 + scale_bc) +
// shift_bc folded per channel in double. The slice is walked in chunks of at most kChunk values through an L1
// buffer, channel by channel (one flat run when the channels are adjacent).
template <typename T>
void group_norm_silu_kernel(const Tensor& x_, int64_t G, const Tensor& weight, const Tensor& bias, double eps,
                            const Tensor& scale, const Tensor& shift, Tensor& out) {
  using acc_t = acc_type_t<T>;
  Tensor x = x_;
  const View3 xv = view3(x), ov = out_view3(out);
  const int64_t C = xv.C, S = xv.S, CG = C / G, n = CG * S;
  const bool ss = scale.defined();
  const acc_t* pw = weight.data_ptr<acc_t>();
  const acc_t* pb = bias.data_ptr<acc_t>();
  const acc_t* psc = ss ? scale.data_ptr<acc_t>() : nullptr;
  const acc_t* psh = ss ? shift.data_ptr<acc_t>() : nullptr;
  const T* px = x.data_ptr<T>();
  T* po = out.data_ptr<T>();
  const bool flat = xv.ss == 1 && (xv.sc == S || CG == 1);            // the slice is one run of x
  if (!flat && xv.sc == 1 && S > 1) {                                   // channels_last
    group_norm_silu_rows<T>(px, po, xv, ov, G, pw, pb, psc, psh, eps);
    return;
  }

  at::parallel_for(0, xv.B * G, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, c0 = (task % G) * CG;
      const T* xs = px + b * xv.sb + c0 * xv.sc;
      T* os = po + b * ov.sb + c0 * ov.sc;
      const acc_t k = to_acc<acc_t>(xs[0]);
      Moments mo;
      auto add_chunk = [&](int64_t len) {
        acc_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t e = 0; e < len; ++e) s += buf[e];
        const acc_t m = s / static_cast<acc_t>(len);
        acc_t q = 0;
#pragma omp simd reduction(+ : q)
        for (int64_t e = 0; e < len; ++e) q += (buf[e] - m) * (buf[e] - m);
        mo.add(static_cast<double>(len), static_cast<double>(m), static_cast<double>(q));
      };
      if (flat) {
        for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
          const int64_t len = std::min(kChunk, n - i0);
          load_run(xs + i0, 1, len, k, buf);
          add_chunk(len);
        }
      } else {
        for (int64_t c = 0; c < CG; ++c)
          for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
            const int64_t len = std::min(kChunk, S - s0);
            load_run(xs + c * xv.sc + s0 * xv.ss, xv.ss, len, k, buf);
            add_chunk(len);
          }
      }
      const double rstd = 1.0 / std::sqrt(mo.m2 / mo.n + eps);
      const acc_t md = static_cast<acc_t>(mo.mean);
      for (int64_t c = 0; c < CG; ++c) {  // channel c0 + c
        const double g = ss ? 1.0 + static_cast<double>(psc[b * C + c0 + c]) : 1.0;
        const acc_t av = static_cast<acc_t>(rstd * static_cast<double>(pw[c0 + c]) * g);
        const acc_t hv = static_cast<acc_t>(static_cast<double>(pb[c0 + c]) * g +
                                            (ss ? static_cast<double>(psh[b * C + c0 + c]) : 0.0));
        for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
          const int64_t len = std::min(kChunk, S - s0);
          load_run(xs + c * xv.sc + s0 * xv.ss, xv.ss, len, k, buf);
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) buf[e] = silu((buf[e] - md) * av + hv);
          store_run(buf, ov.ss, len, os + c * ov.sc + s0 * ov.ss);
        }
      }
    }
  });
}

// Checks weight, bias [C] and scale, shift (both or neither, [B, C]) in the compute dtype; scale and shift
// contiguous (undefined when absent).
std::pair<Tensor, Tensor> checked_affine(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                         const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C && weight.scalar_type() == acc && bias.scalar_type() == acc,
              "internal: weight, bias must be [C] in the compute dtype");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "internal: scale and shift come together");
  const Tensor sc = scale.has_value() ? scale->contiguous() : Tensor();
  const Tensor sh = shift.has_value() ? shift->contiguous() : Tensor();
  if (sc.defined())
    TORCH_CHECK(sc.numel() == B * C && sh.numel() == B * C && sc.scalar_type() == acc && sh.scalar_type() == acc,
                "internal: scale, shift must be [B, C] in the compute dtype");
  return {sc, sh};
}

void group_norm_silu_out(const Tensor& x, int64_t num_groups, const Tensor& weight, const Tensor& bias, double eps,
                         const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift, Tensor out) {
  TORCH_CHECK(x.dim() >= 2 && num_groups > 0 && x.size(1) % num_groups == 0, "internal: num_groups must divide C");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "internal: out must have x's shape and dtype");
  const auto [sc, sh] = checked_affine(x, weight, bias, scale, shift);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu", [&] {
    group_norm_silu_kernel<scalar_t>(x, num_groups, weight.contiguous(), bias.contiguous(), eps, sc, sh, out);
  });
}

void group_norm_silu_backward_out(const Tensor& grad, const Tensor& x, int64_t num_groups, const Tensor& weight,
                                  const Tensor& bias, double eps, const c10::optional<Tensor>& scale,
                                  const c10::optional<Tensor>& shift, Tensor dx, Tensor sums) {
  TORCH_CHECK(x.dim() == 4 && num_groups > 0 && x.size(1) % num_groups == 0, "internal: num_groups must divide C");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && dx.sizes() == x.sizes() &&
                  dx.scalar_type() == x.scalar_type(), "internal: grad and dx must have x's shape and dtype");
  TORCH_CHECK(sums.is_contiguous() && sums.numel() == 2 * x.size(0) * x.size(1) &&
                  sums.scalar_type() == weight.scalar_type(),
              "internal: sums must be a contiguous [2, B, C] in the compute dtype");
  const auto [sc, sh] = checked_affine(x, weight, bias, scale, shift);
  if (x.numel() == 0) return;
  Tensor xx = x, gg = grad.contiguous(at::MemoryFormat::ChannelsLast);  // (a no-op for the usual gradient)
  const View3 xv = view3(xx), gv = view3(gg), dv = out_view3(dx);
  TORCH_CHECK(xv.sc == 1 && xv.S > 1 && gv.sc == 1 && dv.sc == 1,
              "internal: the backward kernel takes channels_last x and dx");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Tensor w = weight.contiguous(), b = bias.contiguous();
    group_norm_silu_backward_rows<scalar_t>(gg.data_ptr<scalar_t>(), xx.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                                            gv, xv, dv, num_groups, w.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
                                            sc.defined() ? sc.data_ptr<acc_t>() : nullptr,
                                            sh.defined() ? sh.data_ptr<acc_t>() : nullptr, eps,
                                            sums.data_ptr<acc_t>());
  });
}

// ------------------------------------------------------------------------------------- raw philox streams
void philox_normal_out(const Tensor& seed, const Tensor& offset, Tensor out) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat, "internal: out must be contiguous float32");
  const uint64_t s = seed_of(seed), o = seed_of(offset);
  const uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  float* po = out.data_ptr<float>();
  const int64_t n = out.numel(), nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float nb[4 * kChunkCtr];
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t i0 = ch * kChunk, len = std::min(kChunk, n - i0);
      philox_normals(o + static_cast<uint64_t>(i0 / 4), (len + 3) / 4, k0, k1, nb);
      std::copy(nb, nb + len, po + i0);
    }
  });
}

void philox_uint32_out(const Tensor& seed, const Tensor& offset, Tensor out) {  // out: int32 [n, 4]
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kInt && out.dim() == 2 && out.size(1) == 4,
              "internal: out must be contiguous int32 [n, 4]");
  const uint64_t s = seed_of(seed), o = seed_of(offset);
  int32_t* po = out.data_ptr<int32_t>();
  at::parallel_for(0, out.size(0), 4096, [&](int64_t begin, int64_t end) {  // the words the normals use
    alignas(64) uint32_t w[4][kChunkCtr];
    for (int64_t j0 = begin; j0 < end; j0 += kChunkCtr) {
      const int64_t len = std::min(kChunkCtr, end - j0);
      philox_words(o + static_cast<uint64_t>(j0), len, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                   w[0], w[1], w[2], w[3]);
      for (int64_t j = 0; j < len; ++j)
        for (int k = 0; k < 4; ++k) po[4 * (j0 + j) + k] = static_cast<int32_t>(w[k][j]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(diffaug_kernels_C, CPU, m) {
  m.impl("forward_noise_out", &forward_noise_out);
  m.impl("tweedie_out", &tweedie_out);
  m.impl("reverse_step_out", &reverse_step_out);
  m.impl("group_norm_silu_out", &group_norm_silu_out);
  m.impl("group_norm_silu_backward_out", &group_norm_silu_backward_out);
  m.impl("philox_normal_out", &philox_normal_out);
  m.impl("philox_uint32_out", &philox_uint32_out);
}

TORCH_LIBRARY_IMPL(diffaug_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("empty_cpu_output", &empty_cpu_output);
}
