"""Perceptually aligned gradients (PAG): input gradients of classifiers, taken through the DiffAug denoiser or not,
against the Bayes-optimal direction of a labelled data set, and robustness to L2 PGD.

Theorem 1 of the DiffAug paper: for the optimal score, the Jacobian of the Tweedie map is proportional to the
posterior covariance, in this package's VP form

    d x0_hat / d x_t = sqrt(abar_t) / (1 - abar_t) * Cov[x0 | x_t],

so a classifier's gradient taken through the denoiser, J^T grad f, is stretched along the principal directions
of the plausible clean images. For a labelled empirical mixture the class posterior's gradient has a closed form,

    grad_{x_t} log p(y | x_t) = sqrt(abar_t) / (1 - abar_t) * (E[x0 | x_t, y] - E[x0 | x_t]),

the direction ``bayes_direction`` computes, and ``alignment`` is the cosine between it and a gradient.

Units: images are in [-1, 1] (the package's convention) and pgd_l2's eps is an L2 norm in those units (eps 0.5
here is 0.25 in [0, 1] pixel units).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .augment import DiffAug
from .ops import checks
from .schedule import NoiseSchedule
from .utils import eval_mode

__all__ = ["input_gradient", "bayes_direction", "alignment", "pgd_l2", "robust_accuracy"]

_NORM_FLOOR = 1e-12  # below this L2 norm a gradient counts as zero (no direction to step along)


def _check_batch(x, y) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError("x must be a floating-point tensor of shape [B, C, ...]")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point:
        raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}] (one label per image)")
    return y.to(device=x.device, dtype=torch.int64)


def _generator(seed, device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    if not checks.is_int(seed):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % 2**64)
    return g


def _wide(logits: Tensor) -> Tensor:
    """Half-precision logits in float32 for the softmax; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _per_sample_norm(v: Tensor) -> Tensor:
    """|v_b| as [B, 1, ...] (broadcasts against v)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


# ------------------------------------------------------------------------------------------------ gradients
def input_gradient(classifier, x: Tensor, y: Tensor, augment: Optional[DiffAug] = None, t=None, seed=None) -> Tensor:
    """d log p(y | augment(x, t)) / dx per sample, [B, ...] in x's dtype.

    augment: a dk.DiffAug, whose forward noise, score network and Tweedie step the gradient passes through
    (t: an int or [B] times, None draws them as DiffAug does; seed: the noise's Philox seed), or None for the
    plain input gradient d log p(y | x) / dx (then t and seed must be None). The classifier (and the score
    model) run in eval mode for the call, their modes restored after; the result is detached and no parameter
    gains a .grad."""
    y = _check_batch(x, y)
    if augment is not None and not isinstance(augment, DiffAug):
        raise ValueError(f"augment must be a dk.DiffAug or None, got {type(augment).__name__}")
    if augment is None and (t is not None or seed is not None):
        raise ValueError("t and seed apply to an augment (a dk.DiffAug); with augment=None give neither")
    xg = x.detach().clone().requires_grad_(True)
    with eval_mode(classifier, augment), torch.enable_grad():
        inp = xg if augment is None else augment(xg, t=t, seed=seed)
        logp = torch.log_softmax(_wide(classifier(inp)), dim=-1)
        if logp.dim() != 2 or logp.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return [B, num_classes] logits, got {tuple(logp.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= logp.shape[1]:
            raise ValueError(f"y must hold class indices in [0, {logp.shape[1]})")
        # samples are independent in eval mode, so the gradient of the sum is each sample's own gradient
        (grad,) = torch.autograd.grad(logp.gather(1, y[:, None]).sum(), xg)
    return grad.detach()


def bayes_direction(x_t: Tensor, t, y: Tensor, data: Tensor, labels: Tensor, schedule: NoiseSchedule,
                    chunk: Optional[int] = None) -> Tensor:
    """The Bayes-optimal PAG direction of the empirical mixture of (data, labels) at (x_t, t):
    grad_{x_t} log p(y | x_t) = sqrt(abar) / (1 - abar) * (E[x0 | x_t, y] - E[x0 | x_t]), [B, ...] in x_t's dtype.

    The posterior over the data points is softmax_i(-|x_t - sqrt(abar) x_i|^2 / (2 (1 - abar))) (restricted to
    label y for the class term), computed in float64 over chunks of `chunk` data points with a running
    log-sum-exp, so no [B, N] matrix of weights is held at once. data: [N, ...] with x_t's sample shape;
    labels: [N] integers; t: an int or [B] times; y: [B] labels, each present in labels."""
    y = _check_batch(x_t, y)
    schedule = checks.check_schedule(schedule)
    if not isinstance(data, Tensor) or data.dim() != x_t.dim() or data.shape[1:] != x_t.shape[1:] or not len(data):
        raise ValueError(f"data must be a non-empty tensor [N, {', '.join(map(str, x_t.shape[1:]))}] of x_t's "
                         f"sample shape, got {tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__}")
    if (not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != data.shape[0]
            or labels.dtype.is_floating_point):
        raise ValueError(f"labels must be an integer tensor of shape [{data.shape[0]}] (one per data point)")
    if chunk is not None and (not checks.is_int(chunk) or int(chunk) < 1):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    B, D = x_t.shape[0], x_t[0].numel()
    dev, f64 = x_t.device, torch.float64
    tt = checks.as_times("t", t, B, dev, schedule.num_timesteps)
    abar = schedule.table("alphas_cumprod", dev, f64)[tt][:, None]  # [B, 1]
    a, var = abar.sqrt(), 1.0 - abar
    xs = x_t.detach().reshape(B, D).to(f64)
    lab = labels.to(dev, torch.int64)
    if not torch.isin(y, lab).all():
        raise ValueError("every y must be a label present in labels (its class has no data points otherwise)")
    chunk = int(chunk) if chunk is not None else max(1, min(data.shape[0], 2**22 // max(B, D)))
    # running (max, sum of exp, exp-weighted sum of x_i) of the logits, over all points and over label y
    m = [torch.full((B, 1), -torch.inf, dtype=f64, device=dev) for _ in range(2)]
    s = [torch.zeros(B, 1, dtype=f64, device=dev) for _ in range(2)]
    acc = [torch.zeros(B, D, dtype=f64, device=dev) for _ in range(2)]
    sq_x = (xs * xs).sum(1, keepdim=True)
    for lo in range(0, data.shape[0], chunk):
        xi = data[lo:lo + chunk].detach().reshape(-1, D).to(dev, f64)
        # |x_t - a x_i|^2 expanded: a matrix product instead of a [B, n, D] difference
        d2 = sq_x - 2 * a * (xs @ xi.T) + abar * (xi * xi).sum(1)[None]
        logit = -d2.clamp_min(0) / (2 * var)
        same = lab[lo:lo + chunk][None] == y[:, None]
        for k, lg in enumerate((logit, logit.masked_fill(~same, -torch.inf))):
            new_m = torch.maximum(m[k], lg.max(1, keepdim=True).values)
            # rows whose running max is still -inf (no point of the class yet) keep zeros, not NaN
            safe_m = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
            w = torch.exp(lg - safe_m)
            decay = torch.exp(m[k] - safe_m)
            s[k] = s[k] * decay + w.sum(1, keepdim=True)
            acc[k] = acc[k] * decay + w @ xi
            m[k] = new_m
    mean_all, mean_y = acc[0] / s[0], acc[1] / s[1]
    direction = a / var * (mean_y - mean_all)
    return direction.reshape(x_t.shape).to(x_t.dtype)


def alignment(grad: Tensor, direction: Tensor) -> Tensor:
    """Cosine similarity per sample of two [B, ...] tensors, [B] float64; NaN where either is zero (no direction:
    e.g. a Bayes direction at small t, where the empirical posterior sits on one training point)."""
    if not isinstance(grad, Tensor) or not isinstance(direction, Tensor) or grad.dim() < 1:
        raise ValueError("grad and direction must be tensors of shape [B, ...]")
    if grad.shape != direction.shape:
        raise ValueError(f"grad and direction must have one shape, got {tuple(grad.shape)} and "
                         f"{tuple(direction.shape)}")
    g, d = grad.detach().flatten(1).double(), direction.detach().flatten(1).to(grad.device).double()
    den = g.norm(dim=1) * d.norm(dim=1)
    return torch.where(den > 0, (g * d).sum(1) / den.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


# ------------------------------------------------------------------------------------------------ PGD
def _eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) >= 0:  # NaN fails too
        raise ValueError(f"eps must be a non-negative number (an L2 radius in the images' units), got {eps!r}")
    return float(eps)


def pgd_l2(classifier: nn.Module, x: Tensor, y: Tensor, eps, steps: int = 7, step_size=None, random_start: bool = True,
           seed=None) -> Tensor:
    """L2 PGD (Madry et al.) on images in [-1, 1]: x_adv with |x_adv - x| <= eps per sample and x_adv in [-1, 1]
    that raises the cross-entropy of y. Each step moves step_size (default 1.5 * eps / steps) along the
    normalised gradient, then projects onto the eps-ball around x and clamps to the image range (clamping
    moves each coordinate toward x, so the point stays in the ball). random_start begins at a uniform point of
    the ball, drawn with seed (None: torch's default generator). The classifier runs in eval mode; the result
    is detached."""
    y = _check_batch(x, y)
    eps = _eps(eps)
    if not checks.is_int(steps) or int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    step = 1.5 * eps / steps if step_size is None else _eps(step_size)
    if not isinstance(random_start, bool):
        raise ValueError(f"random_start must be True or False, got {random_start!r}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    gen = _generator(seed, x.device)
    delta = torch.zeros_like(x)
    if random_start:  # uniform in the ball: a uniform direction, radius eps * u^(1/d)
        direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        direction = direction / _per_sample_norm(direction).clamp_min(_NORM_FLOOR)
        u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=x.device, dtype=x.dtype)
        delta = direction * eps * u.pow(1.0 / x[0].numel())
    x_adv = (x + delta).clamp(-1, 1)
    with eval_mode(classifier), torch.enable_grad():
        for _ in range(steps):
            xa = x_adv.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(_wide(classifier(xa)), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
            g_norm = _per_sample_norm(g)
            x_adv = x_adv + step * torch.where(g_norm > _NORM_FLOOR, g / g_norm.clamp_min(_NORM_FLOOR), 0.0)
            delta = x_adv - x
            delta = delta * (eps / _per_sample_norm(delta).clamp_min(_NORM_FLOOR)).clamp(max=1.0)
            x_adv = (x + delta).clamp(-1, 1).detach()
    return x_adv


@torch.no_grad()
def _correct(classifier, x: Tensor, y: Tensor) -> Tensor:
    with eval_mode(classifier):
        return classifier(x).argmax(-1) == y


def robust_accuracy(classifier: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], steps: int = 7,
                    batch_size: int = 128, seed: int = 0, progress=None) -> dict:
    """Accuracy under pgd_l2 at each eps (eps 0: clean accuracy), as {eps: fraction}; batch_size images per
    attack, the random start of batch k and radius j drawn with seed + 1000 * j + k. progress(done, total) is
    called after each batch."""
    y = _check_batch(x, y)
    radii = [_eps(e) for e in eps]
    if not checks.is_int(batch_size) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    bs, out = int(batch_size), {}
    n_batches = -(-x.shape[0] // bs)
    total, done = len(radii) * n_batches, 0
    for j, e in enumerate(radii):
        right = 0
        for k in range(n_batches):
            xb, yb = x[k * bs:(k + 1) * bs], y[k * bs:(k + 1) * bs]
            xa = pgd_l2(classifier, xb, yb, e, steps=steps, seed=seed + 1000 * j + k) if e > 0 else xb
            right += int(_correct(classifier, xa, yb).sum())
            done += 1
            if progress is not None:
                progress(done, total)
        out[e] = right / x.shape[0]
    return out
