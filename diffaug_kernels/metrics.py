"""Sample-quality metrics on feature arrays, and the feature extractors that make them.

Metrics take [N, D] feature arrays (numpy or torch) and follow guided-diffusion's evaluator
(evaluations/evaluator.py) and the prdc package (Naeem et al. 2020):

- frechet_distance(mu1, sigma1, mu2, sigma2): ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)),
  scipy.linalg.sqrtm, with eps on the diagonals when the product's root is not finite; feature_statistics
  gives (mean, np.cov) of a feature array, feature_frechet_distance does both for two arrays.
- inception_score(probs, splits): exp(mean_x KL(p(y|x) || p(y))), p(y) the split's mean, averaged over splits.
- precision_recall(real, fake, k=3): improved precision and recall (Kynkaanniemi et al. 2019) as the evaluator's
  ManifoldEstimator: each set's k-NN radius is the distance to its k-th nearest neighbour other than itself; a
  point is on a manifold when within (<=) the radius of one of its points.
- density_coverage(real, fake, k=5): prdc's density and coverage, with its strict (<) comparisons.

Distances are exact float64 Euclidean distances computed in row chunks (the evaluator computes float16
squared distances in TensorFlow; prdc float32 ones), so counts can differ from theirs on near-ties only.

Features: ``features(module, images)`` runs any torch module over a batch (e.g. a digits feature network
trained locally); ``load_inception(path)`` builds torchvision's Inception-v3 from a local state_dict file
(torchvision's ``inception_v3_google`` weights; nothing is downloaded) giving 2048-d pool features, and
``inception_features(images, path)`` runs it. FID from torchvision's Inception is not the TF-Inception FID of
the papers (different weights and resizing): compare such numbers only with each other. Metrics on digits
features are digits-feature metrics, not FID.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Iterable, Optional, Union

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from .utils import eval_mode, torch_load

__all__ = [
    "density_coverage",
    "feature_frechet_distance",
    "feature_metrics",
    "feature_statistics",
    "features",
    "frechet_distance",
    "inception_features",
    "inception_score",
    "load_inception",
    "precision_recall",
]

ArrayLike = Union[np.ndarray, Tensor]
CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per chunk (128 MiB in float64)


def _as_features(name: str, x: ArrayLike, dim: Optional[int] = None) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] feature array, got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features per row but the other array has {dim}")
    return x


# ------------------------------------------------------------------------------------------ Frechet
def feature_statistics(feats: ArrayLike) -> tuple:
    """(mu, sigma): the mean [D] and covariance [D, D] (np.cov, rows as observations) of an [N, D] array, N >= 2."""
    x = _as_features("features", feats)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm without its warnings (a non-finite result is handled by the caller, as upstream)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return linalg.sqrtm(m)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as guided-diffusion's evaluator: when
    sqrtm(sigma1 sigma2) is not finite it warns and retries with eps added to both diagonals; an imaginary part
    past 1e-3 on the root's diagonal is a ValueError, a smaller one is dropped."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be [{d}, {d}] matrices, got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of both covariances",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_frechet_distance(real: ArrayLike, fake: ArrayLike, eps: float = 1e-6) -> float:
    """frechet_distance of the feature_statistics of two [N, D] arrays (FID when they are Inception features)."""
    r = _as_features("real", real)
    f = _as_features("fake", fake, r.shape[1])
    return frechet_distance(*feature_statistics(r), *feature_statistics(f), eps=eps)


# ------------------------------------------------------------------------------------ Inception score
def inception_score(probs: ArrayLike, splits: int = 10) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) over each of `splits` consecutive parts of probs [N, classes] (rows
    i*N//splits .. (i+1)*N//splits - 1, p(y) the part's mean row), averaged over the parts. guided-diffusion's
    evaluator splits into parts of 5000 rows: splits = N / 5000 there. 0 log 0 counts as 0."""
    p = _as_features("probs", probs)
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must be rows of class probabilities (non-negative, summing to 1): take softmax "
                         "of the logits")
    n = p.shape[0]
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or not 1 <= splits <= n:
        raise ValueError(f"splits must be an int in [1, {n}] (the number of rows), got {splits!r}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------- manifold metrics (k-NN)
def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _sq_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(a), len(b)] in float64, clamped at 0."""
    d = (a * a).sum(axis=1)[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0)


def _knn_radii_sq(x: np.ndarray, k: int, name: str) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"{name} needs more than k={k} rows for k-nearest-neighbour radii, got {x.shape[0]}")
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(x.shape[0])
    for s, e in _row_chunks(x.shape[0], x.shape[0]):
        d = _sq_distances(x[s:e], x, x_sq)
        d[np.arange(e - s), np.arange(s, e)] = 0.0  # self, exactly: the 0th of the sorted row
        radii[s:e] = np.partition(d, k, axis=1)[:, k]
    return radii


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3) -> tuple:
    """(precision, recall), improved precision and recall as guided-diffusion's evaluator computes them:
    precision is the fraction of fake rows within (<=) the k-NN radius of some real row, recall the fraction of
    real rows within the k-NN radius of some fake row; radii exclude the point itself. real, fake: [N, D]."""
    k = _check_k(k)
    r = _as_features("real", real)
    f = _as_features("fake", fake, r.shape[1])
    r_rad, f_rad = _knn_radii_sq(r, k, "real"), _knn_radii_sq(f, k, "fake")
    f_sq = (f * f).sum(axis=1)
    fake_in = np.zeros(f.shape[0], dtype=bool)
    real_in = np.zeros(r.shape[0], dtype=bool)
    for s, e in _row_chunks(r.shape[0], f.shape[0]):
        d = _sq_distances(r[s:e], f, f_sq)  # [real chunk, fake]
        fake_in |= (d <= r_rad[s:e, None]).any(axis=0)
        real_in[s:e] = (d <= f_rad[None, :]).any(axis=1)
    return float(fake_in.mean()), float(real_in.mean())


def density_coverage(real: ArrayLike, fake: ArrayLike, k: int = 5) -> tuple:
    """(density, coverage) as the prdc package (Naeem et al. 2020): density = mean over fake rows of the number
    of real k-NN balls holding it (distance < radius), divided by k; coverage = fraction of real rows whose
    nearest fake row lies inside their own k-NN ball (<). Radii are real-to-real, the point itself excluded."""
    k = _check_k(k)
    r = _as_features("real", real)
    f = _as_features("fake", fake, r.shape[1])
    r_rad = _knn_radii_sq(r, k, "real")
    f_sq = (f * f).sum(axis=1)
    counts = np.zeros(f.shape[0])
    covered = np.zeros(r.shape[0], dtype=bool)
    for s, e in _row_chunks(r.shape[0], f.shape[0]):
        inside = _sq_distances(r[s:e], f, f_sq) < r_rad[s:e, None]  # [real chunk, fake]
        counts += inside.sum(axis=0)
        covered[s:e] = inside.any(axis=1)  # the nearest fake inside the ball <=> any fake inside it
    return float(counts.mean() / k), float(covered.mean())


def feature_metrics(real: ArrayLike, fake: ArrayLike, k_pr: int = 3, k_dc: int = 5) -> dict:
    """All of them on two feature arrays: frechet_distance, precision, recall (k_pr), density, coverage (k_dc).
    Name the features with the numbers: Inception's give FID (torchvision's, not the TF one), others do not."""
    precision, recall = precision_recall(real, fake, k_pr)
    density, coverage = density_coverage(real, fake, k_dc)
    return {"frechet_distance": feature_frechet_distance(real, fake), "precision": precision, "recall": recall,
            "density": density, "coverage": coverage}


# ------------------------------------------------------------------------------------------- features
def _batches(images, batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        for s in range(0, images.shape[0], batch_size):
            yield images[s:s + batch_size]
        return
    for batch in images:  # an iterable of tensors or of (images, labels) pairs (a DataLoader)
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise ValueError(f"images must be a tensor or an iterable of tensor batches, got a "
                             f"{type(batch).__name__} batch")
        yield batch


def features(module: nn.Module, images, batch_size: int = 256, device=None) -> np.ndarray:
    """module(batch) flattened to [B, D] for every batch of images (a tensor [N, ...], or an iterable of
    batches or of (images, labels) pairs), concatenated as float32 numpy [N, D]. The module runs in eval mode
    without autograd (each submodule's mode is restored after) on `device` (default: its parameters' device)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        param = next(iter(module.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    out = []
    with torch.no_grad(), eval_mode(module):
        for batch in _batches(images, batch_size):
            out.append(module(batch.to(device)).flatten(1).float().cpu().numpy())
    if not out:
        raise ValueError("images is empty")
    return np.concatenate(out, axis=0)


class InceptionPool(nn.Module):
    """torchvision's Inception-v3 up to its 2048-d average pool, on images in [-1, 1] of any size: grayscale is
    repeated to 3 channels and the batch resized to 299x299 (bilinear). [-1, 1] is the range the ported Google
    weights take (torchvision's transform_input maps ImageNet-normalised input to it), so no transform runs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape [B, 1 or 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[2:]) != (299, 299):
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


def load_inception(weights_path, device=None) -> InceptionPool:
    """torchvision's inception_v3 (aux_logits off, fc dropped: 2048-d pool features) with the state_dict in
    weights_path (torchvision's inception_v3_google-*.pth or a copy; read with weights_only=True; AuxLogits
    entries are ignored). Nothing is downloaded: a missing file is a FileNotFoundError. Returned in eval mode."""
    import torchvision

    path = os.fspath(weights_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception-v3 weights not found: {path!r} (nothing is downloaded; point at a local "
                                f"copy of torchvision's inception_v3_google state_dict)")
    state = torch_load(path, "Inception-v3", error=ValueError)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state_dict of tensors (torchvision's inception_v3 weights)")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    if "fc.weight" not in state:
        net.fc = nn.Identity()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)[:200]
        raise ValueError(f"{path} is not torchvision's inception_v3 state_dict ({first})") from None
    net.fc = nn.Identity()
    model = InceptionPool(net).eval()
    return model.to(device) if device is not None else model


def inception_features(images, weights_path, batch_size: int = 64, device=None) -> np.ndarray:
    """2048-d Inception-v3 pool features [N, 2048] of images in [-1, 1] (see load_inception, features)."""
    return features(load_inception(weights_path, device), images, batch_size, device)
