"""DDA / DDA-SE (dk.dda): respacing, the low-pass filter, the guided sampler and the self-ensemble.

The guidance is checked with an analytic model whose x0-prediction is exact for a Gaussian data distribution
centred on an image mu that is NOT the input: unguided sampling drifts to mu, and DDA's low-pass guidance must
keep the input's coarse structure. A tiny random ADM UNet checks the real model path (learned sigma, 2C
output channels, gradients through the network)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import diffaug_kernels as dk
from diffaug_kernels import dda


@pytest.fixture(scope="module")
def sched():
    return dk.NoiseSchedule.linear(1000)


class GaussianOracle:
    """The exact eps-prediction for data ~ N(mu, s2 I) under `schedule`: E[x0 | x_t] is linear in x_t, so the
    x0-prediction depends on x_t (the guidance gradient through it is non-zero) and pulls towards mu.
    var: None -> C output channels; a number -> 2C channels, the second half that constant (learned sigma)."""

    def __init__(self, mu, schedule, s2=1.0, var=None):
        self.mu, self.ac, self.s2, self.var = mu, schedule.alphas_cumprod, s2, var
        self.calls, self.inputs = [], []

    def __call__(self, x_t, t):
        self.calls.append(t.clone())
        self.inputs.append(x_t.detach().clone())
        ab = self.ac.to(x_t.dtype)[t].view(-1, 1, 1, 1)
        gain = ab.sqrt() * self.s2 / (ab * self.s2 + 1 - ab)
        x0 = self.mu.to(x_t.dtype) + gain * (x_t - ab.sqrt() * self.mu.to(x_t.dtype))
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.var is not None:
            eps = torch.cat([eps, torch.full_like(eps, self.var)], 1)
        return eps


def _images(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.6 - 0.8


def _lp_err(a, b, factor=4):
    return (dda.low_pass(a, factor) - dda.low_pass(b, factor)).flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return dk.models.create_adm_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                     attention_resolutions="", learn_sigma=True).eval()


# --------------------------------------------------------------------------------------------- respacing
def test_respaced_schedule_keeps_base_alphas_cumprod(sched):
    spaced, tmap = dda.respace(sched, 100)
    assert spaced.num_timesteps == 100 and tmap.dtype == torch.int64
    kept = tmap.tolist()
    assert kept == sorted(set(kept)) and kept[0] == 0 and kept[-1] == 999
    assert kept[:7] == [0, 10, 20, 30, 40, 50, 61]  # guided-diffusion's stride 999/99, accumulated and rounded
    assert kept[50] == 505 and kept[49] == 494  # DDA's N=50: noised to t=505, first denoised at t=494 (index 49)
    torch.testing.assert_close(spaced.alphas_cumprod, sched.alphas_cumprod[tmap], rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps, expect", [("ddim50", list(range(0, 1000, 20))), ("1000", list(range(1000))),
                                           (None, list(range(1000))), ([1, 1], [0, 500])])
def test_space_timesteps_forms(sched, steps, expect):
    spaced, tmap = dda.respace(sched, steps)
    assert tmap.tolist() == expect
    torch.testing.assert_close(spaced.alphas_cumprod, sched.alphas_cumprod[tmap], rtol=1e-12, atol=0)


def test_space_timesteps_sections():
    kept = dda.space_timesteps(1000, "10,15,20")
    assert len(kept) == 45 and kept[0] == 0 and 333 in kept and 334 in kept and kept[-1] == 999
    assert dda.space_timesteps(10, 10) == list(range(10))


@pytest.mark.parametrize("steps", [1001, 0, "ddim999", "abc", 2.5, [3, -1]])
def test_bad_respacing(sched, steps):
    with pytest.raises((ValueError, TypeError)):
        dda.respace(sched, steps)


# ---------------------------------------------------------------------------------------------- low-pass
def test_low_pass_is_antialiased_bicubic_inside():
    x = _images((2, 3, 64, 64), 0).double()
    got = dda.low_pass(x, 4)
    ref = F.interpolate(F.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True),
                        scale_factor=4, mode="bicubic", antialias=True)
    m = 16  # away from the border, where DDA's resizer zero-pads and torch renormalises
    torch.testing.assert_close(got[..., m:-m, m:-m], ref[..., m:-m, m:-m], rtol=0, atol=1e-12)
    assert got.shape == x.shape and got.dtype == x.dtype


def test_low_pass_border_zero_padding_and_constants():
    c = torch.ones(1, 1, 64, 64)
    out = dda.low_pass(c, 4)
    torch.testing.assert_close(out[..., 16:-16, 16:-16], torch.ones(1, 1, 32, 32), rtol=0, atol=1e-6)
    assert out[0, 0, 0, 32] < 0.7 and out[0, 0, 32, 0] < 0.7  # ResizeRight pads with zeros (DDA's resizer)


def test_low_pass_removes_high_frequencies_and_is_linear():
    x = _images((1, 3, 64, 64), 1)
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1).float().expand(1, 3, 64, 64)
    assert dda.low_pass(checker, 4)[..., 16:-16, 16:-16].abs().max() < 1e-5
    torch.testing.assert_close(dda.low_pass(2 * x + checker, 4), 2 * dda.low_pass(x, 4) + dda.low_pass(checker, 4),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(dda.low_pass(x, 1), x, rtol=0, atol=0)
    assert dda.low_pass(x.bfloat16(), 2).dtype == torch.bfloat16


def test_low_pass_errors():
    x = torch.zeros(1, 3, 8, 8)
    for bad in (0, -2, 2.0, 16):
        with pytest.raises(ValueError):
            dda.low_pass(x, bad)
    with pytest.raises(TypeError):
        dda.low_pass(x.long(), 2)
    with pytest.raises(ValueError):
        dda.low_pass(torch.zeros(8), 2)


# ------------------------------------------------------------------------------------------------- adapt
def test_guidance_keeps_the_inputs_low_pass_content(sched):
    x = _images((2, 3, 16, 16), 2)
    mu = -x.flip(-1)  # the model's data mean: far from x
    oracle = GaussianOracle(mu, sched)
    kw = dict(seed=5, steps=100, depth=50, down_factor=4)
    unguided = dda.adapt(oracle, sched, x, guidance_scale=0.0, **kw)
    guided = dda.adapt(oracle, sched, x, guidance_scale=1.0, **kw)  # w=6 is tuned for 3x256x256 inputs
    e_unguided, e_guided = _lp_err(unguided, x), _lp_err(guided, x)
    assert (_lp_err(mu, x) > 2.0).all()
    assert (e_unguided > 0.8 * _lp_err(mu, x)).all()  # unguided DDPM forgets the input's coarse structure
    assert (e_guided < 0.2 * e_unguided).all(), (e_guided, e_unguided)
    # no guidance below range_t: guiding only the first half of the steps keeps less than guiding all of them
    half = dda.adapt(oracle, sched, x, guidance_scale=1.0, range_t=25, **kw)
    assert (_lp_err(half, x) > e_guided).all()


def test_sampler_calls_and_noise_level(sched):
    x = _images((1, 3, 8, 8), 3)
    oracle = GaussianOracle(x, sched)
    dda.adapt(oracle, sched, x, seed=1, guidance_scale=0.0)
    _, tmap = dda.respace(sched, 100)
    ts = [int(t[0]) for t in oracle.calls]
    assert ts == tmap[:50].flip(0).tolist()  # respaced indices 49..0 mapped back to the original t: 494 .. 0
    assert all(t.dtype == torch.int64 and t.shape == (1,) for t in oracle.calls)
    # x_N = q_sample(x, N) at respaced index N = 50 (t = 505), one respaced step above the first denoising step,
    # exactly as DDA's p_sample_loop_progressive; the noise is dk.forward_noise's for the seed
    torch.testing.assert_close(oracle.inputs[0], dk.forward_noise(x, 505, sched, seed=1), rtol=0, atol=0)


def test_oracle_with_its_own_data_is_nearly_a_fixed_point(sched):
    """A model whose data distribution is concentrated at x (s2 -> 0) brings x back, guided or not: the
    posterior means remove all the noise the forward step and the reverse steps added."""
    x = _images((2, 3, 16, 16), 4)
    for w in (0.0, 6.0):
        out = dda.adapt(GaussianOracle(x, sched, s2=1e-6), sched, x, seed=2, guidance_scale=w)
        assert (out - x).abs().max() < 0.01, w


def test_reverse_step_variances_bracket_the_exact_spread(sched):
    """For data ~ N(0, s2 I) the adapted images should spread with std ~ sqrt(s2). With 100 respaced steps
    DDPM overshoots with the large variance (beta_t, learned v = +1 or FIXED_LARGE) and undershoots with the
    posterior variance (v = -1): the two must bracket sqrt(s2), each within 25%."""
    x = _images((1, 3, 64, 64), 11)
    s2 = 0.01
    std = {}
    for v in (-1.0, 1.0):
        out = dda.adapt(GaussianOracle(torch.zeros_like(x), sched, s2=s2, var=v), sched, x, seed=3, guidance_scale=0.0)
        assert abs(out.mean()) < 0.01
        std[v] = out.std().item()
    assert 0.75 * math.sqrt(s2) < std[-1.0] < math.sqrt(s2) < std[1.0] < 1.25 * math.sqrt(s2), std


def test_learned_sigma_variants(sched):
    x = _images((2, 3, 8, 8), 5)
    mu = torch.zeros_like(x)
    kw = dict(seed=3, steps=20, depth=10, guidance_scale=0.5, down_factor=2)
    fixed = dda.adapt(GaussianOracle(mu, sched), sched, x, **kw)
    # v = +1 selects log(beta_t): guided-diffusion's FIXED_LARGE for t >= 1, i.e. the C-channel default
    learned_hi = dda.adapt(GaussianOracle(mu, sched, var=1.0), sched, x, **kw)
    torch.testing.assert_close(learned_hi, fixed, rtol=0, atol=1e-5)
    # learned_sigma=False ignores the second half
    torch.testing.assert_close(dda.adapt(GaussianOracle(mu, sched, var=-1.0), sched, x, learned_sigma=False, **kw),
                               fixed, rtol=0, atol=0)
    # v = -1 selects the posterior variance (smaller): a different sample
    learned_lo = dda.adapt(GaussianOracle(mu, sched, var=-1.0), sched, x, **kw)
    assert (learned_lo - fixed).abs().max() > 1e-3
    with pytest.raises(ValueError, match="learned_sigma=True"):
        dda.adapt(GaussianOracle(mu, sched), sched, x, learned_sigma=True, **kw)


def test_guidance_norm_sample_vs_batch(sched):
    x = _images((3, 3, 8, 8), 6)
    oracle = GaussianOracle(-x, sched)
    kw = dict(seed=4, steps=20, depth=10, guidance_scale=0.5, down_factor=2)
    per_image = dda.adapt(oracle, sched, x, **kw)
    first = GaussianOracle(-x[:1], sched)
    # one norm per image: an image's result does not depend on the images after it in the batch
    torch.testing.assert_close(dda.adapt(first, sched, x[:1], **kw), per_image[:1], rtol=0, atol=1e-6)
    # one norm over the batch (the official code): identical for a single image, weaker guidance for several
    torch.testing.assert_close(dda.adapt(first, sched, x[:1], guidance_norm="batch", **kw), per_image[:1],
                               rtol=0, atol=1e-6)
    batch = dda.adapt(oracle, sched, x, guidance_norm="batch", **kw)
    assert (batch - per_image).abs().max() > 1e-3
    assert (_lp_err(batch, x) > _lp_err(per_image, x)).all()


def test_unet_shape_dtype_range_and_determinism(sched, tiny_unet):
    x = _images((2, 3, 16, 16), 7)
    kw = dict(steps=20, depth=10)
    # the parameters require grad and start without .grad, so a guidance gradient taken with .backward()
    # (instead of autograd.grad w.r.t. x_t alone) would leave .grad on them: checked at the end
    tiny_unet.zero_grad(set_to_none=True)
    assert all(p.requires_grad for p in tiny_unet.parameters())
    a = dda.adapt(tiny_unet, sched, x, seed=9, **kw)
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= -1 and a.max() <= 1
    assert torch.isfinite(a).all()
    torch.testing.assert_close(dda.adapt(tiny_unet, sched, x, seed=9, **kw), a, rtol=0, atol=0)
    assert (dda.adapt(tiny_unet, sched, x, seed=10, **kw) - a).abs().max() > 1e-3
    torch.manual_seed(123)
    b = dda.adapt(tiny_unet, sched, x, **kw)
    torch.manual_seed(123)
    torch.testing.assert_close(dda.adapt(tiny_unet, sched, x, **kw), b, rtol=0, atol=0)
    # guidance flows through the network (its gradient changes the result) but not into its parameters
    assert (dda.adapt(tiny_unet, sched, x, seed=9, guidance_scale=0.0, **kw) - a).abs().max() > 1e-4
    assert all(p.grad is None for p in tiny_unet.parameters())
    assert all(p.requires_grad for p in tiny_unet.parameters())  # left as found
    assert not a.requires_grad


def test_guidance_works_under_inference_mode(sched, tiny_unet):
    x = _images((1, 3, 16, 16), 12)
    kw = dict(seed=1, steps=10, depth=3)
    expect = dda.adapt(tiny_unet, sched, x, **kw)
    with torch.inference_mode():
        got = dda.adapt(tiny_unet, sched, x.clone(), **kw)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_unet_default_settings_and_dtypes(sched, tiny_unet):
    x = _images((1, 3, 16, 16), 8)
    out = dda.adapt(tiny_unet, sched, x, seed=1)  # the published defaults: 100 steps, N=50, D=4, w=6
    assert out.shape == x.shape and torch.isfinite(out).all()
    out64 = dda.adapt(tiny_unet, sched, x.double(), seed=1, steps=10, depth=3)
    assert out64.dtype == torch.float64
    assert dda.adapt(tiny_unet, sched, x.bfloat16(), seed=1, steps=10, depth=3).dtype == torch.bfloat16


def test_diffaug_module_is_accepted(sched):
    x = _images((2, 3, 8, 8), 9)
    oracle = GaussianOracle(-x, sched)
    kw = dict(seed=4, steps=20, depth=10, guidance_scale=0.5, down_factor=2)
    torch.testing.assert_close(dda.adapt(dk.DiffAug(oracle, sched), sched, x, **kw), dda.adapt(oracle, sched, x, **kw),
                               rtol=0, atol=0)


def test_model_kwargs_reach_the_model(sched):
    seen = {}

    def model(x_t, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x_t)

    y = torch.tensor([3, 1])
    dda.adapt(model, sched, torch.zeros(2, 1, 4, 4), steps=10, depth=2, down_factor=2, seed=0,
              model_kwargs={"y": y})
    assert seen["y"] is y


@pytest.mark.parametrize("kwargs, err", [
    (dict(depth=0), ValueError), (dict(depth=100), ValueError), (dict(depth=2.5), TypeError),
    (dict(steps=1), ValueError), (dict(steps=2000), ValueError),
    (dict(range_t=-1), ValueError), (dict(range_t=51), ValueError),
    (dict(down_factor=0), ValueError), (dict(down_factor=32), ValueError),
    (dict(guidance_scale=-1.0), ValueError), (dict(guidance_scale=float("nan")), ValueError),
    (dict(guidance_norm="pixel"), ValueError), (dict(learned_sigma="yes"), TypeError),
    (dict(prediction="eps2"), ValueError), (dict(seed=-1), TypeError), (dict(seed=1.5), TypeError),
    (dict(model_kwargs=[1]), TypeError), (dict(clip=1), TypeError),
])
def test_bad_arguments(sched, kwargs, err):
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(err):
        dda.adapt(GaussianOracle(x, sched), sched, x, **kwargs)


def test_bad_inputs(sched):
    x = torch.zeros(1, 3, 8, 8)
    oracle = GaussianOracle(x, sched)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        dda.adapt(oracle, sched, x[0])
    with pytest.raises(TypeError, match="dtype"):
        dda.adapt(oracle, sched, x.long())
    with pytest.raises(TypeError, match="NoiseSchedule"):
        dda.adapt(oracle, "linear", x)
    with pytest.raises(TypeError, match="callable"):
        dda.adapt(None, sched, x)
    with pytest.raises(ValueError, match="model output"):
        dda.adapt(lambda v, t: v[:, :2], sched, x, steps=10, depth=2, down_factor=2)
    with pytest.raises(TypeError, match="tensor"):
        dda.adapt(lambda v, t: v.detach().numpy(), sched, x, steps=10, depth=2, down_factor=2)


# ------------------------------------------------------------------------------------------------ DDA-SE
def _classifier():
    torch.manual_seed(1)
    head = torch.nn.Linear(3 * 8 * 8, 5)
    return lambda v: head(v.flatten(1))


def test_dda_se_is_the_mean_of_the_two_softmaxes(sched):
    x = _images((3, 3, 8, 8), 10)
    oracle = GaussianOracle(-x, sched)
    clf = _classifier()
    pre = lambda v: (v + 1) / 2  # noqa: E731
    kw = dict(seed=7, steps=20, depth=10, guidance_scale=0.5, down_factor=2)
    adapted = dda.adapt(oracle, sched, x, **kw)
    p_adapted = torch.softmax(clf(pre(adapted)), -1)
    p_original = torch.softmax(clf(pre(x)), -1)
    dda_p = dda.dda_predict(clf, oracle, sched, x, preprocess=pre, **kw)
    torch.testing.assert_close(dda_p, p_adapted, rtol=0, atol=1e-6)
    se = dda.dda_se_predict(clf, oracle, sched, x, preprocess=pre, **kw)
    torch.testing.assert_close(se, 0.5 * (p_adapted + p_original), rtol=0, atol=1e-6)
    torch.testing.assert_close(se.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    mean, pa, po = dda.dda_se_predict(clf, oracle, sched, x, preprocess=pre, return_components=True, **kw)
    torch.testing.assert_close(mean, se, rtol=0, atol=0)
    torch.testing.assert_close(pa, dda_p, rtol=0, atol=0)
    torch.testing.assert_close(po, p_original, rtol=0, atol=1e-6)
    assert not se.requires_grad


def test_models_run_in_eval_mode_and_get_their_modes_back(sched, tiny_unet):
    """The score model (dropout) and the classifier (batch norm) run in eval mode: the same prediction as after
    .eval(), no batch-norm statistics moved, and each module's own mode back afterwards."""
    x = _images((2, 3, 16, 16), 3)
    torch.manual_seed(2)
    clf = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 14 * 14, 5))
    unet = copy.deepcopy(tiny_unet)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.05)  # ADM zero-inits it: the output would ignore dropout
    for m in unet.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # a mode-dependent score model
    kw = dict(seed=5, steps=10, depth=3, guidance_scale=1.0)
    want = dda.dda_se_predict(clf.eval(), unet.eval(), sched, x, **kw)
    clf.train()
    unet.train()
    unet.out.eval()  # a submodule in its own mode
    stats = clf[1].running_mean.clone()
    got = dda.dda_se_predict(clf, unet, sched, x, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(clf[1].running_mean, stats)
    assert clf.training and clf[1].training and unet.training and not unet.out.training


def test_progress_is_called_after_every_reverse_step(sched):
    x = _images((1, 3, 8, 8), 4)
    seen = []
    dda.adapt(GaussianOracle(-x, sched), sched, x, steps=20, depth=5, guidance_scale=0.5, down_factor=2, seed=1,
              progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_dda_predict_errors(sched):
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(TypeError, match="classifier"):
        dda.dda_predict(None, GaussianOracle(x, sched), sched, x)
    with pytest.raises(TypeError, match="preprocess"):
        dda.dda_se_predict(_classifier(), GaussianOracle(x, sched), sched, x, preprocess=3)
    with pytest.raises(TypeError):
        dda.dda_predict(_classifier(), GaussianOracle(x, sched), sched, x, not_an_option=1)


def test_published_defaults_are_the_function_defaults():
    import inspect

    params = inspect.signature(dda.adapt).parameters
    for name, value in dda.DDA_DEFAULTS.items():
        assert params[name].default == value, name
    assert dda.DDA_DEFAULTS == dict(steps=100, depth=50, down_factor=4, guidance_scale=6.0, range_t=0)
    assert math.isclose(dda.respace(dk.NoiseSchedule.linear(1000), 100)[1][50].item(), 505)
