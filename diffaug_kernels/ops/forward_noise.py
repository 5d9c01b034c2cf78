"""forward_noise and forward_noise_multi: x_t = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * philox_normal(...).

The public wrappers check their arguments and pick a backend; the fused backends run through one custom op,
diffaug_kernels::forward_noise, with a fake kernel (torch.compile) and an autograd formula. seed and offset
travel as int64 tensors, so a compiled graph neither bakes a seed in nor recompiles for a new one, and nothing
syncs with the host on the way in.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from . import reference
from .checks import as_seed, as_times, check_out_dtype, check_schedule, check_tensor, is_int
from .dispatch import alloc, auto_pick, backend_for, direct_call, empty_out, kernels, launch, resolve_backend
from .reference import compute_dtype


def forward_noise_impl(x0: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, seed: Tensor, offset: Tensor,
                       out_dtype: torch.dtype, backend: str) -> Tensor:
    """The op's body: the backend's kernel into a fresh output (the custom op calls it; so does a plain eager
    call, without the dispatch: dispatch.direct_call)."""
    out = alloc(x0, t.shape[0] * x0.shape[0], out_dtype)
    if out.numel():  # an empty tensor has nothing to write (and may have no [B, C, S] view)
        launch(x0.device, backend, kernels(backend).forward_noise_out, x0, t, coef_a, coef_b, seed, offset, out)
    return out


@torch.library.custom_op("diffaug_kernels::forward_noise", mutates_args=())
def forward_noise_op(x0: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, seed: Tensor, offset: Tensor,
              out_dtype: torch.dtype, backend: str) -> Tensor:
    """out[k*B + b] = coef_a[t[k, b]] * x0[b] + coef_b[t[k, b]] * noise; t is [K, B] (K = 1: forward_noise)."""
    return forward_noise_impl(x0, t, coef_a, coef_b, seed, offset, out_dtype, backend)


@forward_noise_op.register_fake
def _(x0, t, coef_a, coef_b, seed, offset, out_dtype, backend):
    return empty_out(x0, t.shape[0] * x0.shape[0], out_dtype)


def _forward_noise_setup(ctx, inputs, output):
    x0, t, coef_a = inputs[:3]
    ctx.save_for_backward(t, coef_a)
    ctx.x_shape, ctx.x_dtype = x0.shape, x0.dtype


def _forward_noise_backward(ctx, grad):
    t, coef_a = ctx.saved_tensors
    K, B = t.shape
    a = coef_a[t].to(compute_dtype(ctx.x_dtype))  # d out[k*B + b] / d x0[b] = coef_a[t[k, b]]
    g = (grad.reshape(K, B, -1).to(a.dtype) * a.unsqueeze(-1)).sum(0)
    return g.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, None, None, None, None


forward_noise_op.register_autograd(_forward_noise_backward, setup_context=_forward_noise_setup)


# ---------------------------------------------------------------------------------------------- public
def _coefficients(schedule: NoiseSchedule, device: torch.device, dtype: torch.dtype):
    """The tables x_t's two terms gather from: sqrt(abar) and sqrt(1 - abar)."""
    return (schedule.table("sqrt_alphas_cumprod", device, dtype),
            schedule.table("sqrt_one_minus_alphas_cumprod", device, dtype))


def forward_noise(x0: Tensor, t, schedule: NoiseSchedule, seed=None, offset=0, out_dtype=None,
                  backend: str = "auto") -> Tensor:
    """x_t = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * philox_normal(x0.shape, seed, offset), per sample.

    x0: [B, ...] float16/bfloat16/float32/float64 (any strides; channels_last is kept). t: int, 0-d or [B]
    integer tensor in [0, T). seed: a 64-bit value (int in [-2**63, 2**64), negatives in two's complement, or an
    int tensor, its int64 bits), or None (drawn from torch's generator).
    offset: Philox counter offset (one counter = 4 elements)."""
    check_tensor("x0", x0)
    schedule = check_schedule(schedule)
    out_dtype = check_out_dtype(out_dtype, x0.dtype)
    t = as_times("t", t, x0.shape[0], x0.device, schedule.num_timesteps)
    seed_t, off_t = as_seed("seed", seed, x0.device), as_seed("offset", offset, x0.device)
    name = backend_for(resolve_backend(backend, x0.device))
    if name == "reference":
        return reference.forward_noise(x0, t, schedule, seed_t, off_t, out_dtype)
    cd = compute_dtype(x0.dtype)
    a, b = _coefficients(schedule, x0.device, cd)

    op = forward_noise_impl if direct_call(x0) else forward_noise_op

    def run(n):
        return op(x0, t.reshape(1, -1), a, b, seed_t, off_t, out_dtype, n)

    return run((backend == "auto" and auto_pick("forward_noise", x0, run)) or name)


def forward_noise_multi(x0: Tensor, times, schedule: NoiseSchedule, seed=None, offset=0, out_dtype=None,
                        backend: str = "auto") -> Tensor:
    """[K*B, ...]: rows k*B .. k*B + B - 1 are x0 noised to times[k], all from one read of x0. The noise is
    that of forward_noise on x0 repeated K times (the DiffAug-Ensemble expansion)."""
    check_tensor("x0", x0)
    schedule = check_schedule(schedule)
    out_dtype = check_out_dtype(out_dtype, x0.dtype)
    if isinstance(times, range):
        times = list(times)
    if is_int(times):
        times = [times]
    if not isinstance(times, (list, tuple, Tensor)):
        raise TypeError(f"times must be a sequence of integers, a 1-D integer tensor or an int, got "
                        f"{type(times).__name__}")
    if isinstance(times, Tensor) and times.dim() != 1:
        raise ValueError(f"times must be a 1-D sequence of integers, got shape {tuple(times.shape)}")
    K = len(times)
    if K == 0:
        raise ValueError("times must not be empty")
    times = as_times("times", times, K, x0.device, schedule.num_timesteps)
    seed_t, off_t = as_seed("seed", seed, x0.device), as_seed("offset", offset, x0.device)
    name = backend_for(resolve_backend(backend, x0.device))
    if name == "reference":
        return reference.forward_noise_multi(x0, times, schedule, seed_t, off_t, out_dtype)
    cd = compute_dtype(x0.dtype)
    t = times.reshape(K, 1).expand(K, x0.shape[0])
    a, b = _coefficients(schedule, x0.device, cd)

    op = forward_noise_impl if direct_call(x0) else forward_noise_op

    def run(n):
        return op(x0, t, a, b, seed_t, off_t, out_dtype, n)

    return run((backend == "auto" and auto_pick(f"forward_noise_multi{K}", x0, run)) or name)


