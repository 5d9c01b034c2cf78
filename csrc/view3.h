// A tensor seen as [B, C, S] with strides (S = dims 2.. merged): the layout contract shared by the CPU and
// CUDA kernels. Contiguous and channels_last tensors, and narrowed channel views (the learned-sigma split),
// are views; anything whose spatial dims cannot merge is copied to contiguous first.
#pragma once
#include <ATen/ATen.h>

namespace dk {

struct View3 {
  int64_t B, C, S, sb, sc, ss;
  // Element i of a sample lies at (i % (C*S)) from the sample's start: whole samples are dense in logical order.
  bool sample_dense() const { return (S == 1 || ss == 1) && (C == 1 || sc == S); }
};

inline bool try_view3(const at::Tensor& x, View3& v) {
  const int64_t d = x.dim();
  v.B = x.size(0);
  v.sb = x.stride(0);
  v.C = d > 1 ? x.size(1) : 1;
  v.sc = d > 1 ? x.stride(1) : 0;
  v.S = 1;
  v.ss = 1;
  int64_t expect = -1;  // the stride the next (outer) spatial dim must have
  for (int64_t k = d - 1; k >= 2; --k) {
    if (x.size(k) == 1) continue;
    if (expect >= 0 && x.stride(k) != expect) return false;
    if (expect < 0) v.ss = x.stride(k);
    expect = x.stride(k) * x.size(k);
    v.S *= x.size(k);
  }
  return true;
}

// Makes x mergeable (a contiguous copy) only when its strides do not allow a view.
inline View3 view3(at::Tensor& x) {
  View3 v;
  if (!try_view3(x, v)) {
    x = x.contiguous();
    try_view3(x, v);
  }
  return v;
}

inline View3 out_view3(const at::Tensor& out) {
  View3 v;
  TORCH_CHECK(try_view3(out, v), "internal: output layout is not a [B, C, S] view");
  return v;
}

}  // namespace dk
