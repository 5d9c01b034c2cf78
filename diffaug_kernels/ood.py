"""OOD-detection scores and metrics used by the DiffAug paper's evaluation, as plain PyTorch.

Every score follows one convention: HIGHER = MORE IN-DISTRIBUTION (ID). Scores come back as torch tensors of
shape [N] (float32, or float64 for float64 input; float16/bfloat16 input is computed in float32); metrics come
back as Python floats.

Scores
------
``msp(logits)``                         max softmax probability (Hendrycks & Gimpel 2017).
``energy(logits, temperature=1.0)``     T * logsumexp(logits / T), the negative free energy (Liu et al. 2020).
``react_threshold(id_features, p=90)``  the p-th percentile of ALL ID penultimate activations, flattened
                                        (ReAct, Sun et al. 2021: ``np.percentile(activation_log.flatten(), 90)``,
                                        numpy's default linear interpolation).
``react(features, weight, bias, c)``    energy of the linear head applied to min(features, c).
``ash(features, weight, bias, p=90)``   ASH-S (Djurisic et al. 2023), energy of the head applied to the shaped
                                        features (see below).
``scale(features, weight, bias, p=85)`` SCALE (Xu et al. 2024), energy of the head applied to the rescaled,
                                        UNPRUNED features.

ASH-S and SCALE, per sample, with n activations x_1..x_n and percentile p (exactly as the authors' code,
``ash_s`` in github.com/andrijazz/ash ``ash.py`` and ``scale`` in github.com/kai422/SCALE
``openood/networks/scale_net.py``):

    k  = n - round(n * p / 100)         (round half to even, like ``np.round``)
    s1 = sum of all n activations       (before pruning)
    s2 = sum of the k largest           (the activations kept)
    r  = exp(s1 / s2)
    ASH-S:  keep the k largest, zero the rest, multiply the kept ones by r
    SCALE:  multiply ALL activations by r (nothing is pruned; the top-k only sets r)

Both assume non-negative (post-ReLU) activations, as the papers do: then s1 >= s2 > 0 and r >= e. With p = 0,
k = n, s1 = s2 and r = e for both, so ash(p=0) == scale(p=0) == energy(e * (x @ W.T) + b).
A sample whose kept activations sum to 0 (an all-zero feature vector) gives 0/0: its score is NaN, as in the
reference code; the metrics below reject NaN scores with a clear error.

Feature shapes
--------------
``features`` is [N, D] (pooled penultimate features, what the papers evaluate) or [N, C, H, W] (a feature
map before global average pooling). For [N, C, H, W], the shaping acts per sample on all C*H*W activations,
which is exactly what the reference ``ash_s`` / ``scale`` do with a 4-D tensor (they flatten C*H*W per
sample); ReAct's clip is elementwise. The shaped map is then global-average-pooled over (H, W) to [N, C]
before the linear head (the ResNet ``avgpool -> fc`` order), so ``weight`` is [K, C]. With H = W = 1 this is
identical to the [N, C] path. Note the papers apply all three methods AFTER the pool (ReAct's threshold is
also a percentile of pooled activations); to reproduce their numbers from a feature map, pool it first and
pass [N, C].

Metrics
-------
``auroc(id_scores, ood_scores)``          ``sklearn.metrics.roc_auc_score`` with ID as the positive class.
``fpr_at_95_tpr(id_scores, ood_scores)``  the fraction of OOD samples still accepted when the threshold keeps
                                          95% of ID samples. Convention: ID is positive and a sample is
                                          accepted when score >= threshold; the threshold is the first (largest)
                                          one on ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``
                                          with TPR >= 0.95, no interpolation. Equivalently: thr = the
                                          ceil(0.95 * n_id)-th largest ID score, FPR = mean(ood >= thr). This is
                                          OpenOOD's ``fpr_recall`` convention (ID positive). It is NOT OpenOOD's
                                          ``auc_and_fpr_recall`` FPR, which treats OOD as positive.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["msp", "energy", "react_threshold", "react", "ash", "scale", "auroc", "fpr_at_95_tpr"]

ArrayLike = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# input checking


def _as_float_tensor(x, name: str, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch tensor from a tensor / ndarray / sequence, in a floating compute dtype (float32 or float64).

    With ``like``, x takes like's dtype and must be on like's device."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}") from e
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if like is not None:
        if not isinstance(x, torch.Tensor):  # numpy / sequences have no device: follow the features
            t = t.to(like.device)
        elif t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but features are on {like.device}; move them to one device")
        return t.to(like.dtype)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)  # integers and float16/bfloat16: compute in float32
    return t


def _check_logits(logits) -> torch.Tensor:
    z = _as_float_tensor(logits, "logits")
    if z.dim() != 2:
        raise ValueError(f"logits must be [N, K], got shape {tuple(z.shape)}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(z.shape)}")
    return z


def _check_features(features) -> torch.Tensor:
    x = _as_float_tensor(features, "features")
    if x.dim() not in (2, 4):
        raise ValueError(f"features must be [N, D] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(x.shape)}")
    return x


def _check_head(x: torch.Tensor, weight, bias):
    """weight [K, D] (D = feature dim after pooling), bias [K] or None; cast to x's dtype."""
    w = _as_float_tensor(weight, "weight", like=x)
    d = x.shape[1]
    if w.dim() != 2:
        raise ValueError(f"weight must be [K, D] (a linear head's weight), got shape {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("weight must have at least one row (class)")
    if w.shape[1] != d:
        raise ValueError(f"weight is {tuple(w.shape)} but features have {d} channels "
                         f"(shape {tuple(x.shape)}): weight must be [K, {d}]")
    b = None
    if bias is not None:
        b = _as_float_tensor(bias, "bias", like=x)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must be [K] = [{w.shape[0]}] to match weight {tuple(w.shape)}, "
                             f"got shape {tuple(b.shape)}")
    return w, b


def _check_percentile(percentile, name="percentile", allow_100=False) -> float:
    if isinstance(percentile, torch.Tensor):
        if percentile.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(percentile.shape)}")
        percentile = percentile.item()
    try:
        p = float(percentile)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {type(percentile).__name__}") from e
    ok = (0.0 <= p <= 100.0) if allow_100 else (0.0 <= p < 100.0)
    if not ok:
        raise ValueError(f"{name} must be in [0, 100{']' if allow_100 else ')'}, got {percentile}")
    return p


def _head_energy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Global-average-pool a 4-D map, apply the linear head, return energy (T = 1) of the logits."""
    if x.dim() == 4:
        x = x.mean(dim=(2, 3))
    logits = x @ weight.T
    if bias is not None:
        logits = logits + bias
    return torch.logsumexp(logits, dim=1)


def kept_count(n: int, percentile: float) -> int:
    """How many of n activations ASH-S and SCALE keep: k = n - round(n p / 100) (Python's round, half to even,
    is numpy's, as in the reference code)."""
    return n - int(round(n * percentile / 100.0))


def _topk_keep(x: torch.Tensor, percentile: float):
    """Per-sample (flat over all non-batch dims): k, the kept-mask of the k largest, s1, s2."""
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    k = kept_count(n, percentile)
    if k < 1:
        raise ValueError(f"percentile={percentile} keeps no activation of the {n} per sample "
                         f"(k = n - round(n * p / 100) = {k}); use a smaller percentile")
    _, idx = torch.topk(flat, k, dim=1)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    s1 = flat.sum(dim=1)
    s2 = torch.where(mask, flat, torch.zeros_like(flat)).sum(dim=1)
    return mask.reshape(x.shape), s1, s2


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


# ----------------------------------------------------------------------------------------------------------
# scores (higher = more in-distribution)


def msp(logits: ArrayLike) -> torch.Tensor:
    """Maximum softmax probability, [N, K] logits -> [N] scores in (0, 1]."""
    z = _check_logits(logits)
    return torch.softmax(z, dim=1).amax(dim=1)


def energy(logits: ArrayLike, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy T * logsumexp(logits / T), [N, K] -> [N]."""
    z = _check_logits(logits)
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t * torch.logsumexp(z / t, dim=1)


def react_threshold(id_features: ArrayLike, percentile: float = 90) -> float:
    """ReAct's clipping threshold: the ``percentile``-th percentile of all ID activations, flattened.

    ``percentile`` in [0, 100] (100 = the maximum, i.e. no clipping). Uses ``numpy.percentile`` (linear
    interpolation), as ReAct's code does; works for any number of elements (torch.quantile does not)."""
    p = _check_percentile(percentile, allow_100=True)
    x = _as_float_tensor(id_features, "id_features")
    if x.numel() == 0:
        raise ValueError(f"id_features must be non-empty, got shape {tuple(x.shape)}")
    a = x.detach().cpu().numpy().ravel()
    if not np.isfinite(a).all():
        raise ValueError("id_features contain NaN or infinite values")
    return float(np.percentile(a, p))


def react(features: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike], threshold) -> torch.Tensor:
    """ReAct: energy of the linear head applied to min(features, threshold).

    features [N, D] or [N, C, H, W] (clipped elementwise, then average-pooled); weight [K, D]; bias [K] or
    None; threshold a number (e.g. from ``react_threshold``). Returns [N] scores."""
    x = _check_features(features)
    w, b = _check_head(x, weight, bias)
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a number, got a tensor of shape {tuple(threshold.shape)}")
        threshold = threshold.item()
    c = float(threshold)
    if math.isnan(c):
        raise ValueError("threshold is NaN")
    return _head_energy(x.clamp(max=c), w, b)


def ash(features: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike], percentile: float = 90) -> torch.Tensor:
    """ASH-S: per sample keep the k = n - round(n p / 100) largest activations, zero the rest, multiply the
    kept ones by exp(s1 / s2) (s1 = sum of all activations, s2 = sum of the kept ones); energy of the head.

    features [N, D] or [N, C, H, W] (shaped over all C*H*W per sample, then average-pooled); weight [K, D];
    bias [K] or None; percentile in [0, 100). Returns [N] scores."""
    x = _check_features(features)
    w, b = _check_head(x, weight, bias)
    p = _check_percentile(percentile)
    mask, s1, s2 = _topk_keep(x, p)
    r = torch.exp(s1 / s2)
    shaped = torch.where(mask, x, torch.zeros_like(x)) * _per_sample(r, x)
    return _head_energy(shaped, w, b)


def scale(features: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike], percentile: float = 85) -> torch.Tensor:
    """SCALE: multiply ALL activations (nothing pruned) by ASH-S's factor exp(s1 / s2) computed from the top
    k = n - round(n p / 100); energy of the head.

    features [N, D] or [N, C, H, W] (factor over all C*H*W per sample, then average-pooled); weight [K, D];
    bias [K] or None; percentile in [0, 100) (85 is the SCALE repository's default). Returns [N] scores."""
    x = _check_features(features)
    w, b = _check_head(x, weight, bias)
    p = _check_percentile(percentile)
    _, s1, s2 = _topk_keep(x, p)
    r = torch.exp(s1 / s2)
    return _head_energy(x * _per_sample(r, x), w, b)


# ----------------------------------------------------------------------------------------------------------
# metrics (ID = positive class)


def _scores_1d(s, name: str) -> np.ndarray:
    if isinstance(s, torch.Tensor):
        s = s.detach().cpu().double().numpy()
    try:
        a = np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 1-D tensor or array of numbers") from e
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} NaN or infinite score(s)")
    return a


def _labels_and_scores(id_scores, ood_scores):
    i = _scores_1d(id_scores, "id_scores")
    o = _scores_1d(ood_scores, "ood_scores")
    y = np.concatenate([np.ones(i.size, dtype=np.int64), np.zeros(o.size, dtype=np.int64)])
    return y, np.concatenate([i, o])


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve with ID as the positive class (1.0 = every ID score above every OOD score;
    ties count one half)."""
    from sklearn.metrics import roc_auc_score

    y, s = _labels_and_scores(id_scores, ood_scores)
    return float(roc_auc_score(y, s))


def fpr_at_95_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate on OOD at the largest threshold that keeps at least ``tpr`` of ID samples
    (accepted = score >= threshold; first point of the ROC curve with TPR >= tpr, no interpolation)."""
    from sklearn.metrics import roc_curve

    level = float(tpr)
    if not 0.0 < level <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    y, s = _labels_and_scores(id_scores, ood_scores)
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)  # keep every threshold: none is skipped
    return float(fprs[np.argmax(tprs >= level)])
