"""reverse_step: every fused backend against the reference (coefficients per sample, sigma per sample or per
element, the guidance shift, in-kernel Philox noise), layouts, dtypes, gradients, errors."""
import pytest
import torch
from conftest import CPU_FUSED
from helpers import DTYPES, LAYOUTS, assert_matches, image_batches, make_layout
from hypothesis import given
from hypothesis import strategies as st

import diffaug_kernels as dk
from diffaug_kernels import reference

seeds = st.integers(0, 2**64 - 1)
offsets = st.one_of(st.integers(0, 1000), st.integers(2**32 - 50, 2**32 + 50), st.just(2**64 - 1))


def magnitude(x0, xt, c1, c2, sigma, shift, seed, offset):
    """The size of the terms a float32 result is rounded at (assert_matches's mag), with the fused normals'
    own error against the reference's (1e-6 relative plus 2e-6 absolute, docs/design.md section 5) folded in."""
    nd = xt.dim()

    def term(v):
        if v is None:
            return torch.zeros((), dtype=torch.float64)
        if not isinstance(v, torch.Tensor):
            return torch.tensor(abs(float(v)), dtype=torch.float64)
        v = v.detach().double().abs()
        return v.reshape(-1, *([1] * (nd - 1))) if v.dim() == 1 and nd > 1 else v

    z = reference.philox_normal(xt.shape, seed, offset).double().abs()
    return (term(c1) * x0.detach().double().abs() + term(c2) * xt.detach().double().abs() + 3 * term(sigma) * z
            + 5 * term(sigma) + term(shift)).expand(xt.shape)


@st.composite
def per_sample(draw, B, g, lo=-2.0, hi=2.0):
    """A coefficient as a number, a 0-d tensor, a [B] tensor or a [B, 1, 1, 1] tensor."""
    kind = draw(st.sampled_from(["number", "0d", "B", "B111"]))
    v = torch.rand(B, generator=g, dtype=torch.float64) * (hi - lo) + lo
    if kind == "number":
        return float(v[0])
    if kind == "0d":
        return v[0].float()
    return (v if kind == "B" else v.view(B, 1, 1, 1)).to(draw(st.sampled_from(DTYPES)))


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(batch=image_batches(lo=-3, hi=3), seed=seeds, offset=offsets, data=st.data(),
       out_dtype=st.sampled_from([None] + DTYPES))
def test_matches_reference(backend, batch, seed, offset, data, out_dtype):
    xt, layout = batch
    B = xt.shape[0]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x0 = make_layout((torch.rand(xt.shape, generator=g) * 2 - 1).to(data.draw(st.sampled_from([xt.dtype] + DTYPES))),
                     data.draw(st.sampled_from(LAYOUTS)))
    c1, c2 = data.draw(per_sample(B, g)), data.draw(per_sample(B, g))
    sigma = data.draw(st.sampled_from(["none", "sample", "element"]))
    if sigma == "sample":
        sigma = data.draw(per_sample(B, g, 0.0, 1.5))
    elif sigma == "element":
        sigma = make_layout(torch.rand(xt.shape, generator=g).to(data.draw(st.sampled_from(DTYPES))),
                            data.draw(st.sampled_from(LAYOUTS)))
    else:
        sigma = None
    shift = None
    if data.draw(st.booleans()):
        shift = make_layout(torch.randn(xt.shape, generator=g).to(data.draw(st.sampled_from(DTYPES))),
                            data.draw(st.sampled_from(LAYOUTS)))
    got = dk.reverse_step(x0, xt, c1, c2, sigma, shift, seed=seed, offset=offset, out_dtype=out_dtype,
                          backend=backend)
    want = dk.reverse_step(x0, xt, c1, c2, sigma, shift, seed=seed, offset=offset, out_dtype=out_dtype,
                           backend="reference")
    assert_matches(got, want, mag=magnitude(x0, xt, c1, c2, sigma, shift, seed, offset))
    assert got.dtype == (out_dtype or xt.dtype)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=5), seed=seeds, offset=offsets,
       noise=st.sampled_from(["none", "sample", "element"]))
def test_any_rank(backend, shape, seed, offset, noise):
    g = torch.Generator().manual_seed(len(shape))
    x0, xt, sh = (torch.randn(shape, generator=g) for _ in range(3))
    c2 = torch.rand(shape[0], generator=g)
    sigma = {"none": None, "sample": torch.rand(shape[0], generator=g),
             "element": torch.rand(shape, generator=g)}[noise]
    got = dk.reverse_step(x0, xt, 0.5, c2, sigma, sh, seed=seed, offset=offset, backend=backend)
    want = reference.reverse_step(x0, xt, 0.5, c2, sigma, sh, seed, offset)
    assert_matches(got, want, mag=magnitude(x0, xt, 0.5, c2, sigma, sh, seed, offset))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_dtype_and_layout(backend, dtype, layout):
    """The grid the hypothesis test samples from, each cell once, on planes past one CPU chunk (512 elements) and
    one Philox counter's tail: per-sample coefficients, per-element sigma, shift, against the specification."""
    g = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + LAYOUTS.index(layout))
    for shape in [(2, 3, 17, 41), (3, 2, 5, 7)]:
        x0, xt, sigma, shift = (make_layout(torch.randn(shape, generator=g).to(dtype), layout) for _ in range(4))
        c1, c2 = torch.rand(shape[0], generator=g), torch.rand(shape[0], generator=g) - 0.5
        for s in (None, 0.25, sigma.abs()):
            got = dk.reverse_step(x0, xt, c1, c2, s, shift, seed=11, offset=2**32 - 3, backend=backend)
            want = reference.reverse_step(x0, xt, c1, c2, s, shift, 11, 2**32 - 3)
            assert_matches(got, want, mag=magnitude(x0, xt, c1, c2, s, shift, 11, 2**32 - 3))
            if layout == "channels_last":
                assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 1, 5, 7), (5,)])
def test_the_noise_is_philox_normal(backend, shape):
    """With c1 = c2 = 0 and sigma = 1 the step is its noise alone: exactly dk.philox_normal(shape, seed, offset) of the
    same backend (the noise contract: flat index i takes lane i % 4 of counter offset + i // 4)."""
    zero = torch.zeros(shape)
    for seed, offset in ((3, 0), (2**64 - 1, 2**32 - 1), (-5, 2**64 - 2)):
        z = dk.reverse_step(zero, zero, 0.0, 0.0, 1.0, seed=seed, offset=offset, backend=backend)
        assert torch.equal(z, dk.philox_normal(shape, seed, offset, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_formula(backend):
    """The documented update, term by term, in float64."""
    g = torch.Generator().manual_seed(1)
    x0, xt, sigma, shift = (torch.randn(3, 2, 6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    c1, c2 = torch.rand(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    z = dk.philox_normal(xt.shape, 9, 4, dtype=torch.float64)
    got = dk.reverse_step(x0, xt, c1, c2, sigma, shift, seed=9, offset=4, backend=backend)
    want = c1.view(3, 1, 1, 1) * x0 + c2.view(3, 1, 1, 1) * xt + sigma * z + shift
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plain = dk.reverse_step(x0, xt, 0.3, -1.5, backend=backend)
    torch.testing.assert_close(plain, 0.3 * x0 - 1.5 * xt, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_seeds(backend):
    x = torch.rand(2, 3, 9, 9)
    a = dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=5, backend=backend)
    assert torch.equal(a, dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=5, backend=backend))
    assert not torch.equal(a, dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=6, backend=backend))
    assert not torch.equal(a, dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=5, offset=1, backend=backend))
    # one 64-bit value, whatever its spelling (section 4's seed rule)
    assert torch.equal(dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=-1, backend=backend),
                       dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=2**64 - 1, backend=backend))
    assert torch.equal(dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=torch.tensor(-1), backend=backend),
                       dk.reverse_step(x, x, 0.5, 0.5, 0.2, seed=2**64 - 1, backend=backend))
    torch.manual_seed(3)
    b = dk.reverse_step(x, x, 0.5, 0.5, 0.2, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(b, dk.reverse_step(x, x, 0.5, 0.5, 0.2, backend=backend))
    assert not torch.equal(b, dk.reverse_step(x, x, 0.5, 0.5, 0.2, backend=backend))
    # without noise, seed=None draws nothing from torch's generator
    torch.manual_seed(4)
    dk.reverse_step(x, x, 0.5, 0.5, backend=backend)
    after = torch.rand(1)
    torch.manual_seed(4)
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_nan_propagates(backend):
    x0, xt = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    x0[0, 0, 1, 2] = float("nan")
    out = dk.reverse_step(x0, xt, 0.5, 0.5, 0.1, seed=1, backend=backend)
    assert torch.isnan(out[0, 0, 1, 2]) and torch.isnan(out).sum() == 1


def _grad_inputs(per_sample_sigma):
    g = torch.Generator().manual_seed(0)
    x0, xt, shift = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    c1, c2 = (torch.rand(2, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    sigma = torch.rand(2 if per_sample_sigma else (2, 3, 4, 5), generator=g, dtype=torch.float64).requires_grad_()
    return x0, xt, c1, c2, sigma, shift


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
@pytest.mark.parametrize("per_sample_sigma", [False, True], ids=["sigma_per_element", "sigma_per_sample"])
def test_gradcheck(backend, per_sample_sigma):
    inputs = _grad_inputs(per_sample_sigma)

    def f(x0, xt, c1, c2, sigma, shift):
        return dk.reverse_step(x0, xt, c1, c2, sigma, shift, seed=7, offset=3, backend=backend)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(lambda x0, xt: dk.reverse_step(x0, xt, 0.3, 0.6, 0.5, seed=2, backend=backend),
                                    inputs[:2])


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_equals_reference_autograd(backend, dtype):
    x0, xt, c1, c2, sigma, shift = (v.detach().to(dtype if v.dim() > 1 else torch.float32).requires_grad_()
                                    for v in _grad_inputs(False))
    g = torch.randn(2, 3, 4, 5, dtype=dtype)
    args = (x0, xt, c1, c2, sigma, shift)
    got = torch.autograd.grad(dk.reverse_step(*args, seed=4, backend=backend), args, g)
    want = torch.autograd.grad(dk.reverse_step(*args, seed=4, backend="reference"), args, g)
    for a, w, v in zip(got, want, args):
        assert a.dtype == v.dtype
        assert_matches(a, w, atol32=1e-4)


def test_meta_inputs_give_meta_outputs():
    x = torch.empty(2, 3, 8, 8, device="meta", dtype=torch.bfloat16)
    for sigma in (None, 0.5, x):
        y = dk.reverse_step(x, x, 0.5, torch.ones(2, device="meta"), sigma, x, seed=1)
        assert y.is_meta and y.shape == x.shape and y.dtype == torch.bfloat16


@pytest.mark.parametrize("call, err, match", [
    (lambda x: dk.reverse_step(x, x[:1], 1.0, 1.0), ValueError, "x0_hat must have x_t's shape"),
    (lambda x: dk.reverse_step(x.numpy(), x, 1.0, 1.0), TypeError, "x0_hat must be a torch.Tensor"),
    (lambda x: dk.reverse_step(x, x.int(), 1.0, 1.0), TypeError, "x_t has unsupported dtype"),
    (lambda x: dk.reverse_step(x, x, torch.ones(3), 1.0), ValueError, "c1 must be"),
    (lambda x: dk.reverse_step(x, x, 1.0, torch.ones(2, 3, 1, 1)), ValueError, "c2 must be"),
    (lambda x: dk.reverse_step(x, x, 1.0, "a"), TypeError, "c2 must be a number"),
    (lambda x: dk.reverse_step(x, x, 1.0, torch.ones(2, dtype=torch.int64)), TypeError, "c2 must be a floating"),
    (lambda x: dk.reverse_step(x, x, 1.0, 1.0, torch.ones(2, 3, 4, 4)), ValueError, "sigma must be"),
    (lambda x: dk.reverse_step(x, x, 1.0, 1.0, None, torch.ones(3, 5)), ValueError, "shift must be"),
    (lambda x: dk.reverse_step(x, x, 1.0, 1.0, None, x.to("meta")), ValueError, "shift is on meta"),
    (lambda x: dk.reverse_step(x, x, 1.0, 1.0, 0.5, seed=1.5), TypeError, "seed must be an integer"),
    (lambda x: dk.reverse_step(x, x, 1.0, 1.0, 0.5, seed=2**64), ValueError, "seed must lie"),
    (lambda x: dk.reverse_step(x, x, 1.0, 1.0, out_dtype=torch.int32), TypeError, "out_dtype"),
])
def test_errors_name_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.rand(2, 3, 5, 5))


def test_broadcasting_sigma_and_shift():
    """sigma and shift may be any tensor that broadcasts to x_t's shape (a per-channel sigma, a shared shift)."""
    x = torch.rand(2, 3, 5, 5)
    sig, sh = torch.rand(1, 3, 1, 5), torch.rand(5)
    for backend in ["reference"] + CPU_FUSED:
        got = dk.reverse_step(x, x, 0.5, 0.25, sig, sh, seed=2, backend=backend)
        z = dk.philox_normal(x.shape, 2)
        torch.testing.assert_close(got, 0.5 * x + 0.25 * x + sig * z + sh, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the CUDA kernel (emulated without a GPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 3, 5, 7), (2, 1, 1, 2)])
def test_cuda_vector_and_tail_units(cuda_kernels, dtype, shape):
    """Whole 4-element units by vector loads and stores (dense aligned samples), units across samples and the last
    partial unit (5x7 planes), and inputs one element off alignment (element-wise access); every element
    written once (the emulation checks it)."""
    dev = cuda_kernels
    g = torch.Generator().manual_seed(sum(shape))
    base = [torch.randn(torch.Size(shape).numel() + 1, generator=g).to(dtype).to(dev) for _ in range(4)]
    for start in (0, 1):
        x0, xt, sigma, shift = (b[start:start + torch.Size(shape).numel()].view(shape) for b in base)
        c1 = torch.rand(shape[0], generator=g).to(dev)
        for s in (None, torch.rand(shape[0], generator=g).to(dev), sigma.abs()):
            for out_dtype in (None, torch.float32, torch.bfloat16):
                got = dk.reverse_step(x0, xt, c1, -0.5, s, shift, seed=3, offset=2**32 - 1, out_dtype=out_dtype,
                                      backend="cuda")
                want = reference.reverse_step(x0, xt, c1, -0.5, s, shift, 3, 2**32 - 1, out_dtype)
                assert_matches(got, want, mag=magnitude(x0.cpu(), xt.cpu(), c1.cpu(), -0.5,
                                                        s.cpu() if s is not None else None, shift.cpu(), 3,
                                                        2**32 - 1).to(dev))


# ------------------------------------------------------------------------------- on a GPU (-m cuda)
CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reverse_step_on_gpu(gpu_backend, dtype, layout):
    B, C = 4, 3
    x0, xt, sigma, shift = (make_layout(torch.randn(B, C, 24, 20, device=CUDA).to(dtype), layout) for _ in range(4))
    c1, c2 = torch.rand(B, device=CUDA), torch.rand(B, device=CUDA)
    for s in (None, torch.rand(B, device=CUDA), sigma.abs()):
        got = dk.reverse_step(x0, xt, c1, c2, s, shift, seed=5, offset=2**32 - 2, backend=gpu_backend)
        want = reference.reverse_step(x0, xt, c1, c2, s, shift, 5, 2**32 - 2)
        mag = magnitude(x0.cpu(), xt.cpu(), c1.cpu(), c2.cpu(), s.cpu() if s is not None else None, shift.cpu(), 5,
                        2**32 - 2)
        assert_matches(got, want, mag=mag.to(CUDA))
        if layout == "channels_last":
            assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
def test_gradients_on_gpu(gpu_backend):
    inputs = [v.detach().to(CUDA).requires_grad_() for v in _grad_inputs(False)]
    assert torch.autograd.gradcheck(
        lambda *a: dk.reverse_step(*a, seed=7, offset=3, backend=gpu_backend), tuple(inputs))
