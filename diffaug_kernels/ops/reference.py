"""The plain-PyTorch specification of every op. Fused backends are tested against these functions.

Everything here is written for clarity, not speed: Philox4x32-10 on int64 tensors (uint32 words kept in the
low 32 bits), Triton's uniform and Box-Muller conversions, then the per-sample formulas of docs/design.md
(sections 4-6), gathering float32 coefficients (float64 for float64 inputs) and computing in that precision.
seed and offset may be Python ints or integer tensors (so this traces under torch.compile).
"""
from __future__ import annotations

import torch

from ..schedule import NoiseSchedule

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _u64_parts(v, device):
    """(low 32 bits, high 32 bits) of a 64-bit value (int or int64 tensor, two's complement) as int64."""
    if not isinstance(v, torch.Tensor):  # a Python int in [-2**63, 2**64): its low 64 bits
        return (torch.tensor(int(v) & _MASK32, device=device), torch.tensor((int(v) >> 32) & _MASK32, device=device))
    v = v.to(device, torch.int64)
    return v & _MASK32, (v >> 32) & _MASK32


def philox_uint32(n_counters: int, seed, offset=0, device=None) -> torch.Tensor:
    """[n_counters, 4] int64 tensor of the uint32 words Philox4x32-10 gives for counters offset + j."""
    device = torch.device(device or "cpu")
    k0, k1 = _u64_parts(seed, device)
    off_lo, off_hi = _u64_parts(offset, device)
    j = torch.arange(n_counters, dtype=torch.int64, device=device)
    lo = off_lo + j  # 64-bit counter = offset + j, split into words with the carry
    c0 = lo & _MASK32
    c1 = (off_hi + (lo >> 32)) & _MASK32
    return philox_rounds(c0, c1, torch.zeros_like(c0), torch.zeros_like(c0), k0, k1)


def philox_rounds(c0, c1, c2, c3, k0, k1) -> torch.Tensor:
    """Philox4x32-10 on counter words c0..c3 and key words k0, k1 (int64 tensors holding uint32 values):
    [n, 4] int64 of the output words."""
    for _ in range(10):
        p0 = c0 * _M0  # exact product < 2^64 wraps in int64; its bit pattern is still the uint64 product
        p1 = c2 * _M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & _MASK32) ^ c1 ^ k0,
            p1 & _MASK32,
            ((p0 >> 32) & _MASK32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=1)


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: as int32, fold negatives (~x), times 4.6566127342e-10 in float32."""
    x = torch.where(words >= 2**31, words - 2**32, words)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=words.device)


def philox_normal(shape, seed, offset=0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normals of the fused ops: element i is lane i % 4 of counter offset + i // 4."""
    shape = tuple(shape)
    device = torch.device(device or "cpu")
    n = 1
    for s in shape:
        n *= int(s)
    words = philox_uint32((n + 3) // 4, seed, offset, device)
    u = _uniform(words)
    u1 = torch.clamp_min(u[:, 0::2], 1.0e-7)  # (u1, u2) = lanes (0, 1) and (2, 3)
    th = u[:, 1::2] * torch.tensor(6.283185307179586, dtype=torch.float32, device=device)
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(th), r * torch.sin(th)], dim=2)  # [n4, 2 pairs, (cos, sin)]
    z = z.reshape(-1)[:n]  # lane order: pair0 cos, pair0 sin, pair1 cos, pair1 sin
    return z.reshape(shape).to(dtype)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def assert_t_on_device(t: torch.Tensor, T: int) -> None:
    """0 <= t < T as an assertion on t's device (no host sync), for a CUDA t and, while torch.compile traces, for
    a t on any device (the ops' host check is skipped there; the assertion is compiled into the graph). Eager CPU
    tensors are checked on the host by the ops; nothing is asserted while capturing a CUDA graph eagerly.
    Without it a negative t would silently index from the end of a table."""
    if not t.numel():
        return
    if torch.compiler.is_compiling() or (t.is_cuda and not torch.cuda.is_current_stream_capturing()):
        torch._assert_async(((t >= 0) & (t < T)).all(), f"t must lie in [0, {T}) for this schedule")


def check_t_on_host(name: str, t: torch.Tensor, T: int) -> None:
    """0 <= t < T checked on the host (a sync on a GPU: for tensors already there); ValueError otherwise."""
    if t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= T:
            raise ValueError(f"{name} must lie in [0, {T}) for this schedule, got values in [{lo}, {hi}]")


def per_sample(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return table[t].reshape(-1, *([1] * (ndim - 1)))


def _as_t(t, batch: int, device, T: int) -> torch.Tensor:
    """t as int64 [batch] on device, range-checked on the device once per op (see assert_t_on_device)."""
    if isinstance(t, torch.Tensor):
        t = t.to(device=device, dtype=torch.int64).expand(batch) if t.dim() == 0 else t.to(device, torch.int64)
    else:
        t = torch.full((batch,), int(t), dtype=torch.int64, device=device)
    assert_t_on_device(t, T)
    return t


def forward_noise(x0, t, schedule: NoiseSchedule, seed, offset=0, out_dtype=None):
    """x_t = sqrt_alphas_cumprod[t] * x0 + sqrt_one_minus_alphas_cumprod[t] * philox_normal(x0.shape, seed, offset)."""
    cd = compute_dtype(x0.dtype)
    t = _as_t(t, x0.shape[0], x0.device, schedule.num_timesteps)
    a = per_sample(schedule.table("sqrt_alphas_cumprod", x0.device, cd), t, x0.dim())
    s = per_sample(schedule.table("sqrt_one_minus_alphas_cumprod", x0.device, cd), t, x0.dim())
    eps = philox_normal(x0.shape, seed, offset, x0.device).to(cd)
    return (a * x0.to(cd) + s * eps).to(out_dtype or x0.dtype)


def forward_noise_multi(x0, times, schedule: NoiseSchedule, seed, offset=0, out_dtype=None):
    """[K*B, ...]: block k is x0 noised to times[k]; the noise is that of one [K*B, ...] tensor."""
    times = torch.as_tensor(times, dtype=torch.int64, device=x0.device).reshape(-1)
    K, B = times.numel(), x0.shape[0]
    x_rep = x0.unsqueeze(0).expand(K, *x0.shape).reshape(K * B, *x0.shape[1:])
    return forward_noise(x_rep, times.repeat_interleave(B), schedule, seed, offset, out_dtype)


def tweedie(x_t, model_output, t, schedule: NoiseSchedule, prediction="eps", clip=True, normalize=None,
            out_dtype=None):
    """One-step denoised estimate x0_hat from x_t and the model output (first C channels when it has 2C)."""
    cd = compute_dtype(x_t.dtype, model_output.dtype)
    C = x_t.shape[1]
    out = model_output[:, :C].to(cd)
    x = x_t.to(cd)
    t = _as_t(t, x_t.shape[0], x_t.device, schedule.num_timesteps)

    def g(name):
        return per_sample(schedule.table(name, x_t.device, cd), t, x_t.dim())

    if prediction == "eps":
        x0 = g("sqrt_recip_alphas_cumprod") * x - g("sqrt_recipm1_alphas_cumprod") * out
    elif prediction == "v":
        x0 = g("sqrt_alphas_cumprod") * x - g("sqrt_one_minus_alphas_cumprod") * out
    elif prediction == "x0":
        x0 = out
    elif prediction == "score":  # eps = -sqrt(1 - abar) * score
        x0 = g("sqrt_recip_alphas_cumprod") * x + g("one_minus_alphas_cumprod_over_sqrt") * out
    else:
        raise ValueError(f"unknown prediction {prediction!r}")
    if clip:  # clamp to [-1, 1]; the gradient passes strictly inside only (not on the bounds, nor at NaN), spelled
        # out: torch.clamp's convention at the bounds changed between versions, hardtanh's at NaN depends on size
        x0 = torch.where((x0 > -1) & (x0 < 1), x0, x0.detach().clamp(-1, 1))
    if normalize is not None:
        mean, std = (torch.as_tensor(v, dtype=cd, device=x_t.device).reshape(1, C, *([1] * (x_t.dim() - 2)))
                     for v in normalize)
        x0 = ((x0 + 1) / 2 - mean) / std
    return x0.to(out_dtype or x_t.dtype)


def reverse_step(x0_hat, x_t, c1, c2, sigma=None, shift=None, seed=None, offset=0, out_dtype=None):
    """x_prev = c1 * x0_hat + c2 * x_t + sigma * philox_normal(x_t.shape, seed, offset) + shift, left to right.

    c1, c2: numbers or per-sample tensors ([B] or [B, 1, ...]); sigma: None (no noise), a number, a per-sample
    tensor or a tensor broadcasting to x_t's shape (a learned variance); shift: None or such a tensor (the guidance
    term). Computed in float32, float64 when any tensor input is float64."""
    tensors = [v for v in (x0_hat, x_t, c1, c2, sigma, shift) if isinstance(v, torch.Tensor)]
    cd = compute_dtype(*(v.dtype for v in tensors))
    nd, device = x_t.dim(), x_t.device

    def term(v):  # a number as a fill (no host copy), a [B] tensor per sample, others broadcast as they are
        if not isinstance(v, torch.Tensor):
            return torch.full((), float(v), dtype=cd, device=device)
        v = v.to(device, cd)
        return v.reshape(-1, *([1] * (nd - 1))) if v.dim() == 1 and nd > 1 else v

    out = term(c1) * x0_hat.to(cd) + term(c2) * x_t.to(cd)
    if sigma is not None:
        out = out + term(sigma) * philox_normal(x_t.shape, seed, offset, device).to(cd)
    if shift is not None:
        out = out + term(shift)
    return out.to(out_dtype or x_t.dtype)


def group_norm_silu(x, num_groups: int, weight, bias, eps: float = 1e-5, scale=None, shift=None):
    """SiLU(GroupNorm(x) * weight + bias), or with ADM's scale-shift SiLU((GroupNorm(x) * weight + bias) *
    (1 + scale) + shift), scale and shift [B, C] (or [B, C, 1, ...]). guided-diffusion's GroupNorm32: the norm in
    float32 (float64 for float64 inputs) whatever x's dtype; here the scale-shift and SiLU stay in that precision
    too and the result is cast to x's dtype once."""
    cd = compute_dtype(x.dtype)
    y = torch.nn.functional.group_norm(x.to(cd), num_groups, weight.to(cd), bias.to(cd), eps)
    if scale is not None:
        tail = [1] * (x.dim() - 2)
        y = y * (1 + scale.to(cd).reshape(x.shape[0], x.shape[1], *tail)) + shift.to(cd).reshape(
            x.shape[0], x.shape[1], *tail)
    return torch.nn.functional.silu(y).to(x.dtype)
