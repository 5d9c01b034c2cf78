"""diffaug_kernels.certify: DDS's t*, the Clopper-Pearson bound, CERTIFY / PREDICT against closed forms, the
noise streams behind the seeds, and certified_accuracy."""
import math

import numpy as np
import pytest
import torch
from helpers import TinyEps
from scipy.stats import beta, norm
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import certify as ct

S = dk.NoiseSchedule.linear(1000)
RATIO = (S.sqrt_one_minus_alphas_cumprod / S.sqrt_alphas_cumprod).numpy()  # model-space noise per unit signal


class ZeroEps(nn.Module):
    """An eps-model predicting zero, so the Tweedie step is x0_hat = clip(x_t / sqrt(abar)) = clip(x + r eps) with
    r = RATIO[t]. Learned-sigma style: the second C channels hold garbage that must not be read."""

    in_channels = 1

    def __init__(self, record=None):
        super().__init__()
        self.record = record

    def forward(self, x, t):
        if self.record is not None:
            self.record.append((x.clone(), t.clone()))
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 1e3)], 1)


class Quadrant(nn.Module):
    """Class from the signs of the first `bits` pixels: bits = 1 is the sign of pixel 0 (2 classes), bits = 2 the
    quadrant of pixels 0 and 1 (4 classes)."""

    def __init__(self, bits=1):
        super().__init__()
        self.bits = bits

    def forward(self, x):
        v = x.flatten(1)[:, :self.bits] > 0
        label = sum(v[:, i].long() << (self.bits - 1 - i) for i in range(self.bits))
        return nn.functional.one_hot(label, 2 ** self.bits).float()


class Constant(nn.Module):
    def __init__(self, label, num_classes):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes)
        out[:, self.label] = 1
        return out


def smoother(clf, sigma=0.25, num_classes=2, record=None, **kw):
    return ct.DenoisedSmoothing(clf, ZeroEps(record), S, sigma, num_classes, **kw)


def image(first, shape=(1, 8, 8), seed=0):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x.view(-1)[0] = first
    return x


# ---------------------------------------------------------------------------------------------------------- t*
def test_dds_timestep_on_the_linear_schedule():
    assert [ct.dds_timestep(S, s) for s in (0.25, 0.5, 1.0)] == [145, 259, 396]
    assert ct.dds_timestep(S, 0.5) == ct.dds_timestep(S, np.float32(0.5))
    assert ct.dds_timestep(S, 1e-6) == 1  # t = 0 is never chosen, as in DDS's search


@pytest.mark.parametrize("schedule", [S, dk.NoiseSchedule.cosine(1000), dk.NoiseSchedule.linear(100)])
@pytest.mark.parametrize("sigma", [0.01, 0.12, 0.25, 0.5, 1.0, 3.0])
def test_dds_timestep_is_the_first_t_whose_noise_reaches_two_sigma(schedule, sigma):
    ratio = (schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod).numpy()
    t = ct.dds_timestep(schedule, sigma)
    assert t >= 1 and ratio[t] >= 2 * sigma
    assert t == 1 or ratio[t - 1] < 2 * sigma


@pytest.mark.parametrize("sigma", [0, -0.5, float("nan"), float("inf"), 100.0, "0.5", True, None])
def test_dds_timestep_rejects_bad_sigmas(sigma):
    with pytest.raises(ValueError, match="sigma"):
        ct.dds_timestep(S, sigma)


def test_dds_timestep_names_the_reachable_sigma():
    with pytest.raises(ValueError, match="78.70"):  # RATIO[999] / 2
        ct.dds_timestep(S, 80.0)
    with pytest.raises(TypeError, match="schedule"):
        ct.dds_timestep(S.alphas_cumprod, 0.5)


# ------------------------------------------------------------------------------------------------- statistics
def test_lower_confidence_bound_is_the_beta_quantile():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 100_000))
        n_a = int(rng.integers(1, n + 1))
        alpha = float(rng.uniform(1e-5, 0.5))
        assert ct.lower_confidence_bound(n_a, n, alpha) == pytest.approx(beta.ppf(alpha, n_a, n - n_a + 1),
                                                                         rel=1e-12, abs=1e-15)
    assert ct.lower_confidence_bound(0, 10, 0.05) == 0.0
    assert ct.lower_confidence_bound(np.int64(10), 10, 0.05) == pytest.approx(0.05 ** (1 / 10), rel=1e-12)
    # one-sided: covers a true p at level 1 - alpha, so it lies below the empirical rate
    assert ct.lower_confidence_bound(700, 1000, 0.001) < 0.7


@pytest.mark.parametrize("args", [(-1, 10, 0.1), (11, 10, 0.1), (1, 0, 0.1), (1.0, 10, 0.1), (1, 10.0, 0.1),
                                  (True, 10, 0.1), (1, 10, 0), (1, 10, 1), (1, 10, float("nan")), (1, 10, "0.1")])
def test_lower_confidence_bound_rejects_bad_inputs(args):
    with pytest.raises(ValueError):
        ct.lower_confidence_bound(*args)


def test_certified_accuracy_on_a_table():
    radius = [0.0, 0.3, 0.5, 1.2, 0.0, 0.25]
    correct = [False, True, False, True, True, True]  # row 0: an abstention
    radii = [0.0, 0.25, 0.5, 1.0, 2.0]
    want = [4 / 6, 3 / 6, 1 / 6, 1 / 6, 0.0]
    got = ct.certified_accuracy(radius, correct, radii)
    assert isinstance(got, list) and all(isinstance(v, float) for v in got)
    assert got == pytest.approx(want, abs=1e-15)
    assert ct.certified_accuracy(np.array(radius), np.array(correct, dtype=int), np.array(radii)) == got
    assert ct.certified_accuracy(radius, correct, 0.5) == [pytest.approx(1 / 6)]
    for bad in [([0.1], [True, False], [0]), ([], [], [0]), ([float("nan")], [True], [0]), ([0.1], [2], [0]),
                ([[0.1]], [[True]], [0])]:
        with pytest.raises(ValueError):
            ct.certified_accuracy(*bad)


# --------------------------------------------------------------------------------------------- CERTIFY/PREDICT
def test_an_always_right_classifier_gets_the_n_a_equals_n_radius():
    n, alpha, sigma = 500, 0.001, 0.5
    sm = smoother(Constant(2, 3), sigma=sigma, num_classes=3)
    assert sm.t == 259
    label, radius = sm.certify(image(0.0), n0=10, n=n, alpha=alpha, batch_size=128, seed=0)
    assert label == 2
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)
    assert sm.predict(image(0.0)[None], n=50, alpha=alpha, batch_size=16, seed=1) == 2
    assert sm.sample_counts(image(0.0), 30, 7, seed=2).tolist() == [0, 0, 30]


@pytest.mark.parametrize("bits", [1, 2])
def test_a_chance_level_classifier_abstains(bits):
    """x = 0 and x0_hat = clip(r eps): the sign of each pixel is a fair coin, so every class has probability
    2**-bits (1/2 or 1/4) and neither CERTIFY nor PREDICT may commit."""
    sm = smoother(Quadrant(bits), num_classes=2 ** bits)
    x = torch.zeros(1, 8, 8)
    for seed in range(3):
        counts = sm.sample_counts(x, 2000, 500, seed=seed)
        assert abs(counts / 2000 - 2.0 ** -bits).max() < 5 * math.sqrt(0.25 / 2000)
        assert sm.certify(x, 50, 2000, 0.001, 500, seed=seed) == (ct.ABSTAIN, 0.0)
        assert sm.predict(x, 2000, 0.001, 500, seed=seed) == ct.ABSTAIN


@pytest.mark.parametrize("first", [0.5, -0.3])
def test_certified_radius_matches_the_closed_form(first):
    """x0_hat[0] = clip(x[0] + r eps) with r = RATIO[t*]: the sign classifier says class 1 with probability
    pA = Phi(x[0] / r) exactly. The radius must be sigma * Phi^-1(LCB(count)) for a count within 5 standard
    deviations of n pA (a wrong t*, noise scale or stream would move it far outside)."""
    sigma, n, alpha = 0.25, 20_000, 0.001
    sm = smoother(Quadrant(1), sigma=sigma)
    r = RATIO[sm.t]
    p1 = norm.cdf(first / r)
    top, p_a = (1, p1) if p1 > 0.5 else (0, 1 - p1)
    sd = math.sqrt(p_a * (1 - p_a) * n)
    counts = sm.sample_counts(image(first), n, 4096, seed=7)
    assert abs(counts[top] - n * p_a) < 5 * sd
    label, radius = sm.certify(image(first), 100, n, alpha, 4096, seed=7)
    lo, hi = (sigma * norm.ppf(beta.ppf(alpha, k, n - k + 1)) for k in (n * p_a - 5 * sd, n * p_a + 5 * sd))
    assert label == top and lo < radius < hi
    assert abs(radius - sigma * norm.ppf(p_a)) < 0.05  # ~0.84 -> ~0.25: the radius is close to the ideal one
    assert sm.predict(image(first), 2000, alpha, 1000, seed=8) == top


# ------------------------------------------------------------------------------------------- seeds and streams
def test_seeds_reproduce_and_differ():
    sm = smoother(Quadrant(1))
    x = image(0.05)
    a = sm.sample_counts(x, 300, 64, seed=11)
    assert (sm.sample_counts(x, 300, 64, seed=11) == a).all()
    assert not (sm.sample_counts(x, 300, 64, seed=12) == a).all()
    assert sm.certify(x, 100, 300, 0.01, 64, seed=3) == sm.certify(x, 100, 300, 0.01, 64, seed=3)
    # seed None: torch's generator draws the key, so torch.manual_seed reproduces and repeated calls differ
    torch.manual_seed(5)
    b1, b2 = sm.sample_counts(x, 300, 64), sm.sample_counts(x, 300, 64)
    torch.manual_seed(5)
    assert (sm.sample_counts(x, 300, 64) == b1).all()
    assert not (b1 == b2).all()


def test_counts_do_not_depend_on_the_batch_size():
    """D = 64 is a multiple of 4: sample j's noise is row j of one Philox tensor, whatever the batching."""
    sm = smoother(Quadrant(2), num_classes=4)
    x = image(0.1)
    ref = sm.sample_counts(x, 250, 250, seed=4)
    for bs in (1, 7, 64, 1000):
        assert (sm.sample_counts(x, 250, bs, seed=4) == ref).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 3, 3)])
def test_the_draws_follow_the_documented_philox_streams(shape):
    """Selection sample j at counter offset j * ceil(D / 4), estimation sample j at 2**62 + j * ceil(D / 4), under
    the call's seed; D = 9 checks that batches of a D not divisible by 4 do not share counters."""
    rec = []
    sm = smoother(Quadrant(1), record=rec)
    x, seed, n0, n, bs = image(0.2, shape), 2**64 - 3, 9, 23, 5
    sm.certify(x, n0, n, 0.01, bs, seed=seed)
    assert len(rec) == math.ceil(n0 / bs) + math.ceil(n / bs)
    assert all(bool((t == sm.t).all()) for _, t in rec)
    D, per = x.numel(), math.ceil(x.numel() / 4)
    rows, n_sel = [], math.ceil(n0 / bs)
    for i, (x_t, _) in enumerate(rec):
        base, start = (0, i * bs) if i < n_sel else (2**62, (i - n_sel) * bs)
        eps = dk.philox_normal((x_t.shape[0], *shape), seed, offset=base + start * per).double()
        want = S.sqrt_alphas_cumprod[sm.t] * x.double() + S.sqrt_one_minus_alphas_cumprod[sm.t] * eps
        torch.testing.assert_close(x_t.double(), want, atol=1e-5, rtol=0)
        rows.append(x_t.reshape(-1, D))
    allrows = torch.cat(rows)
    assert allrows.shape[0] == n0 + n
    # no two samples alike, and selection and estimation noise uncorrelated
    noise = (allrows.double() - S.sqrt_alphas_cumprod[sm.t] * x.reshape(1, -1).double())
    assert torch.unique(noise[:, 0]).numel() == n0 + n
    if D == 64:
        sel, est = noise[:n0].reshape(-1), noise[n0:n0 + n0].reshape(-1)
        assert abs(float(torch.corrcoef(torch.stack([sel, est]))[0, 1])) < 0.15


def test_selection_and_estimation_draws_are_independent():
    """With n0 = n, shared noise would give the estimation draw the selection's counts exactly."""
    rec = []
    sm = smoother(Quadrant(2), num_classes=4, record=rec)
    sm.certify(image(0.0), 64, 64, 0.1, 64, seed=9)
    (sel, _), (est, _) = rec
    assert not torch.equal(sel, est)
    assert not torch.equal(Quadrant(2)(sel).argmax(1), Quadrant(2)(est).argmax(1))
    # the selection draw is sample_counts's with the same seed; the estimation draw is not
    assert (sm.sample_counts(image(0.0), 64, 64, seed=9) == np.bincount(Quadrant(2)(sel).argmax(1), minlength=4)).all()


# ----------------------------------------------------------------------------------------- models and backends
def test_a_real_score_model_runs_the_same_on_every_cpu_backend():
    """TinyEps (learned sigma, 2C outputs) and a conv classifier: the fused CPU kernels and the reference give the
    same counts (the noise contract), and forward is the base classifier on a batch."""
    torch.manual_seed(0)
    eps, clf = TinyEps(C=1), nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.LazyLinear(3))
    x = image(0.0)
    clf(x[None])  # materialise the lazy layer
    got = {b: ct.DenoisedSmoothing(clf, eps, S, 0.5, 3, backend=b).sample_counts(x, 200, 64, seed=1)
           for b in ("reference", "auto")}
    assert (got["reference"] == got["auto"]).all() and got["auto"].sum() == 200
    sm = ct.DenoisedSmoothing(clf, eps, S, 0.5, 3)
    labels = sm(torch.stack([x, -x]), seed=3)
    assert labels.shape == (2,) and labels.dtype == torch.int64
    assert torch.equal(labels, sm(torch.stack([x, -x]), seed=3))
    assert "t=259" in repr(sm)


def test_models_run_in_eval_and_inference_mode_and_keep_their_modes():
    seen = []

    class Spy(Quadrant):
        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return super().forward(x)

    clf = Spy(1)
    sm = smoother(clf)
    sm.train()
    sm.certify(image(0.3), 10, 20, 0.1, 8, seed=0)
    assert seen and all(s == (False, True) for s in seen)
    assert clf.training and sm.aug.model.training  # restored


def test_bad_arguments_are_named():
    sm = smoother(Quadrant(1))
    x = image(0.0)
    for kw, name in [(dict(n0=0), "n0"), (dict(n=2.5), "n"), (dict(batch_size=-1), "batch_size"),
                     (dict(alpha=0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(alpha=float("nan")), "alpha")]:
        args = dict(n0=4, n=8, alpha=0.1, batch_size=4) | kw
        with pytest.raises(ValueError, match=name):
            sm.certify(x, **args)
    for bad in [torch.zeros(2, 1, 8, 8), torch.zeros(8, 8), torch.zeros(3, 8, 8),
                torch.zeros(1, 8, 8, dtype=torch.int64), torch.zeros(1, 0, 8), np.zeros((1, 8, 8))]:
        with pytest.raises(ValueError, match="x"):
            sm.predict(bad, 8, 0.1, 4)
    with pytest.raises(ValueError, match="num"):
        sm.sample_counts(x, 0, 4)
    with pytest.raises(ValueError, match="seed"):
        sm.sample_counts(x, 4, 4, seed=2**64)
    assert (sm.sample_counts(x, 4, 4, seed=-1) == sm.sample_counts(x, 4, 4, seed=2**64 - 1)).all()  # the ops' rule
    with pytest.raises(TypeError, match="seed"):
        sm.sample_counts(x, 4, 4, seed=1.5)
    with pytest.raises(ValueError, match="batch"):
        sm(x)
    with pytest.raises(ValueError, match="logits"):
        smoother(Quadrant(2), num_classes=3).sample_counts(x, 4, 4)
    with pytest.raises(ValueError, match="num_classes"):
        smoother(Quadrant(1), num_classes=1)
    with pytest.raises(ValueError, match="sigma"):
        smoother(Quadrant(1), sigma=0)
    with pytest.raises(ValueError, match="prediction"):
        smoother(Quadrant(1), prediction="noise")


def dds_multistep_reference(model, x_t, t_star, key):
    """DDS's multistep denoiser in float64, from guided-diffusion's p_sample equations: for i = t* - 1, ..., 0,
    x <- posterior mean of (clip(x0_hat(x, i)), x) + [i > 0] exp(logvar / 2) z_k, the learned-range log variance
    between log beta_i and the clipped log posterior variance; z_k = philox_normal(shape, key, (k + 1) * 2**40)
    (dk.sampling's streams)."""
    b = S.table("betas", dtype=torch.float64)
    ab = torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    C = x_t.shape[1]
    x = x_t.double()
    for k, i in enumerate(range(t_star)[::-1]):
        out = model(x.float(), torch.full((x.shape[0],), i)).double()
        x0 = ((x - (1 - ab[i]).sqrt() * out[:, :C]) / ab[i].sqrt()).clamp(-1, 1)
        mean = (b[i] * ab_prev[i].sqrt() / (1 - ab[i])) * x0 + ((1 - ab_prev[i]) * (1 - b[i]).sqrt() / (1 - ab[i])) * x
        frac = (out[:, C:] + 1) / 2
        logvar = frac * b[i].log() + (1 - frac) * post_logvar[i]
        z = dk.philox_normal(tuple(x.shape), key, (k + 1) * 2**40, dtype=torch.float64)
        x = mean + (torch.exp(0.5 * logvar) * z if i > 0 else 0)
    return x


def test_the_multistep_denoiser_is_dds_ancestral_chain():
    """denoiser="multistep": the classifier sees DDS's multistep output (the chain from x_t* over the schedule's
    first t* steps), each batch's chain on its own Philox key; the one-step denoiser sees something else."""
    torch.manual_seed(0)
    eps = TinyEps(C=1)
    seen = []

    def clf(x):
        seen.append(x.clone())
        return torch.stack([x.flatten(1).mean(1), -x.flatten(1).mean(1)], 1)

    sm = ct.DenoisedSmoothing(clf, eps, S, 0.02, 2, denoiser="multistep")
    assert sm.t == 8 and "multistep" in repr(sm)
    x = image(0.3)
    sm.sample_counts(x, 6, 4, seed=7)
    assert [s.shape[0] for s in seen] == [4, 2]
    per = -(-x.numel() // 4)
    for j, (start, k) in enumerate(((0, 4), (4, 2))):
        t = torch.full((k,), sm.t)
        x_t = dk.forward_noise(x.expand(k, *x.shape), t, S, seed=7, offset=start * per)
        want = dds_multistep_reference(eps, x_t, sm.t, ct._chain_key(7, start * per))
        torch.testing.assert_close(seen[j].double(), want, atol=2e-5, rtol=0)
    one = []
    ct.DenoisedSmoothing(lambda v: one.append(v) or clf(v), eps, S, 0.02, 2).sample_counts(x, 6, 4, seed=7)
    assert not torch.allclose(one[0], seen[0], atol=1e-3)
    with pytest.raises(ValueError, match="denoiser must be one of"):
        ct.DenoisedSmoothing(clf, eps, S, 0.02, 2, denoiser="many")
