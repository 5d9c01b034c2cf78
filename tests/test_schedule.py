import math

import numpy as np
import pytest
import torch

import diffaug_kernels as dk


def guided_diffusion_tables(kind, T):
    """guided-diffusion's get_named_beta_schedule + GaussianDiffusion.__init__, restated for the test."""
    if kind == "linear":
        scale = 1000 / T
        betas = np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    else:
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    ac = np.cumprod(1.0 - betas, axis=0)
    return dict(betas=betas, alphas_cumprod=ac, sqrt_alphas_cumprod=np.sqrt(ac),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac), sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_tables_equal_guided_diffusion(kind, T):
    s = getattr(dk.NoiseSchedule, kind)(T)
    assert s.num_timesteps == T == len(s)
    for name, want in guided_diffusion_tables(kind, T).items():
        got = getattr(s, name)
        assert got.dtype == torch.float64
        assert np.array_equal(got.numpy(), want), name  # exactly, not approximately


def test_known_values():
    s = dk.NoiseSchedule.linear(1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    c = dk.NoiseSchedule.cosine(1000)
    assert c.betas.max().item() == pytest.approx(0.999)


def test_from_betas_and_cached_device_copies():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    s = dk.NoiseSchedule.from_betas(betas)
    assert torch.equal(s.betas, betas)
    a = s.table("sqrt_alphas_cumprod", "cpu", torch.float32)
    assert a.dtype == torch.float32 and a is s.table("sqrt_alphas_cumprod", torch.device("cpu"))
    assert torch.equal(a, s.sqrt_alphas_cumprod.float())


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "score"])
def test_x0_coefficients_invert_forward_process(prediction):
    """x0 = A x_t + B out, for the model output each prediction type defines (exact in float64)."""
    s = dk.NoiseSchedule.cosine(1000)
    ab = s.alphas_cumprod
    x0, eps = 0.3, -1.7
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = {"eps": eps, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "x0": x0 + 0 * ab,
           "score": -eps / (1 - ab).sqrt()}[prediction]
    A, B = s.x0_coefficients(prediction, dtype=torch.float64)
    torch.testing.assert_close(A * xt + B * out, torch.full_like(ab, x0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("bad", [[], [[0.1]], [0.0, 0.1], [0.5, 1.5], [0.5, 1.0]])
def test_from_betas_rejects_bad_betas(bad):
    with pytest.raises(ValueError, match="betas"):
        dk.NoiseSchedule.from_betas(bad)


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T must"):
        dk.NoiseSchedule.linear(T)


def test_short_linear_schedule_says_why():
    """guided-diffusion's linear betas end at 20 / T: T = 20 would give beta = 1 (alpha_bar 0, infinite tables)."""
    with pytest.raises(ValueError, match="T >= 21"):
        dk.NoiseSchedule.linear(20)
    assert dk.NoiseSchedule.linear(21).betas.max() < 1


def test_betas_whose_alphas_cumprod_underflows_are_refused():
    """[0.999] * 200 drives alphas_cumprod to 1e-600, 0 in float64: tweedie would divide by it and give NaN."""
    with pytest.raises(ValueError, match=r"underflow.*t = 12\b.*fewer steps or smaller betas"):
        dk.NoiseSchedule.from_betas([0.999] * 200)  # 0.001**13 = 1e-39 is the first value below float32's range
    s = dk.NoiseSchedule.from_betas([0.999] * 12)  # 1e-36 at the end: every table finite in float32
    assert all(torch.isfinite(s.table(n)).all() for n in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))


@pytest.mark.parametrize("kwargs, msg", [(dict(s=-1), "offset s"), (dict(s=float("nan")), "offset s"),
                                         (dict(s="0.008"), "offset s"), (dict(max_beta=1.0), "max_beta"),
                                         (dict(max_beta=0), "max_beta")])
def test_bad_cosine_parameters_are_value_errors(kwargs, msg):
    """cosine(s=-1) divided by zero (a bare ZeroDivisionError); every bad value is a ValueError naming it."""
    with pytest.raises(ValueError, match=msg):
        dk.NoiseSchedule.cosine(1000, **kwargs)


def test_unpickled_schedule_finds_its_tables_in_a_fresh_registry(monkeypatch):
    """A schedule sent to another process (pickle, spawn workers) registers its tables there."""
    import pickle

    from diffaug_kernels import constants
    from diffaug_kernels import schedule as sm

    blob = pickle.dumps(dk.NoiseSchedule.cosine(50))
    monkeypatch.setattr(sm, "_NP_BY_DIGEST", {})  # what a fresh process holds
    monkeypatch.setattr(constants, "_KEYS", {})
    monkeypatch.setattr(constants, "STORE", constants.Store())
    s = pickle.loads(blob)
    torch.testing.assert_close(s.table("sqrt_alphas_cumprod"), s.sqrt_alphas_cumprod.float())


@pytest.mark.parametrize("context", ["inference_mode", "func.jvp"])
def test_tables_first_made_in_inference_mode_or_a_transform_are_plain(context):
    """The op constants (schedule tables, normalisation) are cached on first use: made inside inference_mode they
    could never be saved for a later backward ("Inference tensors cannot be saved for backward"), made inside a
    torch.func transform they would be cached as its wrapper. The constants are built in a neutral context, so
    neither happens."""
    betas = np.linspace(1e-4, 0.02, 100) * (1 + 0.01 * np.random.rand())  # a schedule no other test has cached
    S = dk.NoiseSchedule.from_betas(betas)
    norm = ((0.4, 0.5, 0.6), (0.2, 0.3, 0.1 + np.random.rand()))
    x, m = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    use = lambda x: dk.tweedie(dk.forward_noise(x, 7, S, seed=1), m, 7, S, normalize=norm)  # noqa: E731
    if context == "inference_mode":
        with torch.inference_mode():
            use(x)
    else:
        torch.func.jvp(use, (x,), (torch.ones_like(x),))
    for name in ("sqrt_alphas_cumprod", "sqrt_recip_alphas_cumprod"):
        tab = S.table(name, "cpu", torch.float32)
        assert not tab.is_inference() and not torch._C._functorch.is_functorch_wrapped_tensor(tab)
    xr = x.clone().requires_grad_()
    use(xr).sum().backward()  # saves the tables for backward
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
