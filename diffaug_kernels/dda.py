"""DDA: diffusion-driven test-time input adaptation (Gao et al., CVPR 2023), and DDA-SE (its self-ensemble).

DDA ("Back to the Source: Diffusion-Driven Test-Time Adaptation", arXiv 2207.03442, official code
github.com/shiyegao/DDA) adapts a test input x (in [-1, 1]) towards the source domain of an unconditional
diffusion model: it noises x part of the way (x_N = q_sample(x, N)), then runs N reverse DDPM steps of a
respaced schedule, and after every step pulls the sample back towards the input's coarse structure with the
gradient of a low-pass image distance, computed through the model's x0 prediction:

    x_{i-1} = mu_theta(x_i, i) + sigma_i z  -  w * grad_{x_i} || phi_D(x) - phi_D(x0_hat(x_i, i)) ||_2

phi_D(v) = up_D(down_D(v)) is the low-pass filter: resize down by the factor D and back up, with the
antialiased cubic resizer DDA uses (ResizeRight). DDA-SE classifies with the average of the softmax on the
adapted and on the original input (the official ``--ensemble sum`` of the two softmax outputs).

Published defaults (the function defaults here), from the official code:

* the model: guided-diffusion's 256x256_diffusion_uncond.pt (``dk.models.ADM_CONFIGS["imagenet256_uncond"]``),
  ``--diffusion_steps 1000 --noise_schedule linear --learn_sigma True`` (image_adapt.sh MODEL_FLAGS), i.e.
  ``dk.NoiseSchedule.linear(1000)`` and the learned ("learned range") variance of the model's second C
  channels for the reverse-step noise (guided-diffusion's LEARNED_RANGE, what create_model_and_diffusion
  picks for learn_sigma=True); clip_denoised=True (image_sample.py default).
* ``--timestep_respacing 100`` -> ``steps=100``: guided-diffusion's space_timesteps / SpacedDiffusion.
* ``--N 50`` -> ``depth=50``: x is noised to respaced index 50 (original t = 505) and 50 reverse steps run at
  respaced indices 49, ..., 0 (original t = 494, 484, ..., 10, 0); exactly DDA's p_sample_loop_progressive,
  which q_samples at t = N and then loops over range(N)[::-1] (so the noise level sits one respaced step above
  the first denoising step).
* ``--D 4`` -> ``down_factor=4``; ``--scale 6`` -> ``guidance_scale=6.0``.
* guidance at every reverse step, including the last (the released gaussian_diffusion.py has no cut-off):
  ``range_t=0``. ``range_t=k`` applies the guidance only at respaced indices i >= k. (An earlier revision of
  DDA's code did not use this gradient guidance: it replaced the sample's low-pass content by the noised
  input's, ILVR's projection, while i > M (``--M``). That variant is not implemented, and ``range_t`` is not
  its ``--M``.)

Where this implementation departs from the official code (all documented at the arguments):

* guidance_norm: the official code takes ONE norm over its whole batch (``th.linalg.norm(difference)`` of the
  [B, C, H, W] tensor), so each image's guidance step shrinks like 1/sqrt(B) and depends on its batch-mates
  (the released script runs batches of 4 per process). The default here, "sample", takes one norm per image:
  the paper's per-image equation, independent of the batch. ``guidance_norm="batch"`` on batches of 4
  reproduces the official runs.
* noise comes from the package's Philox stream (dk.forward_noise / dk.philox_normal), so a seed (or
  torch.manual_seed) makes the adaptation reproducible on every backend.
* the adapted image is returned as a tensor clamped to [-1, 1] (the official script clamps the same way when it
  saves the PNG/JPEG it later classifies; the 8-bit quantisation and JPEG re-encoding are not reproduced).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import ops
from .augment import DiffAug
from .ops import checks
from .schedule import PREDICTIONS, NoiseSchedule
from .utils import eval_mode

__all__ = ["DDA_DEFAULTS", "space_timesteps", "respace", "low_pass", "adapt", "dda_predict", "dda_se_predict"]

# The official DDA settings (image_adapt.sh / image_sample.py of github.com/shiyegao/DDA).
DDA_DEFAULTS = dict(steps=100, depth=50, down_factor=4, guidance_scale=6.0, range_t=0)

GUIDANCE_NORMS = ("sample", "batch")

# Philox counters between the noise draws of successive reverse steps (one counter = 4 normals). A fixed stride,
# not the batch's size, so image b's noise is the same whatever follows it in the batch: with
# guidance_norm="sample", adapt(x)[:k] == adapt(x[:k]) for an elementwise-per-image model.
_STEP_COUNTERS = 2**40


# ------------------------------------------------------------------------------------------ respacing
def space_timesteps(num_timesteps: int, section_counts) -> list:
    """The original timesteps a respaced schedule keeps, ascending: guided-diffusion's space_timesteps.

    section_counts: an int (that many steps, evenly strided over [0, T)), a comma string of per-section
    counts ("100", "10,15,20": T is split into equal sections, each strided evenly, ends included), a
    sequence of counts, or "ddimN" (the integer stride giving exactly N steps: range(0, T, stride))."""
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if isinstance(section_counts, str):
        s = section_counts.strip()
        if s.startswith("ddim"):
            try:
                want = int(s[len("ddim"):])
            except ValueError:
                raise ValueError(f"steps {section_counts!r}: 'ddim' must be followed by a step count") from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == want:
                    return list(range(0, T, stride))
            raise ValueError(f"steps {section_counts!r}: no integer stride gives exactly {want} of {T} steps")
        try:
            counts = [int(v) for v in s.split(",")]
        except ValueError:
            raise ValueError(f"steps must be an int, a comma string of ints like '100' or '10,15,20', or "
                             f"'ddimN', got {section_counts!r}") from None
    elif checks.is_int(section_counts):
        counts = [int(section_counts)]
    elif isinstance(section_counts, (list, tuple)) and section_counts and all(checks.is_int(v) for v in section_counts):
        counts = [int(v) for v in section_counts]
    else:
        raise TypeError(f"steps must be an int, a string like '100' / '10,15,20' / 'ddim50', a sequence of "
                        f"ints, or None, got {section_counts!r}")
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"steps must be positive step counts, got {section_counts!r}")
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"steps {section_counts!r}: cannot take {count} steps from a section of {size} "
                             f"(the schedule has T={T})")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):  # accumulated float and round-half-even, exactly as guided-diffusion
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace(schedule: NoiseSchedule, steps) -> tuple:
    """(respaced schedule, timestep_map): guided-diffusion's SpacedDiffusion.

    The respaced schedule keeps the original timesteps ``space_timesteps(T, steps)`` (steps=None keeps all)
    with betas 1 - abar[t_k] / abar[t_{k-1}], so its alphas_cumprod equal the base schedule's at the kept
    timesteps. timestep_map[i] (int64) is the original t of respaced index i: the model is called with it."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
    T = schedule.num_timesteps
    kept = list(range(T)) if steps is None else space_timesteps(T, steps)
    ac = schedule._np["alphas_cumprod"]
    betas, last = [], 1.0
    for t in kept:
        betas.append(1.0 - ac[t] / last)
        last = ac[t]
    spaced = NoiseSchedule(np.array(betas, dtype=np.float64), name=f"{schedule.name}[{len(kept)} of {T}]")
    return spaced, torch.tensor(kept, dtype=torch.int64)


# ------------------------------------------------------------------------------------------- low-pass
def _cubic(d: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (ResizeRight's ``cubic``, MATLAB's imresize)."""
    a = np.abs(d)
    return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1,
                    np.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0.0))


def _resize_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """[n_out, n_in] matrix of one axis of ResizeRight's resize(..., scale_factors=scale, out_shape=n_out) with
    its defaults, as DDA calls it: cubic kernel, antialiasing when downscaling (kernel stretched by 1/scale),
    half-pixel grid, weights normalised over the whole field of view, zero ('constant') padding outside."""
    eps = float(np.finfo(np.float32).eps)
    support = 4.0
    if scale < 1:
        def kernel(d):
            return scale * _cubic(scale * d)
        support = support / scale
    else:
        kernel = _cubic
    grid = np.arange(n_out) / scale + (n_in - 1) / 2 - (n_out - 1) / (2 * scale)
    left = np.ceil(grid - support / 2 - eps).astype(np.int64)
    taps = left[:, None] + np.arange(math.ceil(support - eps))[None, :]
    w = kernel(grid[:, None] - taps)
    total = w.sum(1, keepdims=True)
    w = w / np.where(total == 0, 1.0, total)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    inside = (taps >= 0) & (taps < n_in)  # taps outside read zero padding: they contribute nothing
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    np.add.at(m, (rows[inside], taps[inside]), w[inside])
    return m


_LP_CACHE: dict = {}


def _lp_matrices(n: int, factor: int, device: torch.device, dtype: torch.dtype):
    key = (n, factor, device, dtype)
    hit = _LP_CACHE.get(key)
    if hit is None:
        small = int(n / factor)  # DDA: int(image_size / D)
        down = _resize_matrix(n, small, 1.0 / factor)
        up = _resize_matrix(small, n, float(factor))
        hit = (torch.from_numpy(down).to(device, dtype), torch.from_numpy(up).to(device, dtype))
        _LP_CACHE[key] = hit
    return hit


def low_pass(x: Tensor, factor: int) -> Tensor:
    """phi_D(x): resize the last two dims down by ``factor`` and back up, with DDA's resizer.

    DDA (image_adapt/guided_diffusion/gaussian_diffusion.py) calls ResizeRight's ``resize`` twice with its
    defaults: the cubic kernel (Keys, a = -0.5), antialiased when shrinking (the kernel stretched by the factor,
    so the down step is a proper low-pass, not a subsampling), half-pixel grid, and zero padding at the image
    border (border pixels lean towards 0, the grey of [-1, 1] images). This is that operator exactly, built once
    per size as two small matrices per axis (a linear, differentiable map). In the interior it equals
    ``F.interpolate(mode="bicubic", antialias=True)`` down then up; only the border handling differs.
    factor=1 is the identity. x: [..., H, W] floating point; returns x's shape and dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype not in checks.DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., H, W], got shape {tuple(x.shape)}")
    if not checks.is_int(factor) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    H, W = x.shape[-2:]
    if factor > min(H, W):
        raise ValueError(f"factor {factor} is larger than the image ({H}x{W}): nothing would be left after "
                         f"resizing down")
    if factor == 1:
        return x.clone()
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    dh, uh = _lp_matrices(H, int(factor), x.device, cd)
    dw, uw = _lp_matrices(W, int(factor), x.device, cd)
    y = torch.matmul(torch.matmul(dh, x.to(cd)), dw.T)  # down: [..., H/D, W/D]
    return torch.matmul(torch.matmul(uh, y), uw.T).to(x.dtype)


# ---------------------------------------------------------------------------------------------- DDA
def check_int(name: str, v, lo: int, hi: int) -> int:
    if not checks.is_int(v):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {int(v)}")
    return int(v)


def _check_seed(seed) -> int:
    if seed is None:  # from torch's default generator: torch.manual_seed makes the run reproducible
        return int(torch.randint(0, 2**63 - 1, ()))
    if isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = int(seed.item())
    if not checks.is_int(seed) or not 0 <= int(seed) < 2**64:
        raise TypeError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
    return int(seed)


def adapt(model: Callable, schedule: NoiseSchedule, x: Tensor, *, steps: Union[int, str, Sequence[int], None] = 100,
          depth: int = 50, down_factor: int = 4, guidance_scale: float = 6.0, range_t: int = 0, seed=None,
          model_kwargs: Optional[dict] = None, learned_sigma: Optional[bool] = None,
          guidance_norm: str = "sample", prediction: str = "eps", clip: bool = True,
          progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """DDA-adapted images: x [B, C, H, W] in [-1, 1] -> same shape and dtype, in [-1, 1].

    model: the diffusion model, called as model(x_t, t, **model_kwargs) with t the ORIGINAL timesteps (int64
        [B]) of schedule, returning the prediction with C channels, or 2C with the learned variance
        (guided-diffusion's learn_sigma); a dk.DiffAug is accepted (its denoise() is called: autocast, compile).
    schedule: the model's base schedule (DDA: dk.NoiseSchedule.linear(1000)).
    steps: the respacing (guided-diffusion's timestep_respacing: an int, "100", "10,15,20", "ddim50"; None =
        no respacing). DDA: 100.
    depth: N, the number of reverse steps: x is noised to respaced index N and denoised at N-1, ..., 0. Must be
        in [1, len(respaced) - 1]. DDA: 50 (noised to t = 505 of 1000, then t = 494, ..., 10, 0).
    down_factor: D of the low-pass filter phi_D (see low_pass). DDA: 4.
    guidance_scale: w, the step size of the low-pass guidance (0 turns it off: plain DDPM from x_N). DDA: 6.
        The step is w times the gradient of a norm (a unit vector pulled back through d x0_hat / d x_t), so
        its size per pixel shrinks like 1 / sqrt(C H W): 6 is DDA's value for 3x256x256 inputs; much smaller
        images need a smaller w (or the steps overshoot).
    range_t: guidance only at respaced indices i >= range_t. DDA: 0 (every step).
    seed: the Philox seed of all noise (int or None: drawn from torch's default generator).
    model_kwargs: extra model arguments (e.g. y=labels for a class-conditional model).
    learned_sigma: None = decide from the model's output channels (2C: learned range variance, as
        guided-diffusion's LEARNED_RANGE; C: its default FIXED_LARGE variance). True requires 2C channels;
        False ignores the second half and uses FIXED_LARGE. DDA: True (256x256_diffusion_uncond).
    guidance_norm: "sample" (default): one norm per image, the paper's equation, independent of the batch.
        "batch": one norm over the whole batch, as the official code computes it (its runs used batches of 4).
    prediction: what the model predicts ("eps" for ADM; "v", "x0", "score" as in dk.tweedie).
    clip: clamp x0_hat to [-1, 1] before the posterior mean and the guidance (DDA: clip_denoised=True).
    progress: called as progress(steps done, depth) after each reverse step (one call can take minutes).

    Runs under torch.no_grad except the guidance gradient, which flows through the model (one forward and one
    backward pass of the model per guided step). The model runs in eval mode (every submodule's mode is restored
    afterwards), as the classifier does in dda_predict and dda_se_predict.
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, **model_kwargs), got {type(model).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    if x.dtype not in checks.DTYPES:
        raise TypeError(f"x has unsupported dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one image")
    spaced, tmap = respace(schedule, steps)
    S = spaced.num_timesteps
    if S < 2:
        raise ValueError(f"steps={steps!r} keeps {S} timestep; DDA needs at least 2 (depth >= 1 reverse step "
                         f"from the noise level one respaced step above)")
    depth = check_int("depth", depth, 1, S - 1)
    range_t = check_int("range_t", range_t, 0, depth)
    B, C, H, W = x.shape
    if not checks.is_int(down_factor) or down_factor < 1:
        raise ValueError(f"down_factor must be a positive integer, got {down_factor!r}")
    if down_factor > min(H, W):
        raise ValueError(f"down_factor {down_factor} is larger than the image ({H}x{W})")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if guidance_norm not in GUIDANCE_NORMS:
        raise ValueError(f"guidance_norm must be one of {GUIDANCE_NORMS}, got {guidance_norm!r}")
    if learned_sigma not in (None, True, False):
        raise TypeError(f"learned_sigma must be None, True or False, got {learned_sigma!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    seed = _check_seed(seed)
    run = model.denoise if isinstance(model, DiffAug) else model

    # The guidance needs autograd even when the caller runs under torch.inference_mode (a common evaluation
    # setting): leave inference mode for the adaptation, with a normal copy of an inference-mode input.
    with torch.inference_mode(False), torch.no_grad(), eval_mode(model):
        if x.is_inference():
            x = x.clone()
        model_kwargs = {k: v.clone() if isinstance(v, Tensor) and v.is_inference() else v
                        for k, v in model_kwargs.items()}
        return _adapt(run, schedule, spaced, tmap, x, depth, int(down_factor), float(guidance_scale), range_t,
                      seed, model_kwargs, learned_sigma, guidance_norm, prediction, clip, progress)


def _adapt(run, schedule, spaced, tmap, x, depth, factor, scale, range_t, seed, model_kwargs, learned_sigma,
           guidance_norm, prediction, clip, progress=None):
    B, C = x.shape[:2]
    device = x.device
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    ref = x.to(cd)

    # The respaced chain's tables (float64, per respaced index), as guided-diffusion's GaussianDiffusion.
    b = spaced._np["betas"]
    ac = spaced._np["alphas_cumprod"]
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))  # "clipped": post_var[0] = 0
    fixed_large_logvar = np.log(np.append(post_var[1], b[1:]))  # FIXED_LARGE (learn_sigma=False default)
    log_b = np.log(b)
    coef_x0 = b * np.sqrt(ac_prev) / (1.0 - ac)
    coef_xt = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
    a_tab, b_tab = (t.numpy() for t in spaced.x0_coefficients(prediction, dtype=torch.float64))

    # x_N = q_sample(x, N): the respaced abar at index N is the base one at original t = tmap[N].
    if ref.numel() > 4 * _STEP_COUNTERS:
        raise ValueError(f"x has {ref.numel()} elements; at most {4 * _STEP_COUNTERS} per call")
    x_t = ops.forward_noise(ref, int(tmap[depth]), schedule, seed=seed, offset=0)
    lp_ref = low_pass(ref, factor) if scale > 0 else None
    tmap_dev = tmap.to(device)

    for k, i in enumerate(range(depth - 1, -1, -1)):
        t_model = tmap_dev[i].expand(B)
        guided = scale > 0 and i >= range_t
        with torch.enable_grad() if guided else contextlib.nullcontext():
            x_in = x_t.detach().requires_grad_(guided)
            out = run(x_in, t_model, **model_kwargs)
            if k == 0:
                learned = _check_output(out, x_t, learned_sigma)
            out = out.to(cd)
            x0 = float(a_tab[i]) * x_in + float(b_tab[i]) * out[:, :C]
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
            if guided:
                diff = lp_ref - low_pass(x0, factor)
                if guidance_norm == "sample":
                    dist = torch.linalg.vector_norm(diff.flatten(1), dim=1).sum()
                else:
                    dist = torch.linalg.vector_norm(diff)
                (grad,) = torch.autograd.grad(dist, x_in)
        x0 = x0.detach()
        x_next = float(coef_x0[i]) * x0 + float(coef_xt[i]) * x_t  # posterior mean of x_{i-1}
        if i > 0:
            if learned:
                frac = (out[:, C:].detach() + 1) / 2  # [-1, 1] -> between the posterior and beta variances
                logvar = frac * float(log_b[i]) + (1 - frac) * float(post_logvar[i])
                std = torch.exp(0.5 * logvar)
            else:
                std = math.exp(0.5 * float(fixed_large_logvar[i]))
            z = ops.philox_normal(ref.shape, seed, offset=(k + 1) * _STEP_COUNTERS, device=device, dtype=cd)
            x_next = x_next + std * z
        if guided:
            x_next = x_next - scale * grad
        x_t = x_next
        if progress is not None:
            progress(k + 1, depth)
    return x_t.clamp(-1.0, 1.0).to(x.dtype)


def check_model_output(out, x_t: Tensor) -> None:
    """A score model's output for x_t [B, C, H, W]: a tensor [B, C or 2C, H, W] (TypeError / ValueError)."""
    B, C = x_t.shape[:2]
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
    if out.dim() != 4 or out.shape[0] != B or out.shape[2:] != x_t.shape[2:] or out.shape[1] not in (C, 2 * C):
        raise ValueError(f"the model output must have shape [B, C or 2C, H, W] = [{B}, {C} or {2 * C}, "
                         f"{x_t.shape[2]}, {x_t.shape[3]}], got {tuple(out.shape)}")


def _check_output(out, x_t: Tensor, learned_sigma: Optional[bool]) -> bool:
    """Checks the model's first output; True when its second half is a learned variance to use."""
    check_model_output(out, x_t)
    C = x_t.shape[1]
    if learned_sigma is True and out.shape[1] != 2 * C:
        raise ValueError(f"learned_sigma=True needs a model with 2C = {2 * C} output channels (learn_sigma), "
                         f"but it returned {out.shape[1]}")
    return out.shape[1] == 2 * C if learned_sigma is None else bool(learned_sigma)


# ----------------------------------------------------------------------------------------- DDA-SE
def _probs(classifier, pre, v: Tensor) -> Tensor:
    return torch.softmax(classifier(pre(v)).float(), dim=-1)


def _check_classifier(classifier, preprocess):
    if not callable(classifier):
        raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be callable or None, got {type(preprocess).__name__}")
    return preprocess or (lambda v: v)


def dda_predict(classifier: Callable[[Tensor], Tensor], model: Callable, schedule: NoiseSchedule, x: Tensor,
                preprocess: Optional[Callable[[Tensor], Tensor]] = None, **adapt_kwargs) -> Tensor:
    """DDA: softmax(classifier(preprocess(adapt(model, schedule, x, **adapt_kwargs)))), [B, num_classes].

    classifier returns logits; preprocess maps [-1, 1] images to the classifier's input (e.g. resize and
    ImageNet normalisation); None passes the images as they are."""
    pre = _check_classifier(classifier, preprocess)
    adapted = adapt(model, schedule, x, **adapt_kwargs)
    with torch.no_grad(), eval_mode(classifier):
        return _probs(classifier, pre, adapted)


def dda_se_predict(classifier: Callable[[Tensor], Tensor], model: Callable, schedule: NoiseSchedule, x: Tensor,
                   preprocess: Optional[Callable[[Tensor], Tensor]] = None, return_components: bool = False,
                   **adapt_kwargs):
    """DDA-SE (self-ensemble): the mean of the softmax on the DDA-adapted and on the original images.

    This is the official DDA evaluation (model_adapt/test_ensemble.py with ``--ensemble sum`` in test.sh:
    the sum of mmcls' softmax outputs for the two images, the same argmax as this mean) and the DiffAug paper's
    "average of DDA-adapted and original predictions". return_components=True returns (mean, p_adapted,
    p_original), so DDA and DDA-SE come from one adaptation."""
    pre = _check_classifier(classifier, preprocess)
    adapted = adapt(model, schedule, x, **adapt_kwargs)
    with torch.no_grad(), eval_mode(classifier):
        p_adapted = _probs(classifier, pre, adapted)
        p_original = _probs(classifier, pre, x)
    mean = 0.5 * (p_adapted + p_original)
    return (mean, p_adapted, p_original) if return_components else mean
