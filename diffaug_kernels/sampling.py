"""Samplers: DDIM and ancestral DDPM over a respaced schedule, with classifier guidance (guided-diffusion's).

Both follow openai/guided-diffusion's GaussianDiffusion / SpacedDiffusion (respace.py, gaussian_diffusion.py):

* respacing: ``space_timesteps(T, steps)`` keeps some original timesteps ("100", "10,15,20", "ddim50");
  the respaced chain has betas 1 - abar[t_k] / abar[t_{k-1}], and at respaced index i the model and the
  classifier are called with the ORIGINAL timestep timestep_map[i] (int64), as guided-diffusion's released
  models expect (rescale_timesteps=False).
* every reverse step is ``x_prev = c1 * x0_hat + c2 * x_t + sigma * z + shift`` (``reverse_step``, the fused op
  dk.reverse_step with z drawn in-kernel): x0_hat is the model's clipped estimate (dk.tweedie on the respaced
  tables), (c1, c2, sigma) come from per-step tables (``ddim_coefficients``, ``ddpm_coefficients``) and shift is
  the guidance term.
* DDIM (``ddim_sample``): c1 = sqrt(abar_prev) - k sqrt(abar) / sqrt(1 - abar), c2 = k / sqrt(1 - abar) with
  k = sqrt(1 - abar_prev - sigma^2), sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev):
  DDIM's equation 12 written in (x0_hat, x_t). Guidance is condition_score (Song et al.): eps becomes
  eps - sqrt(1 - abar) g, i.e. x0_hat moves by (1 - abar) / sqrt(abar) g, so shift = c1 (1 - abar) / sqrt(abar) g.
* DDPM (``ddpm_sample``): c1, c2 are the posterior-mean coefficients; the variance is the model's learned range
  (2C output channels: exp(frac log beta + (1 - frac) log posterior_variance), frac = (v + 1) / 2), else the
  fixed "large" one (beta, with posterior_variance[1] at i = 0: guided-diffusion's default for learn_sigma=False,
  sigma_small=False) or "small" (the posterior variance). Guidance is condition_mean (Sohl-Dickstein et al.):
  shift = variance * g, at every step including the last, where no noise is added.
* g = classifier_scale * grad_x log softmax(classifier(x_t, t_original))[y], taken at x_t (classifier_sample.py's
  cond_fn).

Noise (docs/design.md section 5): one Philox key per call (``seed``; None draws one from torch's generator);
DDPM's x_T, when not given, is philox_normal(shape, seed, offset=0); the noise of the k-th reverse step
(k = 0, 1, ...) is philox_normal(shape, seed, offset=(k + 1) * STEP_COUNTERS). The streams never overlap, and
an image's noise does not depend on the batch after it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import ops
from .augment import DiffAug, cpu_kernel_fused, measurable, norm_copy
from .dda import check_model_output, respace, space_timesteps
from .ops import checks
from .schedule import PREDICTIONS, NoiseSchedule
from .utils import Progress, eval_mode

__all__ = ["STEP_COUNTERS", "VARIANCES", "ddim_coefficients", "ddim_sample", "ddpm_coefficients", "ddpm_sample",
           "respace", "reverse_step", "space_timesteps"]

# Philox counters between the noise streams of successive reverse steps (one counter = 4 normals): a fixed
# stride, not the batch's size, so image b's noise is the same whatever follows it in the batch. dk.dda uses it too.
STEP_COUNTERS = 2**40

VARIANCES = ("learned", "fixed_large", "fixed_small")


# ---------------------------------------------------------------------------------------- the reverse step
def reverse_step(x0_hat: Tensor, x_t: Tensor, c1, c2, sigma=None, z: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None, seed=None, offset=0) -> Tensor:
    """x_prev = c1 * x0_hat + c2 * x_t + sigma * z + shift: one reverse step of DDIM or DDPM.

    c1, c2: numbers or per-sample tensors; sigma: the noise's standard deviation (a number, or a tensor of x_t's
    shape: the learned variance; None: no noise); shift: the guidance term. Without z this is the fused op
    dk.reverse_step, z = philox_normal(x_t.shape, seed, offset) drawn in-kernel (the samplers' path), in x_t's
    dtype. With z, noise from elsewhere, the same update in plain PyTorch (sigma * z added only with both)."""
    if z is None:
        return ops.reverse_step(x0_hat, x_t, c1, c2, sigma, shift, seed=seed, offset=offset)
    out = c1 * x0_hat + c2 * x_t
    if sigma is not None:
        out = out + sigma * z
    if shift is not None:
        out = out + shift
    return out


def ddim_coefficients(spaced: NoiseSchedule, eta: float = 0.0) -> dict:
    """Per-step float64 tables of DDIM on a (respaced) schedule: c1, c2, sigma (x_prev = c1 x0_hat + c2 x_t +
    sigma z) and guide, the factor of the classifier gradient in x_prev (condition_score)."""
    ac = spaced.alphas_cumprod.numpy()
    ac_prev = np.append(1.0, ac[:-1])
    sigma = eta * np.sqrt((1 - ac_prev) / (1 - ac)) * np.sqrt(1 - ac / ac_prev)
    k = np.sqrt(np.maximum(1 - ac_prev - sigma**2, 0.0))
    c1 = np.sqrt(ac_prev) - k * np.sqrt(ac) / np.sqrt(1 - ac)
    c2 = k / np.sqrt(1 - ac)
    return {"c1": c1, "c2": c2, "sigma": sigma, "guide": c1 * (1 - ac) / np.sqrt(ac)}


def ddpm_coefficients(spaced: NoiseSchedule) -> dict:
    """Per-step float64 tables of ancestral DDPM on a (respaced) schedule (guided-diffusion's GaussianDiffusion):
    c1, c2 (the posterior mean's coefficients of x0_hat and x_t), log_beta and posterior_logvar (the two ends of
    the learned range; the posterior's log variance clipped at i = 0), and per fixed variance ("fixed_large",
    "fixed_small") its variance and log variance."""
    if spaced.num_timesteps < 2:
        raise ValueError("DDPM needs a chain of at least 2 steps (its variances at i = 0 come from i = 1)")
    b = spaced.betas.numpy()
    ac = spaced.alphas_cumprod.numpy()
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1 - ac_prev) / (1 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    large = np.append(post_var[1], b[1:])
    return {"c1": b * np.sqrt(ac_prev) / (1 - ac), "c2": (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac),
            "log_beta": np.log(b), "posterior_logvar": post_logvar,
            "fixed_large": (large, np.log(large)), "fixed_small": (post_var, post_logvar)}


# ------------------------------------------------------------------------------------------------ checks
def _check_model(model, schedule: NoiseSchedule, compile: bool, dtype) -> Callable:
    """model(x_t, t, **kw) under the autocast and compile policy of dk.DiffAug (a DiffAug brings its own)."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t), got {type(model).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if isinstance(model, DiffAug):
        if compile or dtype is not None:
            raise ValueError("a dk.DiffAug model brings its own dtype and compile settings: leave dtype=None, "
                             "compile=False")
        return model
    return DiffAug(model, schedule, compile=compile, dtype=dtype)


def _class_conditional(model) -> bool:
    net = model.model if isinstance(model, DiffAug) else model
    return getattr(net, "num_classes", None) is not None


def _real(name: str, v, lo: float, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not lo <= float(v) <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {v!r}")
    return float(v)


def _check_numel(n: int) -> None:
    if n > 4 * STEP_COUNTERS:  # one step's noise must fit in its stream
        raise ValueError(f"a batch of {n} elements is too large; at most {4 * STEP_COUNTERS} per call")


def _check_x(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, C, H, W] with B >= 1, got {tuple(x.shape)}")
    if x.dtype not in checks.DTYPES:
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    _check_numel(x.numel())


class _Setup:
    """What both samplers check and prepare: the respaced chain, the model and classifier runners, y."""

    def __init__(self, model, schedule, B: int, device: torch.device, steps, clip, prediction, classifier,
                 classifier_scale, y, dtype, compile, progress, name):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not isinstance(clip, bool):
            raise TypeError(f"clip must be True or False, got {clip!r}")
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress must be True, False or a callable progress(done, total), got {progress!r}")
        self.runner = _check_model(model, schedule, compile, dtype)
        self.spaced, self.tmap = respace(schedule, steps)
        self.tmap = self.tmap.to(device)
        self.prediction, self.clip, self.name, self.progress = prediction, clip, name, progress
        self.model_kwargs = {}
        if y is not None:
            if not isinstance(y, Tensor) or y.shape != (B,) or y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(f"y must be an integer tensor of shape [{B}] (one label per image), got "
                                 f"{y.dtype if isinstance(y, Tensor) else type(y).__name__} "
                                 f"{tuple(y.shape) if isinstance(y, Tensor) else ''}")
            y = y.to(device, torch.int64)
            if y.is_inference():  # a normal copy: the guidance's autograd runs outside inference mode
                with torch.inference_mode(False):
                    y = y.clone()
        if _class_conditional(self.runner):
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y of shape [B]")
            self.model_kwargs["y"] = y
        self.classifier = self.classifier_fused = None
        if classifier is not None:
            if not callable(classifier):
                raise TypeError(f"classifier must be callable as classifier(x_t, t) -> logits, got "
                                f"{type(classifier).__name__}")
            if y is None:
                raise ValueError("classifier guidance needs the target labels y of shape [B]")
            self.scale = _real("classifier_scale", classifier_scale, 0.0)
            self.classifier = classifier
            self.classifier_fused = fused_classifier(classifier, device) if compile else None
            run = classifier if self.classifier_fused is None else self.classifier_fused
            self.classifier_run = torch.compile(run) if compile else run
            self.dtype, self.compile = dtype, compile
        self.y = y

    def modules(self):
        return [m for m in (self.runner, self.classifier, self.classifier_fused) if m is not None]

    def denoise(self, x_t: Tensor, i: int) -> tuple:
        """(x0_hat, model output) at respaced index i; x0_hat clipped as asked, in x_t's dtype."""
        t = self.tmap[i].expand(x_t.shape[0])
        out = self.runner.denoise(x_t, t, **self.model_kwargs)
        if i == self.spaced.num_timesteps - 1:
            check_model_output(out, x_t)
        x0 = ops.tweedie(x_t, out, i, self.spaced, self.prediction, self.clip, out_dtype=x_t.dtype)
        return x0, out

    def gradient(self, x_t: Tensor, i: int) -> Tensor:
        """classifier_scale * grad_x log softmax(classifier(x_t, t))[y], t the original timestep."""
        t = self.tmap[i].expand(x_t.shape[0])
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            inp = x_in.contiguous(memory_format=torch.channels_last) if self.compile else x_in
            if self.dtype is not None and self.dtype != torch.float32:
                with torch.autocast(x_t.device.type, dtype=self.dtype):
                    logits = self.classifier_run(inp, t)
            else:
                logits = self.classifier_run(inp, t)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x_t.shape[0]:
                raise ValueError(f"the classifier must return logits of shape [B, num_classes], got "
                                 f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
            if i == self.spaced.num_timesteps - 1 and not 0 <= int(self.y.min()) <= int(self.y.max()) < logits.shape[1]:
                raise ValueError(f"y must lie in [0, {logits.shape[1]}) (the classifier's classes)")
            log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probs.gather(1, self.y.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return grad.to(x_t.dtype) * self.scale

    def steps(self):
        """(k, i): the k-th reverse step runs at respaced index i = S - 1 - k, with progress shown."""
        S = self.spaced.num_timesteps
        bar = Progress(S, desc=self.name, unit="step", bar=True) if self.progress is True else None
        try:
            for k in range(S):
                yield k, S - 1 - k
                if bar is not None:
                    bar.update()
                elif callable(self.progress):
                    self.progress(k + 1, S)
        finally:
            if bar is not None:
                bar.close()


def fused_classifier(classifier, device: torch.device) -> Optional[torch.nn.Module]:
    """What a compiled guidance classifier runs, as dk.DiffAug(fused_norm=None) decides for the score model: on
    the CPU, where the C++ kernel is built, a copy of a classifier with set_fused_norm (EncoderUNet) running its
    norm + SiLU pairs as dk.group_norm_silu, sharing its parameters; None: the classifier itself."""
    if (device.type != "cpu" or not isinstance(classifier, torch.nn.Module) or not measurable(classifier)
            or getattr(classifier, "fused_norm", None) is not False or not cpu_kernel_fused()):
        return None
    return norm_copy(classifier, True)


def _run(setup: _Setup, x: Optional[Tensor], body) -> Tensor:
    """body(x) under no_grad (out of inference mode, so guidance has autograd), modules in eval mode."""
    with torch.inference_mode(False), torch.no_grad(), eval_mode(*setup.modules()):
        if x is not None and x.is_inference():
            x = x.clone()
        return body(x)


# -------------------------------------------------------------------------------------------------- DDIM
def ddim_sample(model, schedule: NoiseSchedule, x_T: Tensor, steps: Union[int, str, None],
                eta: float = 0.0, clip: bool = True, prediction: str = "eps", classifier=None,
                classifier_scale: float = 1.0, y: Optional[Tensor] = None, dtype=None, compile: bool = False,
                progress=False, seed=None) -> Tensor:
    """DDIM samples from x_T [B, C, H, W]: guided-diffusion's ddim_sample_loop (and, with a classifier, its
    classifier_sample.py with use_ddim), returned in x_T's dtype, not clamped.

    model: called as model(x_t, t) (plus y= for a class-conditional ADM UNet) with t the original timesteps
        (int64 [B]); returns the prediction ("eps", "x0", "v" or "score") with C or 2C channels (the second
        half, a learned variance, is unused by DDIM). A dk.DiffAug runs through its denoise (its dtype, compile).
    steps: the respacing of schedule: an int, "100", "10,15,20", "ddimN" or a sequence of counts; None keeps
        every timestep. eta: DDIM's noise level in [0, 1] (0: deterministic). clip: clamp x0_hat to [-1, 1].
    classifier: classifier(x_t, t) -> logits [B, K]; guides towards labels y [B] with classifier_scale times
        grad log p(y | x_t) by condition_score. y also goes to a class-conditional model.
    dtype: autocast dtype of the model and the classifier (e.g. torch.bfloat16); compile: torch.compile them
        (as dk.DiffAug; on the CPU both run their norm + SiLU pairs fused, see fused_classifier). progress: True
        shows a bar; a callable is called as progress(done, total).
    seed: the Philox key of the noise when eta > 0 (None: drawn from torch's generator).
    The chain runs in float32 (float64 for a float64 x_T); models run in eval mode and under no_grad."""
    _check_x("x_T", x_T)
    eta = _real("eta", eta, 0.0, 1.0)
    setup = _Setup(model, schedule, x_T.shape[0], x_T.device, steps, clip, prediction, classifier, classifier_scale,
                   y, dtype, compile, progress, "DDIM")
    seed_t = checks.as_seed("seed", seed, x_T.device) if eta > 0 or seed is not None else None
    coef = ddim_coefficients(setup.spaced, eta)
    cd = torch.float64 if x_T.dtype == torch.float64 else torch.float32

    def body(x):
        x = x.to(cd)
        for k, i in setup.steps():
            x0, _ = setup.denoise(x, i)
            shift = float(coef["guide"][i]) * setup.gradient(x, i) if setup.classifier is not None else None
            sigma = float(coef["sigma"][i]) if i > 0 and eta > 0 else None  # noise from offset (k + 1) * STEP_COUNTERS
            x = reverse_step(x0, x, float(coef["c1"][i]), float(coef["c2"][i]), sigma, shift=shift, seed=seed_t,
                             offset=(k + 1) * STEP_COUNTERS)
        return x.to(x_T.dtype)

    return _run(setup, x_T, body)


# -------------------------------------------------------------------------------------------------- DDPM
def ddpm_sample(model, schedule: NoiseSchedule, shape, steps: Union[int, str, None], seed=None,
                x_T: Optional[Tensor] = None, clip: bool = True, prediction: str = "eps", classifier=None,
                classifier_scale: float = 1.0, y: Optional[Tensor] = None, variance: Optional[str] = None,
                device=None, dtype=None, compile: bool = False, progress=False) -> Tensor:
    """Ancestral (DDPM) samples of shape [B, C, H, W]: guided-diffusion's p_sample_loop (and, with a classifier,
    classifier_sample.py), in float32 (x_T's dtype when given), not clamped.

    seed: the Philox key of all the noise (None: drawn from torch's generator, so torch.manual_seed makes a run
        reproducible); x_T (default: philox_normal(shape, seed, 0)) and each step's z come from it.
    variance: None picks "learned" (the learned range of the model's second C channels) when the model returns
        2C channels, else "fixed_large" (guided-diffusion's default for learn_sigma=False); "fixed_small" is its
        sigma_small=True. Guidance is condition_mean: the mean moves by variance * classifier_scale * grad.
    device: where x_T is drawn (default: the model's parameters' device, else the CPU).
    The other arguments are ddim_sample's."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 4 or not all(checks.is_int(s) for s in shape):
        raise ValueError(f"shape must be four integers [B, C, H, W], got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if min(shape) < 1:
        raise ValueError(f"shape must be positive sizes, got {shape}")
    if variance not in (None, *VARIANCES):
        raise ValueError(f"variance must be None or one of {VARIANCES}, got {variance!r}")
    if x_T is not None:
        _check_x("x_T", x_T)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}")
        device = x_T.device
    elif device is None:
        net = model.model if isinstance(model, DiffAug) else model
        param = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    _check_numel(math.prod(shape))
    setup = _Setup(model, schedule, shape[0], device, steps, clip, prediction, classifier, classifier_scale, y,
                   dtype, compile, progress, "DDPM")
    coef = ddpm_coefficients(setup.spaced)
    seed_t = checks.as_seed("seed", seed, device)
    cd = torch.float64 if x_T is not None and x_T.dtype == torch.float64 else torch.float32
    C = shape[1]

    def body(x):
        x = (x if x is not None else ops.philox_normal(shape, seed_t, 0, device=device, dtype=cd)).to(cd)
        learned = None
        for k, i in setup.steps():
            x0, out = setup.denoise(x, i)
            if learned is None:
                learned = variance == "learned" or (variance is None and out.shape[1] == 2 * C)
                if learned and out.shape[1] != 2 * C:
                    raise ValueError(f"variance='learned' needs a model with 2C = {2 * C} output channels, but it "
                                     f"returned {out.shape[1]}")
            if learned:
                frac = (out[:, C:].to(cd) + 1) / 2  # [-1, 1] -> between the posterior and beta variances
                logvar = frac * float(coef["log_beta"][i]) + (1 - frac) * float(coef["posterior_logvar"][i])
                var, sigma = torch.exp(logvar), torch.exp(0.5 * logvar)
            else:
                var_tab, logvar_tab = coef[variance or "fixed_large"]
                var, sigma = float(var_tab[i]), math.exp(0.5 * float(logvar_tab[i]))
            shift = var * setup.gradient(x, i) if setup.classifier is not None else None
            x = reverse_step(x0, x, float(coef["c1"][i]), float(coef["c2"][i]), sigma if i > 0 else None,
                             shift=shift, seed=seed_t, offset=(k + 1) * STEP_COUNTERS)
        return x.to(x_T.dtype if x_T is not None else cd)

    return _run(setup, x_T, body)
