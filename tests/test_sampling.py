"""dk.sampling: respacing, DDIM and DDPM with classifier guidance, against references written here in float64
from the DDIM / DDPM equations (and guided-diffusion's condition_score / condition_mean rules).

The models are analytic: the exact eps-prediction for data ~ N(mu, s2 I) (plus a learned-variance half when
asked), and a linear classifier whose log-softmax gradient the references take in closed form."""
import math

import numpy as np
import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels import sampling

T = 1000
# guided-diffusion's linear schedule, computed here independently of dk.NoiseSchedule
BASE_AC = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


@pytest.fixture(scope="module")
def sched():
    return dk.NoiseSchedule.linear(T)


class Oracle:
    """eps(x_t, t) = the exact eps-prediction for data ~ N(mu, s2 I) under the base schedule (t original);
    learned=True appends C channels v = tanh(x_t) / 2 in [-1, 1] (a learned-range variance). Records its t."""

    def __init__(self, mu, s2=0.6, learned=False, as_prediction="eps"):
        self.mu, self.s2, self.learned, self.as_prediction = mu, s2, learned, as_prediction
        self.ts = []

    def __call__(self, x, t, y=None):
        self.ts.append(t.clone())
        ab = torch.as_tensor(BASE_AC, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        mu = self.mu.to(x.dtype)
        x0 = mu + ab.sqrt() * self.s2 / (ab * self.s2 + 1 - ab) * (x - ab.sqrt() * mu)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.as_prediction]
        return torch.cat([out, torch.tanh(x) / 2], 1) if self.learned else out


class Linear(torch.nn.Module):
    """logits = W x + b t / 1000: the gradient of log softmax[y] is W[y] - sum_j p_j W[j]."""

    def __init__(self, shape, K=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        D = math.prod(shape)
        self.W = torch.nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64) / math.sqrt(D) * 3)
        self.b = torch.nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64))
        self.ts = []

    def logits(self, x, t):
        return x.flatten(1).double() @ self.W.T + self.b * t.double().view(-1, 1) / 1000

    def forward(self, x, t):
        self.ts.append(t.clone())
        return self.logits(x, t).to(x.dtype)

    def grad(self, x, t, y):
        with torch.no_grad():
            p = torch.softmax(self.logits(x, t), -1)
            return (self.W[y] - p @ self.W).view_as(x)


def ddim_reference(model, kept, x_T, eta=0.0, clip=True, clf=None, y=None, scale=1.0, seed=None):
    """DDIM (eq. 12 of Song et al.) in float64; guidance by condition_score: eps -= sqrt(1 - ab) * scale * grad."""
    x = x_T.double()
    S = len(kept)
    for k, i in enumerate(range(S - 1, -1, -1)):
        t = torch.full((x.shape[0],), kept[i])
        ab, ab_prev = BASE_AC[kept[i]], (BASE_AC[kept[i - 1]] if i > 0 else 1.0)
        eps = model(x, t)[:, :x.shape[1]]
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        if clf is not None:
            eps = eps - math.sqrt(1 - ab) * scale * clf.grad(x, t, y)
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * dk.philox_normal(x.shape, seed, (k + 1) * 2**40, dtype=torch.float64)
    return x


def ddpm_reference(model, kept, shape, seed, variance, clip=True, clf=None, y=None, scale=1.0):
    """Ancestral sampling in float64: the posterior mean of x_{i-1} given x0_hat and x_i, plus sqrt(var) z;
    guidance by condition_mean: mean += var * scale * grad. x_T and each z are the documented Philox streams."""
    x = dk.philox_normal(shape, seed, 0, dtype=torch.float64)
    S, C = len(kept), shape[1]
    ab_all = [BASE_AC[t] for t in kept]

    def post_var(i):
        ab, ab_prev = ab_all[i], (ab_all[i - 1] if i > 0 else 1.0)
        return (1 - ab / ab_prev) * (1 - ab_prev) / (1 - ab)

    for k, i in enumerate(range(S - 1, -1, -1)):
        t = torch.full((shape[0],), kept[i])
        ab, ab_prev = ab_all[i], (ab_all[i - 1] if i > 0 else 1.0)
        beta = 1 - ab / ab_prev
        out = model(x, t)
        x0 = (x - math.sqrt(1 - ab) * out[:, :C]) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = beta * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * x
        if variance == "learned":
            frac = (out[:, C:] + 1) / 2
            lo = math.log(post_var(i) if i > 0 else post_var(1))
            var = torch.exp(frac * math.log(beta) + (1 - frac) * lo)
        elif variance == "fixed_large":
            var = torch.tensor(beta if i > 0 else post_var(1), dtype=torch.float64)
        else:
            var = torch.tensor(post_var(i), dtype=torch.float64)
        if clf is not None:
            mean = mean + var * scale * clf.grad(x, t, y)
        x = mean
        if i > 0:
            x = x + var.sqrt() * dk.philox_normal(shape, seed, (k + 1) * 2**40, dtype=torch.float64)
    return x


def _mu(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape[1:], generator=g, dtype=torch.float64) * 1.6 - 0.8


SHAPE = (3, 2, 4, 4)


# -------------------------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("T_, steps, kept", [
    (1000, "ddim10", list(range(0, 1000, 100))),
    (1000, "ddim4", [0, 250, 500, 750]),
    (10, "ddim3", [0, 4, 8]),
    (10, "3", [0, 4, 9]),
    (10, "2,3", [0, 4, 5, 7, 9]),
    (7, "2,2", [0, 3, 4, 6]),
    (6, "5", [0, 1, 2, 4, 5]),  # 0, 1.25, 2.5, 3.75, 5: Python's round, half to even
    (10, [10], list(range(10))),
])
def test_space_timesteps(T_, steps, kept):
    assert sorted(sampling.space_timesteps(T_, steps)) == kept


@pytest.mark.parametrize("steps", ["ddim7", "11", "6,1", "ddimx", "a,b"])
def test_space_timesteps_errors(steps):
    with pytest.raises(ValueError):
        sampling.space_timesteps(10, steps)


def test_respaced_schedule(sched):
    spaced, tmap = sampling.respace(sched, "ddim10")
    assert tmap.tolist() == list(range(0, 1000, 100))
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), BASE_AC[::100], rtol=1e-12)
    betas = 1 - BASE_AC[::100] / np.append(1.0, BASE_AC[::100][:-1])
    np.testing.assert_allclose(spaced.betas.numpy(), betas, rtol=1e-9)


def test_reverse_step():
    g = torch.Generator().manual_seed(0)
    x0, xt, z, s, sh = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(5))
    out = sampling.reverse_step(x0, xt, 0.3, -1.5, s, z, sh)
    torch.testing.assert_close(out, 0.3 * x0 - 1.5 * xt + s * z + sh, rtol=0, atol=1e-15)
    torch.testing.assert_close(sampling.reverse_step(x0, xt, 0.3, -1.5), 0.3 * x0 - 1.5 * xt, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("guided", [False, True])
def test_ddim_matches_reference(sched, guided):
    mu = _mu(SHAPE)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    clf, y = (Linear(SHAPE[1:]), torch.tensor([0, 3, 1])) if guided else (None, None)
    model = Oracle(mu)
    kw = dict(classifier=clf, classifier_scale=4.0, y=y)
    out = sampling.ddim_sample(model, sched, x_T, "ddim10", **kw)
    assert [int(t[0]) for t in model.ts] == list(range(900, -1, -100))  # original timesteps, every image
    assert all(t.dtype == torch.int64 and t.shape == (3,) for t in model.ts)
    if guided:
        assert [int(t[0]) for t in clf.ts] == list(range(900, -1, -100))
    ref = ddim_reference(Oracle(mu), list(range(0, 1000, 100)), x_T, clf=clf, y=y, scale=4.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    out32 = sampling.ddim_sample(Oracle(mu), sched, x_T.float(), "ddim10", **kw)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-4)
    if guided:  # the guidance matters: the unguided chain ends elsewhere
        plain = ddim_reference(Oracle(mu), list(range(0, 1000, 100)), x_T)
        assert (plain - ref).abs().max() > 0.05


def test_ddim_eta_noise_streams(sched):
    mu = _mu(SHAPE)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    clf, y = Linear(SHAPE[1:]), torch.tensor([2, 0, 1])
    out = sampling.ddim_sample(Oracle(mu), sched, x_T, "ddim5", eta=0.7, seed=123, classifier=clf, y=y,
                               classifier_scale=2.0, clip=False)
    ref = ddim_reference(Oracle(mu), list(range(0, 1000, 200)), x_T, eta=0.7, clip=False, clf=clf, y=y, scale=2.0,
                         seed=123)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    torch.manual_seed(5)
    a = sampling.ddim_sample(Oracle(mu), sched, x_T, "ddim5", eta=1.0)
    torch.manual_seed(5)
    b = sampling.ddim_sample(Oracle(mu), sched, x_T, "ddim5", eta=1.0)
    c = sampling.ddim_sample(Oracle(mu), sched, x_T, "ddim5", eta=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_predictions(sched, prediction):
    mu = _mu(SHAPE)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sampling.ddim_sample(Oracle(mu, as_prediction=prediction), sched, x_T, "ddim10", prediction=prediction)
    ref = ddim_reference(Oracle(mu), list(range(0, 1000, 100)), x_T)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("variance", ["learned", "fixed_large", "fixed_small"])
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_matches_reference(sched, variance, guided):
    mu = _mu(SHAPE)
    clf, y = (Linear(SHAPE[1:], seed=1), torch.tensor([1, 1, 3])) if guided else (None, None)
    learned = variance == "learned"
    out = sampling.ddpm_sample(Oracle(mu, learned=learned), sched, SHAPE, "10", seed=99,
                               variance=None if variance != "fixed_small" else variance,
                               classifier=clf, classifier_scale=3.0, y=y,
                               x_T=dk.philox_normal(SHAPE, 99, 0, dtype=torch.float64))
    kept = sorted(sampling.space_timesteps(T, "10"))
    assert kept == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    ref = ddpm_reference(Oracle(mu, learned=learned), kept, SHAPE, 99, variance, clf=clf, y=y, scale=3.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    out32 = sampling.ddpm_sample(Oracle(mu, learned=learned), sched, SHAPE, "10", seed=99,
                                 variance=None if variance != "fixed_small" else variance,
                                 classifier=clf, classifier_scale=3.0, y=y)  # x_T drawn: the offset-0 stream
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-4)


def test_ddpm_seeds(sched):
    mu = _mu(SHAPE)
    a = sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim8", seed=7)
    assert torch.equal(a, sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim8", seed=7))
    assert not torch.equal(a, sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim8", seed=8))
    # an image's noise does not depend on the batch after it
    assert torch.equal(a[:2], sampling.ddpm_sample(Oracle(mu), sched, (2, *SHAPE[1:]), "ddim8", seed=7))
    torch.manual_seed(0)
    b = sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim8")
    torch.manual_seed(0)
    assert torch.equal(b, sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim8"))
    assert not torch.equal(b, sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim8"))


# ------------------------------------------------------------------------------------- the real model path
def test_tiny_unet_guided(sched):
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                     attention_resolutions="", learn_sigma=True)
    with torch.no_grad():
        for p in unet.out[2].parameters():  # the last conv starts at zero: a non-trivial output
            p.normal_(0, 0.05)
    clf, y = Linear((3, 8, 8)), torch.tensor([0, 2])
    x_T = torch.randn(2, 3, 8, 8)
    seen = []
    with torch.inference_mode():  # guidance still has autograd, with inference-mode inputs too
        out = sampling.ddim_sample(unet, sched, x_T.clone(), "ddim4", classifier=clf, y=y.clone(), classifier_scale=2.0,
                                   progress=lambda done, total: seen.append((done, total)))
        bf = sampling.ddim_sample(unet, sched, x_T, "ddim4", classifier=clf, y=y, classifier_scale=2.0,
                                  dtype=torch.bfloat16)
        anc = sampling.ddpm_sample(unet, sched, (2, 3, 8, 8), "ddim4", seed=1, classifier=clf, y=y)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert unet.training  # modes restored
    ref = ddim_reference(lambda x, t: unet(x.float(), t).double(), list(range(0, 1000, 250)), x_T, clf=clf, y=y,
                         scale=2.0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)
    assert bf.dtype == torch.float32 and (bf - out).abs().max() < 0.1
    assert anc.shape == (2, 3, 8, 8) and torch.isfinite(anc).all()


def test_compiled_guidance_on_cpu_runs_a_fused_copy_of_the_classifier(monkeypatch, sched):
    """compile=True on the CPU: the classifier (an EncoderUNet) runs as a fused copy sharing its parameters
    (aot_eager for inductor, whose CPU compile would take a minute); the images equal the uncompiled run's, and
    the user's classifier is neither switched nor left in another mode. Callables without set_fused_norm run
    as they are."""
    import functools

    from diffaug_kernels.augment import cpu_kernel_fused
    from diffaug_kernels.models import unet as unet_module

    if not cpu_kernel_fused():
        pytest.skip("the C++ extension is not built")
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                     attention_resolutions="", learn_sigma=True)
    clf = dk.models.create_classifier(image_size=8, classifier_width=32, classifier_depth=1,
                                      classifier_attention_resolutions="", classifier_pool="adaptive",
                                      num_classes=3, channel_mult="1,2")
    with torch.no_grad():
        for p in [*unet.out[2].parameters(), *clf.out[3].parameters()]:  # zero-initialised: draw them
            p.normal_(0, 0.05)
    clf.train()
    x_T, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    fused = sampling.fused_classifier(clf, x_T.device)
    assert fused.fused_norm is True and clf.fused_norm is False
    assert [id(p) for p in fused.parameters()] == [id(p) for p in clf.parameters()]
    assert sampling.fused_classifier(clf, torch.device("meta")) is None  # the CPU rule only
    assert sampling.fused_classifier(Linear((3, 8, 8)), x_T.device) is None
    want = sampling.ddim_sample(unet, sched, x_T, "ddim4", classifier=clf, y=y, classifier_scale=3.0)
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    calls, real = [], unet_module.group_norm_silu
    monkeypatch.setattr(unet_module, "group_norm_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = sampling.ddim_sample(unet, sched, x_T, "ddim4", classifier=clf, y=y, classifier_scale=3.0, compile=True)
    sites = len(unet.norm_silu_sites()) + len(clf.norm_silu_sites())
    assert len(calls) >= sites  # both networks traced with the fused op
    assert clf.training and clf.fused_norm is False and unet.fused_norm is False
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_class_conditional_model_gets_y(sched):
    mu = _mu(SHAPE)

    class Cond(Oracle):
        num_classes = 4

        def __call__(self, x, t, y=None):
            assert y is not None and y.tolist() == [1, 2, 3]
            return super().__call__(x, t)

    x_T = torch.randn(SHAPE, dtype=torch.float64)
    out = sampling.ddim_sample(Cond(mu), sched, x_T, "ddim2", y=torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out, ddim_reference(Oracle(mu), [0, 500], x_T), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="class-conditional"):
        sampling.ddim_sample(Cond(mu), sched, x_T, "ddim2")


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(eta=-0.1), "eta"),
    (dict(eta=1.5), "eta"),
    (dict(eta=float("nan")), "eta"),
    (dict(steps="ddim999"), "integer stride"),
    (dict(steps="20000"), "cannot take"),
    (dict(prediction="mu"), "prediction"),
    (dict(classifier=Linear(SHAPE[1:])), "labels y"),
    (dict(classifier=Linear(SHAPE[1:]), y=torch.tensor([0, 1])), "y must be"),
    (dict(classifier=Linear(SHAPE[1:]), y=torch.tensor([0, 1, 9])), "y must lie"),
    (dict(classifier=Linear(SHAPE[1:]), y=torch.tensor([0, 1, 2]), classifier_scale=-1.0), "classifier_scale"),
])
def test_ddim_errors(sched, kwargs, match):
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        sampling.ddim_sample(Oracle(_mu(SHAPE)), sched, x_T, **{"steps": "ddim5", **kwargs})


def test_other_errors(sched):
    mu = _mu(SHAPE)
    with pytest.raises(ValueError, match="x_T must have shape"):
        sampling.ddim_sample(Oracle(mu), sched, torch.zeros(3, 4), "ddim5")
    with pytest.raises(ValueError, match="model output"):
        sampling.ddim_sample(lambda x, t: x[:, :1], sched, torch.zeros(SHAPE), "ddim5")
    with pytest.raises(ValueError, match="shape"):
        sampling.ddpm_sample(Oracle(mu), sched, (3, 2, 4), "ddim5")
    with pytest.raises(ValueError, match="x_T has shape"):
        sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim5", x_T=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="2C"):
        sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim5", variance="learned")
    with pytest.raises(ValueError, match="variance"):
        sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "ddim5", variance="large")
    with pytest.raises(ValueError, match="at least 2"):
        sampling.ddpm_sample(Oracle(mu), sched, SHAPE, "1")
    aug = dk.DiffAug(torch.nn.Identity(), sched)
    with pytest.raises(ValueError, match="own dtype"):
        sampling.ddim_sample(aug, sched, torch.zeros(SHAPE), "ddim5", dtype=torch.bfloat16)
