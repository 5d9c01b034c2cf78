"""group_norm_silu: SiLU(GroupNorm(x) * weight + bias), optionally with ADM's scale-shift
SiLU((GroupNorm(x) * weight + bias) * (1 + scale) + shift), in one kernel: the ADM UNet's norm + SiLU pairs
(models/unet.py, fused_norm=True).

The public wrapper checks its arguments and picks a backend; the fused backends run through one custom op,
diffaug_kernels::group_norm_silu, with a fake kernel (torch.compile) and an autograd formula. Statistics are
computed in float32 (float64 for float64 inputs) whatever x's dtype, as guided-diffusion's GroupNorm32 does, and
so are the affine, the scale-shift and SiLU; the result is cast to x's dtype once. The kernels are the CPU one of
csrc/cpu_kernels.cpp (channels_last: tasks of whole groups read by rows of channels; other layouts: one task per
(sample, group); vectorised chunks over at::parallel_for) and Triton's (triton_kernels.group_norm_silu_kernel):
both read x twice, a statistics pass then an apply pass. The gradient of channels_last x on the CPU backend comes
from a C++ kernel too (diffaug_kernels::group_norm_silu_backward); elsewhere from the closed form in PyTorch.
csrc/cuda_kernels.cu has none, so the "cuda" backend runs the reference for this op and "auto" on a GPU takes
Triton.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .checks import check_tensor, is_int
from .dispatch import AUTO_ORDER, alloc, backend_for, direct_call, empty_out, kernels, launch, resolve_backend, usable
from .reference import compute_dtype


def group_norm_silu_impl(x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                         num_groups: int, eps: float, backend: str) -> Tensor:
    """The op's body: the backend's kernel into a fresh output (the custom op calls it; so does a plain eager
    call, without the dispatch: dispatch.direct_call)."""
    out = alloc(x, x.shape[0], x.dtype)
    if out.numel():
        launch(x.device, backend, kernels(backend).group_norm_silu_out, x, num_groups, weight, bias, eps, scale, shift,
               out)
    return out


@torch.library.custom_op("diffaug_kernels::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       num_groups: int, eps: float, backend: str) -> Tensor:
    """out = SiLU(GroupNorm(x) * weight + bias [* (1 + scale) + shift]) in x's dtype and layout; weight, bias [C]
    and scale, shift [B, C] (or None) in the compute dtype."""
    return group_norm_silu_impl(x, weight, bias, scale, shift, num_groups, eps, backend)


@group_norm_silu_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, backend):
    return empty_out(x, x.shape[0], x.dtype)


def backward_kernel(x: Tensor, backend: str):
    """The backward kernel for x on this backend, or None: the C++ one takes channels_last x (the compiled
    networks' layout, where the traced formula below reduces each group's few channels a row apart); other
    layouts and backends take the formula."""
    fn = kernels(backend).group_norm_silu_backward_out if backend != "reference" else None
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return fn if cl else None


@torch.library.custom_op("diffaug_kernels::group_norm_silu_backward", mutates_args=())
def group_norm_silu_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor],
                                shift: Optional[Tensor], num_groups: int, eps: float,
                                backend: str) -> tuple[Tensor, Tensor]:
    """(dx in x's dtype and layout, sums [2, B, C] in the compute dtype: over the pixels, dz and dz * xhat, with
    dz the gradient at SiLU's input and xhat the normalised x), by backend's kernel: for x that backward_kernel
    accepts."""
    dx = alloc(x, x.shape[0], x.dtype)
    sums = torch.empty(2, *x.shape[:2], dtype=weight.dtype, device=x.device)
    launch(x.device, backend, kernels(backend).group_norm_silu_backward_out, grad, x, num_groups, weight, bias, eps,
           scale, shift, dx, sums)
    return dx, sums


@group_norm_silu_backward_op.register_fake
def _(grad, x, weight, bias, scale, shift, num_groups, eps, backend):
    return empty_out(x, x.shape[0], x.dtype), x.new_empty(2, *x.shape[:2], dtype=weight.dtype)


def _setup(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.num_groups, ctx.eps, ctx.backend = num_groups, eps, backend


def _backward(ctx, grad):
    """GroupNorm's and SiLU's gradients in closed form, in the compute dtype. The statistics are recomputed from x
    rather than saved. channels_last x on the CPU backend: dx and two per-(sample, channel) sums from the C++
    kernel, the other gradients from those sums; elsewhere plain PyTorch (it traces under torch.compile), and
    under create_graph=True too, so that the gradient is itself differentiable."""
    x, weight, bias, scale, shift = ctx.saved_tensors
    cd, (B, C), G = weight.dtype, x.shape[:2], ctx.num_groups
    if not torch.is_grad_enabled() and backward_kernel(x, ctx.backend) is not None:  # (create_graph: the formula)
        dx, (sum_dz, sum_dz_xhat) = group_norm_silu_backward_op(grad.to(x.dtype), x, weight, bias, scale, shift, G,
                                                                ctx.eps, ctx.backend)
        if scale is None:
            return dx, sum_dz_xhat.sum(0), sum_dz.sum(0), None, None, None, None, None
        g1 = 1 + scale
        g_scale = weight * sum_dz_xhat + bias * sum_dz  # the sum of dz * y
        return dx, (sum_dz_xhat * g1).sum(0), (sum_dz * g1).sum(0), g_scale, sum_dz, None, None, None
    tail = [1] * (x.dim() - 2)
    xg = x.to(cd).reshape(B, G, -1)
    var, mean = torch.var_mean(xg, dim=2, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + ctx.eps)
    xhat = (xg - mean) * rstd
    w = weight.reshape(1, C, *tail)
    y = xhat.reshape(x.shape) * w + bias.reshape(1, C, *tail)
    z = y if scale is None else y * (1 + scale.reshape(B, C, *tail)) + shift.reshape(B, C, *tail)
    sig = torch.sigmoid(z)
    dz = grad.to(cd) * sig * (1 + z * (1 - sig))

    def per_bc(v):  # summed over the pixels: [B, C]
        return v.reshape(B, C, -1).sum(2)

    g_scale = g_shift = None
    if scale is not None:
        g_shift = per_bc(dz)
        g_scale = per_bc(dz * y)
        dz = dz * (1 + scale.reshape(B, C, *tail))
    g_bias = per_bc(dz).sum(0)
    g_weight = per_bc(dz * xhat.reshape(x.shape)).sum(0)
    dxhat = (dz * w).reshape(B, G, -1)
    dx = rstd * (dxhat - dxhat.mean(2, keepdim=True) - xhat * (dxhat * xhat).mean(2, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), g_weight, g_bias, g_scale, g_shift, None, None, None


group_norm_silu_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------- public
def _affine(name: str, v, x: Tensor, shape: tuple) -> Tensor:
    """weight / bias ([C]) or scale / shift ([B, C], or [B, C, 1, ...] as ADM's emb_out chunks) as `shape`."""
    if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{v.dtype if isinstance(v, Tensor) else type(v).__name__}")
    check_tensor(name, v)
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}; put them on one device")
    if tuple(v.shape[:len(shape)]) != shape or any(s != 1 for s in v.shape[len(shape):]):
        want = f"[{', '.join(map(str, shape))}]" + (", or that followed by 1s" if len(shape) == 2 else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")
    return v.reshape(shape)


def _fused_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: a backend without this op's kernel runs the reference; "auto" takes the first in
    its order that has one (the C++ kernel on CPU tensors, Triton on a GPU's)."""
    name = backend_for(resolve_backend(backend, device))
    if name == "reference" or kernels(name).group_norm_silu_out is not None:
        return name
    if backend == "auto":
        return next((n for n in AUTO_ORDER.get(device.type, ())
                     if usable(n, device) and kernels(n).group_norm_silu_out is not None), "reference")
    return "reference"


def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """SiLU(GroupNorm(x) * weight + bias), or SiLU((GroupNorm(x) * weight + bias) * (1 + scale) + shift) with
    ADM's scale-shift, in one pass of statistics and one of output.

    x: [B, C, ...] float16 / bfloat16 / float32 / float64, NCHW or channels_last (kept); num_groups divides C;
    weight, bias: [C]; scale, shift: both None or both [B, C] (or [B, C, 1, 1]). Computed in float32 (float64
    for float64 x) and returned in x's dtype. Gradients for x, weight, bias, scale and shift."""
    check_tensor("x", x, min_dim=2)
    if not is_int(num_groups) or num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups must be a positive integer dividing x's {x.shape[1]} channels, "
                         f"got {num_groups!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift come together: pass both or neither")
    B, C = x.shape[:2]
    w, b = _affine("weight", weight, x, (C,)), _affine("bias", bias, x, (C,))
    if scale is not None:
        scale, shift = _affine("scale", scale, x, (B, C)), _affine("shift", shift, x, (B, C))
    name = _fused_backend(backend, x.device)
    if name == "reference":
        return reference.group_norm_silu(x, int(num_groups), w, b, float(eps), scale, shift)
    cd = compute_dtype(x.dtype)
    w, b = w.to(cd), b.to(cd)
    sc, sh = (scale.to(cd), shift.to(cd)) if scale is not None else (None, None)
    tensors = [t for t in (x, w, b, sc, sh) if t is not None]
    op = group_norm_silu_impl if direct_call(*tensors) else group_norm_silu_op
    return op(x, w, b, sc, sh, int(num_groups), float(eps), name)
