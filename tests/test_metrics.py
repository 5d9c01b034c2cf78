"""dk.metrics against values worked out by hand and against brute-force float64 re-implementations of the
definitions (guided-diffusion's evaluator; prdc), and the feature extractors' plumbing."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import metrics


# ------------------------------------------------------------------------------------------- Frechet
def test_frechet_distance_by_hand():
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    got = metrics.frechet_distance([0, 0, 1], np.diag([1.0, 4.0, 9.0]), [1, 2, 1], np.diag([4.0, 4.0, 1.0]))
    assert got == pytest.approx(5.0 + 1.0 + 0.0 + 4.0)
    assert metrics.frechet_distance([0, 0], np.eye(2), [0, 0], np.eye(2)) == pytest.approx(0.0, abs=1e-12)


def sqrt_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_of_features_against_an_eigendecomposition():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
    fake = rng.normal(size=(50, 5)) @ rng.normal(size=(5, 5)) + 0.7
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1 = (real - mu1).T @ (real - mu1) / 59
    s2 = (fake - mu2).T @ (fake - mu2) / 49
    r = sqrt_psd(s1)  # tr sqrt(s1 s2) = tr sqrt(r s2 r), r = s1^(1/2): no scipy.linalg.sqrtm here
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r @ s2 @ r))
    assert metrics.feature_frechet_distance(real, fake) == pytest.approx(want, rel=1e-9)
    assert metrics.feature_frechet_distance(torch.tensor(real), torch.tensor(fake)) == pytest.approx(want, rel=1e-9)
    mu, sigma = metrics.feature_statistics(real)
    np.testing.assert_allclose(mu, mu1, rtol=1e-12)
    np.testing.assert_allclose(sigma, s1, rtol=1e-10)


def test_frechet_distance_singular_and_invalid_covariances():
    with pytest.warns(RuntimeWarning, match="singular"):  # sqrtm of a nilpotent matrix is not finite: eps retry
        got = metrics.frechet_distance([0, 0], [[0.0, 1.0], [0.0, 0.0]], [0, 0], np.eye(2))
    assert math.isfinite(got)
    with pytest.raises(ValueError, match="imaginary"):  # sqrt(-1) on the diagonal
        metrics.frechet_distance([0, 0], np.diag([1.0, -1.0]), [0, 0], np.eye(2))
    with pytest.raises(ValueError, match="one length"):
        metrics.frechet_distance([0, 0], np.eye(2), [0, 0, 0], np.eye(3))
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        metrics.frechet_distance([0, 0], np.eye(3), [0, 0], np.eye(2))
    with pytest.raises(ValueError, match="features per row"):
        metrics.feature_frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------ Inception score
def test_inception_score_by_hand():
    # p(y) = (0.75, 0.25); KL = log(4/3) and 0.5 log(2/3) + 0.5 log 2
    kl = (math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2
    assert metrics.inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1) == pytest.approx(math.exp(kl))
    assert metrics.inception_score(np.eye(4), splits=1) == pytest.approx(4.0)  # confident and diverse: classes
    assert metrics.inception_score(np.full((6, 3), 1 / 3), splits=2) == pytest.approx(1.0)
    # two splits of rows [0, 2) and [2, 4): each confident about one class only, so each scores 1
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metrics.inception_score(probs, splits=2) == pytest.approx(1.0)
    assert metrics.inception_score(probs, splits=1) == pytest.approx(2.0)


def test_inception_score_splits_as_improved_gan():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(23, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(4):
        part = p[i * 23 // 4:(i + 1) * 23 // 4]
        q = part.mean(0)
        scores.append(math.exp(np.mean([sum(a * math.log(a / b) for a, b in zip(row, q)) for row in part])))
    assert metrics.inception_score(p, splits=4) == pytest.approx(np.mean(scores), rel=1e-12)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="probabilities"):
        metrics.inception_score(np.array([[0.5, 0.6]]), 1)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.eye(3), splits=4)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.inception_score(np.ones(3) / 3, 1)


# ---------------------------------------------------------------------------- manifold metrics (k-NN)
REAL = np.array([[0.0], [1.0], [2.0], [3.0]])


def test_precision_recall_density_coverage_by_hand():
    fake = np.array([[0.5], [1.5], [4.0]])
    # k=1: real radii 1 each; fake radii 1, 1, 2.5. fake 4.0 lies on real 3's sphere (<= counts it, < does not)
    assert metrics.precision_recall(REAL, fake, k=1) == (1.0, 1.0)
    density, coverage = metrics.density_coverage(REAL, fake, k=1)
    assert density == pytest.approx((2 + 2 + 0) / 3) and coverage == 0.75
    # k=2: real radii 2, 1, 1, 2; balls holding fake 0.5: reals 0, 1; 1.5: all four; 4.0: real 3
    density, coverage = metrics.density_coverage(REAL, fake, k=2)
    assert density == pytest.approx((2 + 4 + 1) / 3 / 2) and coverage == 1.0

    fake = np.array([[4.0], [6.0], [6.5]])
    # precision: only 4.0 (distance 1 <= radius 1 of real 3); recall: fake 4.0's radius 2 holds reals 2 and 3
    assert metrics.precision_recall(REAL, fake, k=1) == (pytest.approx(1 / 3), 0.5)
    assert metrics.density_coverage(REAL, fake, k=1) == (0.0, 0.0)


def brute_force(real, fake, k_pr, k_dc):
    """The definitions with scipy's cdist and full sorts, in float64."""
    from scipy.spatial.distance import cdist

    def radii(x, k):
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself

    d = cdist(real, fake)
    rr, fr = radii(real, k_pr), radii(fake, k_pr)
    precision = np.mean([(d[:, j] <= rr).any() for j in range(len(fake))])
    recall = np.mean([(d[i] <= fr).any() for i in range(len(real))])
    rr = radii(real, k_dc)
    density = np.mean([(d[:, j] < rr).sum() for j in range(len(fake))]) / k_dc
    coverage = np.mean(d.min(axis=1) < rr)
    return precision, recall, density, coverage


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_manifold_metrics_against_brute_force(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    real = rng.integers(-3, 4, size=(40, 3)).astype(np.float64)  # a lattice: duplicates and exact ties
    fake = rng.integers(-3, 4, size=(31, 3)).astype(np.float64) + rng.choice([0.0, 0.5], size=(31, 3))
    want = brute_force(real, fake, 3, 5)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 64)  # many row chunks
    got = (*metrics.precision_recall(real, fake, k=3), *metrics.density_coverage(real, fake, k=5))
    assert got == pytest.approx(want, abs=1e-12)
    assert metrics.feature_metrics(real, fake)["coverage"] == pytest.approx(want[3])
    real, fake = rng.normal(size=(50, 8)), rng.normal(size=(45, 8)) * 1.3 + 0.2
    got = (*metrics.precision_recall(real, fake, k=3), *metrics.density_coverage(real, fake, k=5))
    assert got == pytest.approx(brute_force(real, fake, 3, 5), abs=1e-12)


def test_manifold_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="more than k=3"):
        metrics.precision_recall(REAL[:3], REAL, k=3)
    with pytest.raises(ValueError, match="k must be"):
        metrics.density_coverage(REAL, REAL, k=0)
    with pytest.raises(ValueError, match="NaN"):
        metrics.precision_recall(REAL, np.array([[np.nan]]), k=1)
    with pytest.raises(ValueError, match="features per row"):
        metrics.density_coverage(REAL, np.zeros((5, 2)), k=1)


# ------------------------------------------------------------------------------------------- features
def test_features_of_any_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).train()
    x = torch.randn(10, 3, 2, 2)
    got = metrics.features(net, x, batch_size=3)
    want = x.double().flatten(1) @ net[1].weight.double().T + net[1].bias.double()
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32 and net.training  # mode restored
    batches = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(6))]  # a DataLoader's (images, labels)
    np.testing.assert_allclose(metrics.features(net, batches), got, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.features(net, x, batch_size=0)
    # a wrapper in training mode around a model in eval mode (a BatchNorm net): each keeps its own mode after,
    # and the features are the eval-mode ones (running statistics, untouched)
    inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten()).eval()
    wrapper = nn.Sequential(inner)
    before = inner[1].running_mean.clone()
    np.testing.assert_allclose(metrics.features(wrapper, x), inner(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert wrapper.training and not inner.training and not inner[1].training
    assert torch.equal(inner[1].running_mean, before)


def test_inception_needs_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        metrics.inception_features(torch.zeros(1, 3, 8, 8), tmp_path / "inception.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="inception_v3") as e:
        metrics.load_inception(bad)
    assert "\n" not in str(e.value)


def test_inception_pool_features_from_a_local_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)  # with the AuxLogits entries, as torchvision's file has them
    x = torch.rand(2, 1, 28, 28) * 2 - 1  # grayscale digits-sized images in [-1, 1]
    got = metrics.inception_features(x, path, batch_size=1)
    assert got.shape == (2, 2048)
    net.fc = nn.Identity()
    net.transform_input = False
    with torch.no_grad():
        want = net(nn.functional.interpolate(x.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear"))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_metrics_is_exported():
    assert dk.metrics is metrics
