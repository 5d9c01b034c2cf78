"""Shared strategies and comparison rules for the reference-vs-fused tests."""
import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]


@st.composite
def image_batches(draw, max_b=4, max_c=4, max_hw=11, layouts=LAYOUTS, lo=-1.0, hi=1.0):
    """A random [B, C, H, W] tensor in one of several memory layouts (values are fresh each draw)."""
    B, C = draw(st.integers(1, max_b)), draw(st.integers(1, max_c))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    layout = draw(st.sampled_from(layouts))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return make_layout(x.to(dtype), layout), layout


def make_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense but permuted: H and W swapped in memory
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "strided":  # not dense: every other column of a wider tensor
        wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Size of one unit in the last place of dtype at |x| (normal range; subnormals floored)."""
    m = MANTISSA[dtype]
    e = torch.floor(torch.log2(x.abs().double().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - m)


def assert_matches(out, ref, atol32=1e-5, mag=None):
    """float32/64: |out - ref| <= atol32 (+ 4 float32 ulps of `mag`, the size of the summed terms when a
    formula cancels large terms); float16/bfloat16: within one ulp of the output dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert not torch.isnan(out).any(), "NaN in output (an element was not written)"
    o, r = out.double(), ref.double()
    tol = torch.full_like(r, atol32)
    if mag is not None:
        tol = tol + 4 * 2.0**-23 * mag.double()
    if out.dtype in MANTISSA:
        tol = tol + ulp(r, out.dtype) * 1.0001
    bad = (o - r).abs() > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements differ; worst "
                           f"{float(((o - r).abs() - tol).max()):.3g} beyond tolerance")


def tweedie_magnitude(schedule, x, m, t, prediction, normalize, C):
    """|A x| + |B m| (times the normalisation scale): the size of the terms a float32 tweedie result is rounded
    at, for assert_matches's mag (on t's device)."""
    a, b = schedule.x0_coefficients(prediction, device=t.device, dtype=torch.float64)
    a, b = a[t].view(-1, 1, 1, 1), b[t].view(-1, 1, 1, 1)
    mag = (a * x.double()).abs() + (b * m[:, :C].double()).abs()
    if normalize is not None:
        mag = mag / torch.tensor(normalize[1], dtype=torch.float64, device=t.device).view(1, -1, 1, 1)
    return mag
