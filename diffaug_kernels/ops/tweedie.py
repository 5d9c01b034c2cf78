"""tweedie: the one-step (Tweedie) denoised estimate x0_hat from x_t and a model output, with clipping, the
learned-sigma channel split, the classifier's normalisation and the dtype cast in one pass.

The public wrapper checks its arguments and picks a backend; the fused backends run through one custom op,
diffaug_kernels::tweedie, with a fake kernel (torch.compile) and an autograd formula.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import constants
from ..schedule import PREDICTIONS, NoiseSchedule
from . import reference
from .checks import as_times, check_out_dtype, check_schedule, check_tensor
from .dispatch import alloc, auto_pick, backend_for, direct_call, empty_out, kernels, launch, resolve_backend
from .reference import compute_dtype, per_sample

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tweedie_impl(x_t: Tensor, model_output: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, clip: bool,
                 scale: Optional[Tensor], shift: Optional[Tensor], out_dtype: torch.dtype, backend: str) -> Tensor:
    """The op's body: the backend's kernel into a fresh output (the custom op calls it; so does a plain eager
    call, without the dispatch: dispatch.direct_call)."""
    out = alloc(x_t, x_t.shape[0], out_dtype)
    if out.numel():
        launch(x_t.device, backend, kernels(backend).tweedie_out, x_t, model_output, t, coef_a, coef_b, clip,
                scale, shift, out)
    return out


@torch.library.custom_op("diffaug_kernels::tweedie", mutates_args=())
def tweedie_op(x_t: Tensor, model_output: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, clip: bool,
                scale: Optional[Tensor], shift: Optional[Tensor], out_dtype: torch.dtype, backend: str) -> Tensor:
    """out = clip(coef_a[t] * x_t + coef_b[t] * model_output) * scale[c] + shift[c]; model_output has x_t's shape."""
    return tweedie_impl(x_t, model_output, t, coef_a, coef_b, clip, scale, shift, out_dtype, backend)


@tweedie_op.register_fake
def _(x_t, model_output, t, coef_a, coef_b, clip, scale, shift, out_dtype, backend):
    return empty_out(x_t, x_t.shape[0], out_dtype)


def _tweedie_setup(ctx, inputs, output):
    x_t, m, t, coef_a, coef_b, clip, scale = inputs[:7]
    ctx.save_for_backward(x_t, m, t, coef_a, coef_b, scale)
    ctx.clip = clip


def _tweedie_backward(ctx, grad):
    x_t, m, t, coef_a, coef_b, scale = ctx.saved_tensors
    cd = coef_a.dtype
    a, b = per_sample(coef_a, t, x_t.dim()), per_sample(coef_b, t, x_t.dim())
    g = grad.to(cd)
    if scale is not None:
        g = g * scale.reshape(1, -1, *([1] * (x_t.dim() - 2)))
    if ctx.clip:  # zero where the clamp is active, bounds and NaN included (as the reference)
        ax = torch.where(a == 0, 0, a * x_t.to(cd))  # x0 prediction ignores x_t, as the kernels do
        y = ax + b * m.to(cd)
        g = g * ((y > -1) & (y < 1)).to(cd)
    return (a * g).to(x_t.dtype), (b * g).to(m.dtype), None, None, None, None, None, None, None, None


tweedie_op.register_autograd(_tweedie_backward, setup_context=_tweedie_setup)


# ---------------------------------------------------------------------------------------------- public
def _static_float(v) -> float:
    """float(v) as a Python constant even under torch.compile(dynamic=True), where Dynamo makes a float read
    from a global (dk.IMAGENET_NORM) symbolic, and math.isfinite or a cache key of it would not trace. The
    round trip through float.hex specialises it (Dynamo guards on the value); the value is unchanged."""
    return float.fromhex(float(v).hex())


def _norm_affine(normalize, C: int, device: torch.device, dtype: torch.dtype):
    """(x + 1) / 2 then (x - mean) / std, folded to x * scale + shift, per channel."""
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise TypeError(f"normalize must be (mean, std), two sequences of {C} numbers, got {normalize!r}") from None
    if torch.compiler.is_compiling() and (isinstance(mean, Tensor) or isinstance(std, Tensor)):
        # the values become per-channel constants, read on the host: a graph cannot read a tensor's values
        raise TypeError("inside torch.compile, give normalize's mean and std as sequences of Python floats, "
                        "not tensors (e.g. normalize=(mean.tolist(), std.tolist()) outside the compiled code)")
    try:
        mean = [_static_float(v) for v in (mean.tolist() if isinstance(mean, Tensor) else mean)]
        std = [_static_float(v) for v in (std.tolist() if isinstance(std, Tensor) else std)]
    except (TypeError, ValueError):
        raise TypeError(f"normalize must be (mean, std), two sequences of {C} numbers, got {normalize!r}") from None
    if len(mean) != C or len(std) != C:
        raise ValueError(f"normalize needs {C} means and stds (one per channel), got {len(mean)} and {len(std)}")
    if any(s == 0 or not math.isfinite(s) for s in std):
        raise ValueError(f"normalize std must be finite and non-zero, got {std}")
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"normalize mean must be finite, got {mean}")
    args, device = (tuple(mean), tuple(std)), torch.device(device)
    return (constants.device_constant("norm_scale", args, device, dtype),
            constants.device_constant("norm_shift", args, device, dtype))


def _norm_values(mean: tuple, std: tuple, shift: bool) -> Tensor:
    """(x + 1) / 2 then (x - mean) / std is x * scale + shift with scale = 0.5 / std, shift = (0.5 - mean) / std."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return (0.5 - m) / s if shift else 0.5 / s


constants.register("norm_scale", lambda mean, std: _norm_values(mean, std, False))
constants.register("norm_shift", lambda mean, std: _norm_values(mean, std, True))


def tweedie(x_t: Tensor, model_output: Tensor, t, schedule: NoiseSchedule, prediction: str = "eps",
            clip: bool = True, normalize=None, out_dtype=None, backend: str = "auto") -> Tensor:
    """x0_hat, the one-step (Tweedie) denoised estimate, from x_t [B, C, ...] and the model's output.

    prediction: "eps" | "v" | "x0" | "score". model_output may carry 2C channels (learned sigma): only the
    first C are read, without a copy. clip clamps x0_hat to [-1, 1]. normalize=(mean, std) also applies
    (x + 1) / 2 then (x - mean) / std per channel (dk.IMAGENET_NORM), ready for a classifier."""
    check_tensor("x_t", x_t, min_dim=2)
    check_tensor("model_output", model_output, min_dim=2)
    schedule = check_schedule(schedule)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    B, C = x_t.shape[:2]
    if model_output.device != x_t.device:
        raise ValueError(f"model_output is on {model_output.device} but x_t is on {x_t.device}")
    if (model_output.dim() != x_t.dim() or model_output.shape[0] != B or model_output.shape[2:] != x_t.shape[2:]
            or model_output.shape[1] not in (C, 2 * C)):
        raise ValueError(f"model_output must have shape [B, C or 2C, ...] = [{B}, {C} or {2 * C}, "
                         f"{', '.join(map(str, x_t.shape[2:]))}] to match x_t, got {tuple(model_output.shape)}")
    out_dtype = check_out_dtype(out_dtype, x_t.dtype)
    t = as_times("t", t, B, x_t.device, schedule.num_timesteps)
    cd = compute_dtype(x_t.dtype, model_output.dtype)
    norm = _norm_affine(normalize, C, x_t.device, cd) if normalize is not None else (None, None)
    name = backend_for(resolve_backend(backend, x_t.device))
    if name == "reference":
        return reference.tweedie(x_t, model_output, t, schedule, prediction, clip, normalize, out_dtype)
    m = model_output[:, :C]  # a view: the learned-sigma half is never read
    io = torch.promote_types(x_t.dtype, m.dtype)  # mixed precision: widen the narrower input (exact)
    a, b = schedule.x0_coefficients(prediction, x_t.device, cd)
    x_io, m_io = x_t.to(io), m.to(io)

    op = tweedie_impl if direct_call(x_io, m_io) else tweedie_op

    def run(n):
        return op(x_io, m_io, t, a, b, clip, norm[0], norm[1], out_dtype, n)

    return run((backend == "auto" and auto_pick("tweedie", x_t, run)) or name)


