"""tweedie: every fused backend against the reference, every prediction type, learned sigma, gradients."""
import pytest
import torch
from conftest import CPU_FUSED
from helpers import DTYPES, LAYOUTS, assert_matches, image_batches, make_layout, tweedie_magnitude
from hypothesis import given
from hypothesis import strategies as st

import diffaug_kernels as dk
from diffaug_kernels import reference

S = dk.NoiseSchedule.linear(1000)
PRED = ["eps", "v", "x0", "score"]


def magnitude(x, m, t, prediction, normalize, C):
    return tweedie_magnitude(S, x, m, t, prediction, normalize, C)


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(batch=image_batches(max_c=3, lo=-3, hi=3), data=st.data(), prediction=st.sampled_from(PRED),
       clip=st.booleans(), learned_sigma=st.booleans(), norm=st.booleans(),
       out_dtype=st.sampled_from([None] + DTYPES))
def test_matches_reference(backend, batch, data, prediction, clip, learned_sigma, norm, out_dtype):
    x, layout = batch
    B, C = x.shape[:2]
    t = torch.tensor(data.draw(st.lists(st.sampled_from([0, 999]) | st.integers(0, 999), min_size=B, max_size=B)))
    m_dtype = data.draw(st.sampled_from([x.dtype] + DTYPES))  # mixed precision: e.g. a bf16 UNet output
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    m = torch.randn(B, 2 * C if learned_sigma else C, *x.shape[2:], generator=g).to(m_dtype)
    m = make_layout(m, data.draw(st.sampled_from(LAYOUTS)))
    normalize = (torch.rand(C, generator=g).tolist(), (torch.rand(C, generator=g) + 0.1).tolist()) if norm else None
    got = dk.tweedie(x, m, t, S, prediction, clip, normalize, out_dtype, backend=backend)
    want = reference.tweedie(x, m, t, S, prediction, clip, normalize, out_dtype)
    assert_matches(got, want, mag=magnitude(x, m, t, prediction, normalize, C))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("prediction", PRED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "imagenet_norm"])
def test_every_prediction_dtype_and_normalisation(backend, prediction, dtype, norm):
    """The full grid the hypothesis test samples from, each cell run once: prediction x I/O dtype x
    normalisation, learned sigma (2C channels), on a plane the kernels vectorise and one they do not."""
    g = torch.Generator().manual_seed(100 * PRED.index(prediction) + 10 * DTYPES.index(dtype) + norm)
    for shape in [(2, 3, 5, 7), (2, 3, 17, 24)]:
        x = (torch.rand(shape, generator=g, dtype=torch.float64) * 6 - 3).to(dtype)
        m = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g, dtype=torch.float64).to(dtype)
        t = torch.randint(0, 1000, (shape[0],), generator=g)
        normalize = dk.IMAGENET_NORM if norm else None
        got = dk.tweedie(x, m, t, S, prediction, True, normalize, backend=backend)
        want = reference.tweedie(x, m, t, S, prediction, True, normalize)
        assert_matches(got, want, mag=magnitude(x, m, t, prediction, normalize, shape[1]))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
@pytest.mark.parametrize("prediction", PRED)
def test_recovers_x0_from_ideal_model(backend, prediction):
    """Given the exact model output for a known x0 and eps, x0_hat = x0 (the formula, not just agreement)."""
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 1.8 - 0.9
    eps = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 999])
    ab = S.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = {"eps": eps, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "x0": x0,
           "score": -eps / (1 - ab).sqrt()}[prediction]
    got = dk.tweedie(xt, torch.cat([out, torch.full_like(out, 1e6)], 1), t, S, prediction, backend=backend)
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_normalize_is_imagenet_preprocessing(backend):
    xt, m = torch.randn(2, 3, 5, 5), torch.randn(2, 6, 5, 5)
    plain = dk.tweedie(xt, m, 300, S, backend=backend)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in dk.IMAGENET_NORM)
    got = dk.tweedie(xt, m, 300, S, normalize=dk.IMAGENET_NORM, backend=backend)
    torch.testing.assert_close(got, ((plain + 1) / 2 - mean) / std, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_learned_sigma_half_is_not_read(backend):
    xt, m = torch.randn(2, 3, 7, 7), torch.randn(2, 6, 7, 7)
    m2 = m.clone()
    m2[:, 3:] = float("nan")
    assert torch.equal(dk.tweedie(xt, m, 50, S, backend=backend), dk.tweedie(xt, m2, 50, S, backend=backend))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_nan_propagates(backend):
    xt, m = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    xt[0, 0, 1, 2] = float("nan")
    out = dk.tweedie(xt, m, 5, S, clip=True, backend=backend)
    assert torch.isnan(out[0, 0, 1, 2]) and torch.isnan(out).sum() == 1


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("prediction", PRED)
@pytest.mark.parametrize("clip", [False, True])
def test_gradcheck(backend, prediction, clip):
    g = torch.Generator().manual_seed(0)
    xt = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    m = (torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    t = torch.tensor([20, 300])
    f = lambda xt, m: dk.tweedie(xt, m, t, S, prediction, clip, dk.IMAGENET_NORM, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (xt, m))
    if clip and prediction != "x0":  # the clamp is active somewhere, so the zero-gradient branch is exercised
        ref = reference.tweedie(xt, m, t, S, prediction, False)
        assert (ref.abs() > 1.01).any() and (ref.abs() < 0.99).any()
    gx, gm = torch.autograd.grad(f(xt, m).sum(), (xt, m))
    assert torch.all(gm[:, 3:] == 0)  # the learned-sigma half gets no gradient


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_gradient_equals_reference_autograd_mixed_dtypes(backend):
    xt = torch.randn(2, 3, 6, 6).requires_grad_()
    m = torch.randn(2, 6, 6, 6, dtype=torch.bfloat16).requires_grad_()
    t = torch.tensor([5, 600])
    g = torch.randn(2, 3, 6, 6)
    got = torch.autograd.grad(dk.tweedie(xt, m, t, S, backend=backend), (xt, m), g)
    want = torch.autograd.grad(reference.tweedie(xt, m, t, S), (xt, m), g)
    assert got[1].dtype == torch.bfloat16
    assert_matches(got[0], want[0], atol32=1e-4)
    assert_matches(got[1], want[1], atol32=1e-4)


@pytest.mark.parametrize("backend", ["reference", *CPU_FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_gradient_is_zero_on_the_bounds(backend, dtype):
    """Where x0_hat lands exactly on -1 or 1 (a saturated x0 model, bf16 rounding) the clamp is active: no
    gradient, on every backend. (torch.clamp's own convention at the bounds changed between torch versions.)"""
    xt = torch.zeros(1, 1, 1, 6, dtype=dtype, requires_grad=True)
    m = torch.tensor([[[[1.0, -1.0, 0.5, 1.5, -0.25, float("nan")]]]], dtype=dtype, requires_grad=True)
    dk.tweedie(xt, m, 10, S, prediction="x0", clip=True, backend=backend).sum().backward()
    assert m.grad.flatten().tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # NaN: no gradient either
    # eps prediction: x0_hat = a x_t - b eps hits the bounds exactly where a x_t = +-1 + b eps
    a, b = (float(S.table(n, "cpu", torch.float64)[10]) for n in ("sqrt_recip_alphas_cumprod",
                                                                   "sqrt_recipm1_alphas_cumprod"))
    xt = torch.tensor([[[[1.0 / a, -1.0 / a, 0.1]]]], dtype=torch.float64, requires_grad=True)
    eps = torch.zeros(1, 1, 1, 3, dtype=torch.float64, requires_grad=True)
    y = dk.tweedie(xt, eps, 10, S, clip=True, backend=backend)
    assert y.detach().flatten().tolist()[:2] == [1.0, -1.0]
    inside = (y > -1) & (y < 1)
    y.sum().backward()
    assert torch.equal(xt.grad != 0, inside) and torch.equal(eps.grad != 0, inside) and b > 0


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_planes_match_reference(backend, layout, dtype):
    """Planes of 256+ elements (Triton's planar kernel), learned-sigma split, clip and normalise."""
    B, C = 2, 3
    x = make_layout(torch.randn(B, C, 17, 19).to(dtype), layout)
    m = make_layout(torch.randn(B, 2 * C, 17, 19).to(dtype), layout)
    t = torch.tensor([3, 870])
    for normalize, clip in ((None, False), (dk.IMAGENET_NORM, True)):
        got = dk.tweedie(x, m, t, S, "eps", clip, normalize, backend=backend)
        want = reference.tweedie(x, m, t, S, "eps", clip, normalize)
        assert_matches(got, want, mag=magnitude(x, m, t, "eps", normalize, C))


# ------------------------------------------------------------------------------- on a GPU (-m cuda)
# (Tests taking cuda_kernels run the CUDA backend on the GPU there, and emulated on a machine without one.)
CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "score"])
def test_tweedie_on_gpu(gpu_backend, dtype, layout, prediction):
    B, C = 4, 3
    x = make_layout(torch.randn(B, C, 24, 20, device=CUDA).to(dtype), layout)
    for learned_sigma in (False, True):
        m = make_layout(torch.randn(B, 2 * C if learned_sigma else C, 24, 20, device=CUDA).to(dtype), layout)
        t = torch.randint(0, 1000, (B,), device=CUDA)
        for normalize, clip in ((None, False), (dk.IMAGENET_NORM, True)):
            got = dk.tweedie(x, m, t, S, prediction, clip, normalize, backend=gpu_backend)
            want = reference.tweedie(x, m, t, S, prediction, clip, normalize)
            assert_matches(got, want, mag=magnitude(x.cpu(), m.cpu(), t.cpu(), prediction, normalize, C).to(CUDA))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (3, 3, 8, 32)])
def test_tweedie_planes_on_gpu(gpu_backend, dtype, shape):
    """Planes of several blocks each, and planes narrower than a block (the planar kernels' launch shapes)."""
    B, C = shape[:2]
    x = torch.randn(*shape, device=CUDA).to(dtype)
    m = torch.randn(B, 2 * C, *shape[2:], device=CUDA).to(dtype)
    t = torch.randint(0, 1000, (B,), device=CUDA)
    for out_dtype in (None, torch.float32, torch.bfloat16):
        got = dk.tweedie(x, m, t, S, "eps", True, dk.IMAGENET_NORM, out_dtype=out_dtype, backend=gpu_backend)
        want = reference.tweedie(x, m, t, S, "eps", True, dk.IMAGENET_NORM, out_dtype=out_dtype)
        assert_matches(got, want, mag=magnitude(x.cpu(), m.cpu(), t.cpu(), "eps", dk.IMAGENET_NORM, C).to(CUDA))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (2, 3, 56, 56)])
def test_tweedie_cuda_planar_block_sizes(cuda_kernels, dtype, shape):
    """The CUDA planar launch's block choice: 16-bit planes take 224 threads (224x224: 28 whole blocks per
    plane; 56x56: 2, the second part idle), float32 256 or 160, float64 224 at 56x56. Every element written,
    normalised or not."""
    B, C = shape[:2]
    x = torch.randn(*shape, device=cuda_kernels).to(dtype)
    m = torch.randn(B, 2 * C, *shape[2:], device=cuda_kernels).to(dtype)
    t = torch.randint(0, 1000, (B,), device=cuda_kernels)
    for norm in (None, dk.IMAGENET_NORM):
        got = dk.tweedie(x, m, t, S, "eps", True, norm, backend="cuda")
        want = reference.tweedie(x, m, t, S, "eps", True, norm)
        assert_matches(got, want, mag=magnitude(x.cpu(), m.cpu(), t.cpu(), "eps", norm, C).to(cuda_kernels))


@pytest.mark.parametrize("variant", ["1", "2", "4", "1l", "2l", "4l"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tweedie_cuda_planar_variants(cuda_kernels, monkeypatch, variant, dtype):
    """Every shape of the planar CUDA kernel (DIFFAUG_CUDA_TWEEDIE_UNITS: units per thread, block order) gives
    the reference, every element written: planes a whole number of blocks (224x224), with spare units in the
    last slice (56x56, 24x20) and narrower than a block (8x32); a mixed output dtype takes the basic shape."""
    monkeypatch.setenv("DIFFAUG_CUDA_TWEEDIE_UNITS", variant)
    for shape in ((2, 3, 224, 224), (2, 3, 56, 56), (3, 3, 24, 20), (3, 3, 8, 32)):
        B, C = shape[:2]
        x = torch.randn(*shape, device=cuda_kernels).to(dtype)
        m = torch.randn(B, 2 * C, *shape[2:], device=cuda_kernels).to(dtype)
        t = torch.randint(0, 1000, (B,), device=cuda_kernels)
        for norm, out_dtype in ((None, None), (dk.IMAGENET_NORM, None), (dk.IMAGENET_NORM, torch.float32)):
            got = dk.tweedie(x, m, t, S, "eps", True, norm, out_dtype=out_dtype, backend="cuda")
            want = reference.tweedie(x, m, t, S, "eps", True, norm, out_dtype=out_dtype)
            assert_matches(got, want, mag=magnitude(x.cpu(), m.cpu(), t.cpu(), "eps", norm, C).to(cuda_kernels))


def test_tweedie_cuda_variant_setting_is_checked(cuda_kernels, monkeypatch):
    monkeypatch.setenv("DIFFAUG_CUDA_TWEEDIE_UNITS", "3l")
    x = torch.randn(2, 3, 32, 32, device=cuda_kernels)
    with pytest.raises(RuntimeError, match="DIFFAUG_CUDA_TWEEDIE_UNITS must be 1, 2 or 4"):
        dk.tweedie(x, torch.randn_like(x), torch.tensor([1, 2], device=cuda_kernels), S, backend="cuda")


@pytest.mark.cuda
def test_gradients_on_gpu(gpu_backend):
    x = (torch.rand(2, 3, 8, 8, device=CUDA, dtype=torch.float64) * 2 - 1).requires_grad_()
    m = torch.randn(2, 6, 8, 8, device=CUDA, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([5, 600], device=CUDA)
    assert torch.autograd.gradcheck(lambda x: dk.forward_noise_multi(x, [1, 500], S, seed=3, backend=gpu_backend), (x,))
    assert torch.autograd.gradcheck(lambda x, m: dk.tweedie(x, m, t, S, backend=gpu_backend), (x, m))
