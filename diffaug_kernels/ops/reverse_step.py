"""reverse_step: one reverse (sampling) step, x_prev = c1 * x0_hat + c2 * x_t + sigma * z + shift, with z the
in-kernel Philox normals of philox_normal(x_t.shape, seed, offset) (docs/design.md section 5).

The public wrapper checks its arguments and picks a backend; the fused backends run through one custom op,
diffaug_kernels::reverse_step, with a fake kernel (torch.compile) and an autograd formula. Coefficients travel
as [B] tensors (a number is a device fill, so nothing syncs and a compiled graph does not recompile for a new
one); sigma is per sample ([B]) or per element (x_t's shape: a learned variance).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .checks import as_seed, check_out_dtype, check_tensor, is_int
from .dispatch import alloc, auto_pick, backend_for, direct_call, empty_out, kernels, launch, resolve_backend
from .reference import compute_dtype


def reverse_step_impl(x0_hat: Tensor, x_t: Tensor, c1: Tensor, c2: Tensor, sigma: Optional[Tensor],
                      shift: Optional[Tensor], seed: Tensor, offset: Tensor, out_dtype: torch.dtype,
                      backend: str) -> Tensor:
    """The op's body: the backend's kernel into a fresh output (the custom op calls it; so does a plain eager
    call, without the dispatch: dispatch.direct_call)."""
    out = alloc(x_t, x_t.shape[0], out_dtype)
    if out.numel():
        launch(x_t.device, backend, kernels(backend).reverse_step_out, x0_hat, x_t, c1, c2, sigma, shift, seed,
               offset, out)
    return out


@torch.library.custom_op("diffaug_kernels::reverse_step", mutates_args=())
def reverse_step_op(x0_hat: Tensor, x_t: Tensor, c1: Tensor, c2: Tensor, sigma: Optional[Tensor],
                    shift: Optional[Tensor], seed: Tensor, offset: Tensor, out_dtype: torch.dtype,
                    backend: str) -> Tensor:
    """out = c1[b] * x0_hat + c2[b] * x_t + sigma * philox_normal(x_t.shape, seed, offset) + shift; c1, c2 [B] in
    the compute dtype; sigma None, [B] (compute dtype) or x_t's shape and dtype; shift None or x_t's shape and
    dtype; x0_hat has x_t's shape and dtype."""
    return reverse_step_impl(x0_hat, x_t, c1, c2, sigma, shift, seed, offset, out_dtype, backend)


@reverse_step_op.register_fake
def _(x0_hat, x_t, c1, c2, sigma, shift, seed, offset, out_dtype, backend):
    return empty_out(x_t, x_t.shape[0], out_dtype)


def _setup(ctx, inputs, output):
    x0_hat, x_t, c1, c2, sigma, shift, seed, offset, _, backend = inputs
    ctx.save_for_backward(x0_hat, x_t, c1, c2, sigma, seed, offset)
    ctx.backend = backend
    ctx.shift_dtype = shift.dtype if shift is not None else None


def _per_sample_sum(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


def _backward(ctx, grad):
    x0_hat, x_t, c1, c2, sigma, seed, offset = ctx.saved_tensors
    need = ctx.needs_input_grad
    cd = c1.dtype
    nd = x_t.dim()
    g = grad.to(cd)

    def ps(v):  # a [B] coefficient against [B, ...]
        return v.reshape(-1, *([1] * (nd - 1)))

    g_x0 = (ps(c1) * g).to(x0_hat.dtype) if need[0] else None
    g_xt = (ps(c2) * g).to(x_t.dtype) if need[1] else None
    g_c1 = _per_sample_sum(g * x0_hat.to(cd)).to(c1.dtype) if need[2] else None
    g_c2 = _per_sample_sum(g * x_t.to(cd)).to(c2.dtype) if need[3] else None
    g_sigma = None
    if need[4] and sigma is not None:  # d out / d sigma = z, recomputed: the same op on zeros with sigma = 1
        zero = torch.zeros(x_t.shape, dtype=cd, device=x_t.device)
        zc, one = torch.zeros_like(c1), torch.ones_like(c1)
        z = reverse_step_op(zero, zero, zc, zc, one, None, seed, offset, cd, ctx.backend)
        gz = g * z
        g_sigma = _per_sample_sum(gz) if sigma.dim() == 1 else gz
        g_sigma = g_sigma.to(sigma.dtype)
    g_shift = grad.to(ctx.shift_dtype) if need[5] and ctx.shift_dtype is not None else None
    return g_x0, g_xt, g_c1, g_c2, g_sigma, g_shift, None, None, None, None


reverse_step_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------- public
def _is_number(v) -> bool:
    return is_int(v) or (isinstance(v, float)) or (hasattr(v, "dtype") and not isinstance(v, Tensor)
                                                     and getattr(v, "ndim", None) == 0 and v.dtype.kind == "f")


def _operand(name: str, v, x_t: Tensor, per_element: bool):
    """v as ("sample", [B] tensor) or, per_element, ("element", v expanded to x_t's shape). A number, a
    one-element tensor, a [B] tensor or a [B, 1, ...] tensor is per sample; any other tensor must broadcast to
    x_t's shape."""
    B, device = x_t.shape[0], x_t.device
    if _is_number(v):
        return "sample", float(v)
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a number or a floating-point tensor, got {type(v).__name__}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    check_tensor(name, v, min_dim=0)
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but x_t is on {device}; put them on one device")
    if v.dim() <= x_t.dim() and v.numel() == 1:
        return "sample", v.reshape(1).expand(B)
    if v.dim() == 1 and v.shape[0] == B:
        return "sample", v
    if v.dim() == x_t.dim() and v.shape[0] == B and all(s == 1 for s in v.shape[1:]):
        return "sample", v.reshape(B)
    if per_element:
        try:
            if torch.broadcast_shapes(v.shape, x_t.shape) == x_t.shape:
                return "element", v.expand(x_t.shape)
        except RuntimeError:
            pass
        raise ValueError(f"{name} must be a number, a [B] = [{B}] tensor or a tensor broadcasting to x_t's shape "
                         f"{tuple(x_t.shape)}, got shape {tuple(v.shape)}")
    raise ValueError(f"{name} must be a number, a one-element tensor or a [B] = [{B}] tensor (per sample), got "
                     f"shape {tuple(v.shape)}")


def reverse_step(x0_hat: Tensor, x_t: Tensor, c1, c2, sigma=None, shift: Optional[Tensor] = None, seed=None,
                 offset=0, out_dtype=None, backend: str = "auto") -> Tensor:
    """x_prev = c1 * x0_hat + c2 * x_t + sigma * z + shift: one reverse step of DDIM / DDPM in one pass, with
    z = philox_normal(x_t.shape, seed, offset) drawn in-kernel (no noise tensor in memory).

    x0_hat, x_t: [B, ...] of one shape (float16/bfloat16/float32/float64, any strides; channels_last is kept;
    different dtypes are widened to the wider, exactly). c1, c2: numbers or per-sample tensors ([B], or one
    element). sigma: None (no noise: seed is not used, none is drawn), a number, a per-sample tensor, or a tensor
    broadcasting to x_t's shape (a learned variance). shift: None or a tensor broadcasting to x_t's shape (the
    guidance term). seed: a 64-bit value or None (drawn from torch's generator when there is noise); offset:
    Philox counter offset (one counter = 4 elements). Computed in float32 (float64 when an input is float64),
    returned in out_dtype (default x_t's dtype)."""
    check_tensor("x0_hat", x0_hat)
    check_tensor("x_t", x_t)
    if x0_hat.device != x_t.device:
        raise ValueError(f"x0_hat is on {x0_hat.device} but x_t is on {x_t.device}; put them on one device")
    if x0_hat.shape != x_t.shape:
        raise ValueError(f"x0_hat must have x_t's shape {tuple(x_t.shape)}, got {tuple(x0_hat.shape)}")
    out_dtype = check_out_dtype(out_dtype, x_t.dtype)
    k1, v1 = _operand("c1", c1, x_t, False)
    k2, v2 = _operand("c2", c2, x_t, False)
    ks, vs = _operand("sigma", sigma, x_t, True) if sigma is not None else (None, None)
    if shift is not None:
        check_tensor("shift", shift, min_dim=0)
        kh, vh = _operand("shift", shift, x_t, True)
        if kh != "element":  # a per-sample shift is a [B, 1, ...] view of x_t's shape like any other
            vh = (vh if isinstance(vh, Tensor) else torch.full((1,), vh, device=x_t.device)).reshape(
                -1, *([1] * (x_t.dim() - 1))).expand(x_t.shape)
    else:
        vh = None
    io = torch.promote_types(x0_hat.dtype, x_t.dtype)
    for v in (vs if ks == "element" else None, vh):
        if v is not None:
            io = torch.promote_types(io, v.dtype)
    scalar_dtypes = [v.dtype for v in (v1, v2, vs if ks == "sample" else None) if isinstance(v, Tensor)]
    cd = compute_dtype(io, *scalar_dtypes)
    io = torch.float64 if cd == torch.float64 else io  # float64 coefficients: the whole step in float64

    def per_sample(v):
        if isinstance(v, Tensor):
            return v.to(cd)
        return torch.full((x_t.shape[0],), v, dtype=cd, device=x_t.device)  # a fill: no host copy

    if sigma is not None:
        seed_t = as_seed("seed", seed, x_t.device)
    else:  # no noise: nothing drawn from torch's generator; a given seed is still checked
        seed_t = as_seed("seed", 0 if seed is None else seed, x_t.device)
    off_t = as_seed("offset", offset, x_t.device)
    c1_t, c2_t = per_sample(v1), per_sample(v2)
    sig = None if sigma is None else (per_sample(vs) if ks == "sample" else vs.to(io))
    name = backend_for(resolve_backend(backend, x_t.device))
    if name != "reference" and kernels(name).reverse_step_out is None:  # an extension built without this op
        name = "reference"
    if name == "reference":
        return reference.reverse_step(x0_hat.to(io), x_t.to(io), c1_t, c2_t, sig, vh, seed_t, off_t, out_dtype)
    x0_io, xt_io = x0_hat.to(io), x_t.to(io)
    sh = vh.to(io) if vh is not None else None
    tensors = [t for t in (x0_io, xt_io, c1_t, c2_t, sig, sh) if t is not None]
    op = reverse_step_impl if direct_call(*tensors) else reverse_step_op

    def run(n):
        return op(x0_io, xt_io, c1_t, c2_t, sig, sh, seed_t, off_t, out_dtype, n)

    return run((backend == "auto" and auto_pick("reverse_step", x_t, run)) or name)
