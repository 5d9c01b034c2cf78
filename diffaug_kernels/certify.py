"""Certified L2 robustness by diffusion denoised smoothing (DDS): Carlini et al., "(Certified!!) Adversarial
Robustness for Free!" (ICLR 2023), on the randomized-smoothing algorithms of Cohen et al. (ICML 2019).

The base classifier f noises an image to the diffusion time t* whose noise level matches the smoothing sigma,
denoises it with one Tweedie step of the score model and takes the classifier's argmax. The smoothed classifier
g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), is certified by Monte-Carlo counts of f's labels:
``DenoisedSmoothing.certify`` (CERTIFY) and ``.predict`` (PREDICT), with the statistics in
``lower_confidence_bound`` and the table summary in ``certified_accuracy``.

Units: images are in [-1, 1] (the package's convention); sigma and the certified radius are in [0, 1] pixel
units, as in the literature, so the noise in the model's [-1, 1] space is 2 sigma.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import ops
from .augment import DiffAug
from .ops import checks
from .schedule import NoiseSchedule
from .utils import eval_mode

ABSTAIN = -1

# Philox counters are 64 bits and offsets lie in [0, 2**63): the estimation draw of a call starts at 2**62, so
# its counters never meet the selection draw's (which would need 2**64 noise elements to reach them).
_DRAW_STRIDE = 2**62


# ------------------------------------------------------------------------------------------------ statistics
def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    return float(v)


def _positive_int(name: str, v) -> int:
    if not checks.is_int(v) or int(v) < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_alpha(alpha) -> float:
    a = _real("alpha", alpha)
    if not 0 < a < 1:  # NaN fails too
        raise ValueError(f"alpha (the failure probability) must lie in (0, 1), got {alpha!r}")
    return a


def dds_timestep(schedule: NoiseSchedule, sigma) -> int:
    """The diffusion time t* whose noise matches smoothing noise sigma: the smallest t >= 1 with
    sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma (2 sigma: the model works on [-1, 1] images, sigma is in [0, 1]
    pixel units). Since x_t = sqrt(abar_t) * (x + eps * sqrt(1 - abar_t) / sqrt(abar_t)), noising to t* is
    Gaussian smoothing at sigma_t* = ratio_t* / 2 >= sigma followed by a fixed scale; the radius
    sigma * Phi^-1(pA) that certify reports, as DDS does, is then conservative by the factor sigma / sigma_t*
    (within 1% for sigma in [0.25, 1] on the linear 1000-step schedule).

    Indexing: abar_t = schedule.alphas_cumprod[t] with t in [0, T), t = 0 being one diffusion step, which is
    guided-diffusion's convention; DDS (ethz-spylab/diffusion_denoised_smoothing, certify.py) searches those
    same arrays from t = 1 upwards, so t = 0 is never chosen (which matters only for sigma <= ratio_0 / 2,
    0.005 on the linear schedule). On dk.NoiseSchedule.linear(1000): sigma 0.25 -> 145, 0.5 -> 259, 1.0 -> 396 (a
    1-based abar, alphas_cumprod[t - 1], would give 146, 260, 397). The ratio is computed in float64 from the
    schedule's tables, as DDS does.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
    s = _real("sigma", sigma)
    if not s > 0:  # NaN fails too
        raise ValueError(f"sigma must be a positive number (smoothing noise in [0, 1] pixel units), got {sigma!r}")
    ratio = (schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod).numpy()
    reach = ratio[1:] >= 2 * s
    if not reach.any():
        top = float(ratio[-1]) / 2 if ratio.size > 1 else 0.0
        raise ValueError(f"sigma = {s:g} is beyond this schedule's noise: {schedule!r} reaches at most sigma = "
                         f"{top:.6g} at t = {schedule.num_timesteps - 1} (t* >= 1 needs T >= 2)")
    return int(np.argmax(reach)) + 1


def lower_confidence_bound(n_a, n, alpha) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from n_a successes in n draws:
    the alpha quantile of Beta(n_a, n - n_a + 1); exactly 0 for n_a = 0. (The lower end of the two-sided
    interval at level 2 alpha, which is what Cohen et al.'s proportion_confint(..., alpha=2 * alpha,
    method="beta") computes.)"""
    if not checks.is_int(n) or int(n) < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not checks.is_int(n_a) or not 0 <= int(n_a) <= int(n):
        raise ValueError(f"n_a must be an integer in [0, n = {n}], got {n_a!r}")
    alpha = _check_alpha(alpha)
    n_a, n = int(n_a), int(n)
    if n_a == 0:
        return 0.0
    from scipy.stats import beta  # costly to import (about a second): only where bounds are computed

    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def certified_accuracy(radius, correct, radii) -> list:
    """For each r in radii, the fraction of rows that are correct and certified at radius >= r, as a list of
    Python floats (JSON-ready). radius and correct are per-row sequences (lists or numpy arrays) of one length;
    an abstention counts as wrong: give correct=False for it (certify returns radius 0.0 with ABSTAIN)."""
    rad = np.asarray(radius, dtype=np.float64)
    ok = np.asarray(correct)
    if rad.ndim != 1 or ok.ndim != 1 or rad.shape != ok.shape or rad.size == 0:
        raise ValueError(f"radius and correct must be non-empty 1-D sequences of one length, got shapes "
                         f"{rad.shape} and {ok.shape}")
    if ok.dtype != np.bool_:
        if not np.isin(ok, (0, 1)).all():
            raise ValueError("correct must hold booleans (or 0 / 1)")
        ok = ok.astype(bool)
    if np.isnan(rad).any():
        raise ValueError("radius holds NaN")
    rs = np.asarray(radii, dtype=np.float64)
    if rs.ndim > 1 or np.isnan(rs).any():
        raise ValueError(f"radii must be a number or a 1-D sequence of numbers, got {radii!r}")
    return [float(np.mean(ok & (rad >= r))) for r in rs.reshape(-1)]


def _check_seed(seed) -> int:
    """The call's Philox key: seed as an int, or one drawn from torch's default generator (so torch.manual_seed
    makes a run reproducible)."""
    if seed is None:
        return int(torch.randint(0, 2**63 - 1, ()))
    if isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = int(seed.item())
    if not checks.is_int(seed):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    if not -2**63 <= int(seed) < 2**64:  # the ops' rule: 64 bits, a negative value in two's complement
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed!r}")
    return int(seed) % 2**64


def _chain_key(key: int, offset: int) -> int:
    """The Philox key of the multistep chain of the batch whose noise draw starts at counter offset (one key per
    batch: the chains of different batches and calls are independent)."""
    words = [key & 0xFFFFFFFF, key >> 32, offset & 0xFFFFFFFF, offset >> 32]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------------------- the smoothed model
DENOISERS = ("one-step", "multistep")


class DenoisedSmoothing(nn.Module):
    """A classifier smoothed through a diffusion denoiser (DDS), with Cohen et al.'s CERTIFY and PREDICT.

    classifier: maps a batch of [-1, 1] images [N, C, H, W] to logits [N, num_classes] (put any input
    normalisation inside it, as dk.models.classifier's models do). score_model: the diffusion model, called as
    score_model(x_t, t), returning the `prediction` ("eps", "v", "x0" or "score") with C or 2C channels.
    sigma: the smoothing noise in [0, 1] pixel units; the model runs at t* = dds_timestep(schedule, sigma)
    (attribute ``t``). clip clamps the Tweedie estimate to [-1, 1] (DDS's clip_denoised). dtype, compile and
    backend mean what they mean for dk.DiffAug, which runs the score model here (``self.aug``). denoiser:
    "one-step" (DDS's default: one Tweedie step, pred_xstart) or "multistep" (DDS's multistep option: ancestral
    DDPM sampling from x_t* down to an image, dk.sampling.ddpm_sample over the schedule's first t* steps with the
    learned variance when the model returns 2C channels; like the DDS code, the chain's first step treats x_t*
    as the sample at index t* - 1; t* model calls per sample, so for experiments, not for speed).

    The base classifier f(x) = argmax classifier(clip(tweedie(forward_noise(x, t*)))) is ``forward``; the
    noise comes from the ops' in-kernel Philox stream, so no noise tensor exists. Every method runs under
    torch.inference_mode with the classifier and the score model in eval mode (their modes are restored after).

    Noise streams (all from one Philox key per call, ``seed``; None draws one from torch's default generator):
    in a call on one image, sample j of a draw takes its noise at counter offset base + j * ceil(D / 4), with
    D = C*H*W and base 0 for the selection draw (sample_counts, predict, certify's n0) and 2**62 for certify's
    estimation draw (n). Batches therefore never share counters, and the two draws of certify are independent.
    When D is a multiple of 4 (all the usual image shapes), sample j's noise is row j of
    dk.philox_normal([num, C, H, W], seed, base), whatever the batch size.
    """

    def __init__(self, classifier: Callable[[Tensor], Tensor], score_model: nn.Module, schedule: NoiseSchedule,
                 sigma: float, num_classes: int, prediction: str = "eps", clip: bool = True,
                 dtype: Optional[torch.dtype] = None, compile: bool = False, backend: str = "auto",
                 denoiser: str = "one-step"):
        super().__init__()
        if denoiser not in DENOISERS:
            raise ValueError(f"denoiser must be one of {DENOISERS}, got {denoiser!r}")
        if not callable(classifier):
            raise TypeError(f"classifier must be callable (an nn.Module), got {type(classifier).__name__}")
        if not checks.is_int(num_classes) or int(num_classes) < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.t = dds_timestep(schedule, sigma)
        # DiffAug checks prediction, clip, dtype and backend, and runs the model with the autocast, compile and
        # channels_last settings that DiffAug's users get; its t_range is the single time t*
        self.aug = DiffAug(score_model, schedule, t_range=(self.t, self.t + 1), prediction=prediction, clip=clip,
                           backend=backend, compile=compile, dtype=dtype)
        self.classifier = classifier
        self.schedule = schedule
        self.sigma = float(sigma)
        self.num_classes = int(num_classes)
        self.denoiser = denoiser
        # the multistep chain: the first t* steps of the schedule, so ancestral sampling over all of them starts
        # at index t* - 1, as DDS's `for i in range(t)[::-1]` does
        self._chain = None if denoiser == "one-step" else NoiseSchedule.from_betas(
            schedule.table("betas", dtype=torch.float64).numpy()[:self.t])

    # --- the base classifier
    def _labels(self, x_t: Tensor, t: Tensor, out_dtype: torch.dtype, key: int, offset: int) -> Tensor:
        """argmax of the classifier on the denoised x_t (all rows at t*, drawn with Philox key and counter offset):
        one Tweedie step, or with the multistep denoiser DDS's ancestral chain (its noise keyed by _chain_key)."""
        aug = self.aug
        if self._chain is None:
            x0_hat = ops.tweedie(x_t, aug.denoise(x_t, t), t, self.schedule, aug.prediction, aug.clip,
                                 out_dtype=out_dtype, backend=aug.backend)
        else:
            from .sampling import ddpm_sample

            x0_hat = ddpm_sample(aug, self._chain, tuple(x_t.shape), None, seed=_chain_key(key, offset), x_T=x_t,
                                 clip=aug.clip, prediction=aug.prediction).to(out_dtype)
        logits = self.classifier(x0_hat)
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (x_t.shape[0], self.num_classes):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits [N, num_classes = {self.num_classes}] for N images; "
                             f"for {x_t.shape[0]} images it returned {got}")
        return logits.argmax(1)

    def forward(self, x: Tensor, seed=None) -> Tensor:
        """The base classifier f on a batch [B, C, H, W] in [-1, 1]: one noise draw per image (Philox key seed,
        offset 0), labels [B] (int64)."""
        self._check_image("x", x, batch=True)
        key = _check_seed(seed)
        with torch.inference_mode(), eval_mode(self.classifier, self.aug):
            t = torch.full((x.shape[0],), self.t, dtype=torch.int64, device=x.device)
            x_t = ops.forward_noise(x, t, self.schedule, seed=key, backend=self.aug.backend)
            return self._labels(x_t, t, x.dtype, key, 0)

    # --- Monte-Carlo counts
    def _check_image(self, name: str, x, batch: bool = False) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating-point image tensor in [-1, 1], got {got}")
        shape = tuple(x.shape)
        if batch:
            if x.dim() != 4 or x.shape[0] == 0:
                raise ValueError(f"{name} must be a batch of images [B, C, H, W], got shape {shape}")
            img = x[0]
        elif x.dim() == 4 and x.shape[0] == 1:
            img = x[0]
        elif x.dim() == 3:
            img = x
        else:
            raise ValueError(f"{name} must be one image [C, H, W] (or [1, C, H, W]), got shape {shape}")
        if img.numel() == 0:
            raise ValueError(f"{name} has no pixels: shape {shape}")
        want = getattr(self.aug.model, "in_channels", None)
        if checks.is_int(want) and img.shape[0] != want:
            raise ValueError(f"{name} has {img.shape[0]} channels but the score model takes {want}: shape {shape}")
        return img

    def _counts(self, img: Tensor, num: int, batch_size: int, key: int, base: int) -> np.ndarray:
        C_H_W = tuple(img.shape)
        per_sample = -(-img.numel() // 4)  # counters a sample may touch: ceil(D / 4)
        if num * per_sample >= _DRAW_STRIDE:
            raise ValueError(f"{num} samples of {img.numel()} elements exceed the Philox counter range of a draw")
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=img.device)
        t_full = torch.full((min(batch_size, num),), self.t, dtype=torch.int64, device=img.device)
        one = img.unsqueeze(0)
        for start in range(0, num, batch_size):
            k = min(batch_size, num - start)
            t = t_full[:k]
            # The k copies are a stride-0 view of the one image: forward_noise reads it without a copy (any
            # strides are accepted) and gives exactly forward_noise_multi's numbers (the noise contract: flat
            # logical index), while its kernels spread the k * C planes over all threads / thread blocks;
            # forward_noise_multi runs the K copies of a plane inside one work item, which for a single image
            # leaves only C planes of parallel work. The batch is never materialised beyond x_t itself.
            x_t = ops.forward_noise(one.expand(k, *C_H_W), t, self.schedule, seed=key,
                                    offset=base + start * per_sample, backend=self.aug.backend)
            labels = self._labels(x_t, t, img.dtype, key, base + start * per_sample)
            counts += torch.bincount(labels, minlength=self.num_classes)
        return counts.cpu().numpy()  # the one host sync of the draw

    def sample_counts(self, x: Tensor, num: int, batch_size: int, seed=None) -> np.ndarray:
        """How often the base classifier gives each class over num noise draws of one image x ([C, H, W] or
        [1, C, H, W], in [-1, 1]), batch_size draws per model call: int64 array [num_classes]. The draws are
        those of certify's selection draw (and of predict) with the same seed. With compile=True a last batch
        smaller than batch_size is one more compiled shape; a batch_size dividing num avoids it."""
        img = self._check_image("x", x)
        num, batch_size = _positive_int("num", num), _positive_int("batch_size", batch_size)
        key = _check_seed(seed)
        with torch.inference_mode(), eval_mode(self.classifier, self.aug):
            return self._counts(img, num, batch_size, key, 0)

    # --- Cohen et al.'s algorithms
    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, seed=None):
        """CERTIFY: (label, radius). n0 draws pick the top class c; n fresh, independent draws count it;
        pA = lower_confidence_bound(count, n, alpha). pA < 0.5: (ABSTAIN, 0.0); else (c, sigma * Phi^-1(pA)),
        an L2 radius in [0, 1] pixel units within which g's prediction is c, with probability >= 1 - alpha over
        the draws. seed: the call's Philox key (same seed, same result); None draws one from torch's
        generator."""
        img = self._check_image("x", x)
        n0, n = _positive_int("n0", n0), _positive_int("n", n)
        batch_size = _positive_int("batch_size", batch_size)
        alpha = _check_alpha(alpha)
        key = _check_seed(seed)
        with torch.inference_mode(), eval_mode(self.classifier, self.aug):
            top = int(np.argmax(self._counts(img, n0, batch_size, key, 0)))
            count = int(self._counts(img, n, batch_size, key, _DRAW_STRIDE)[top])
        p_a = lower_confidence_bound(count, n, alpha)
        if p_a < 0.5:
            return ABSTAIN, 0.0
        from scipy.stats import norm  # costly to import: see lower_confidence_bound

        return top, self.sigma * float(norm.ppf(p_a))

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int, seed=None) -> int:
        """PREDICT: the top class of n draws, or ABSTAIN when a two-sided binomial test of the top two counts
        (count1 of count1 + count2, p = 1/2) has a p-value above alpha; the label returned differs from g(x)
        with probability at most alpha."""
        img = self._check_image("x", x)
        n, batch_size = _positive_int("n", n), _positive_int("batch_size", batch_size)
        alpha = _check_alpha(alpha)
        key = _check_seed(seed)
        with torch.inference_mode(), eval_mode(self.classifier, self.aug):
            counts = self._counts(img, n, batch_size, key, 0)
        order = np.argsort(-counts, kind="stable")  # ties: the lower class first
        c1, c2 = int(counts[order[0]]), int(counts[order[1]])
        from scipy.stats import binomtest  # costly to import: see lower_confidence_bound

        if binomtest(c1, c1 + c2, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(order[0])

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, t={self.t}, num_classes={self.num_classes}, denoiser={self.denoiser!r}"


__all__ = ["ABSTAIN", "DENOISERS", "DenoisedSmoothing", "certified_accuracy", "dds_timestep", "lower_confidence_bound"]
