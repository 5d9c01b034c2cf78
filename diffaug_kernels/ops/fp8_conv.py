"""The FP8 3x3 convolution of models/fp8.py: a Triton implicit GEMM.

out[b, n, oh, ow] = x_scale * w_scale[n] * sum_{kh, kw, c} x[b, c, oh*s - p + kh, ow*s - p + kw] * w[n, c, kh, kw]
                    + bias[n]

The GEMM is M = B * HO * WO output pixels by N = out channels by K = 9 * C: each K step loads one (kh, kw) tap's
BLOCK_K input channels of BLOCK_M pixels straight from the NHWC (channels_last) input, zero outside the image
(the padding is never materialised), and the matching [BLOCK_N, BLOCK_K] tile of the weight stored K-major
([N, 3, 3, C], the channels_last layout of an [N, C, 3, 3] tensor), transposed in registers: FP8 wgmma on Hopper
takes both operands K-major. tl.dot accumulates in float32; the epilogue applies the two scales and the bias and
writes out_dtype (bf16 under autocast) channels_last. Operands may be float8_e4m3fn (the FP8 path, Hopper),
or bfloat16 / float32 (the same kernel under TRITON_INTERPRET=1, whose tests compare it with F.conv2d).

Registered as the custom op diffaug_kernels::conv3x3_scaled (a fake kernel for torch.compile).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency of torch on Linux
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Hopper's FP8 MMA keeps fewer accumulator bits than float32: the sum is moved into a float32 accumulator every
# BLOCK_K products (PROMOTE: once per K step, as DeepSeek-V3's FP8 GEMMs promote every 128).
# DIFFAUG_FP8_FAST_ACC=1 leaves it to the MMA for the whole K (faster; its accuracy is what bench-fp8 measures).
FAST_ACC = os.environ.get("DIFFAUG_FP8_FAST_ACC") == "1"


def _configs():
    """Hopper FP8 GEMM tiles (BLOCK_K >= 32: the FP8 wgmma's K), few of them: each is a compile per
    specialisation on first use; the interpreter gets one small tile."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=4), num_warps=4)]
    tiles = ((128, 128, 64, 4, 8), (128, 128, 128, 3, 8), (64, 128, 128, 4, 4))
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
            for m, n, k, s, w in tiles]


if triton is not None:
    @triton.jit(do_not_specialize=["BATCH", "H", "W", "HO", "WO"])
    def conv3x3_scaled_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, BATCH, H, W, C, HO, WO, N,
                              sxb, sxc, sxh, sxw, sob, son, soh, sow,
                              STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                              PROMOTE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        M = BATCH * HO * WO
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped order: GROUP_M row blocks share their column blocks' weights in L2
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        b = offs_m // (HO * WO)
        r = offs_m % (HO * WO)
        oh = r // WO
        ow = r % WO
        offs_k = tl.arange(0, BLOCK_K)
        w_row = offs_n.to(tl.int64) * (9 * C)  # the weight is [N, 9 * C], K contiguous
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # one loop over the 9 taps x the channel blocks, so the software pipeline runs across taps (a loop per
        # tap would refill it nine times: 2 channel blocks per tap at C = 256, BLOCK_K = 128)
        nkb = tl.cdiv(C, BLOCK_K)
        for k in range(0, 9 * nkb):
            tap = k // nkb
            kc = (k - tap * nkb) * BLOCK_K + offs_k
            ih = oh * STRIDE - PAD + tap // 3
            iw = ow * STRIDE - PAD + tap % 3
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            base = b.to(tl.int64) * sxb + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            k_ok = kc < C
            a = tl.load(x_ptr + base[:, None] + kc[None, :].to(tl.int64) * sxc,
                        mask=inside[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + w_row[:, None] + (tap * C + kc)[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if PROMOTE:
                acc = tl.dot(a, tl.trans(wt), acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, tl.trans(wt), acc)
        scale = tl.load(xs_ptr) * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        o = (b.to(tl.int64) * sob + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None] + \
            offs_n.to(tl.int64)[None, :] * son
        tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    conv3x3_scaled_tuned = triton.autotune(configs=_configs(), key=["C", "N", "HO", "WO", "STRIDE"])(
        conv3x3_scaled_kernel)


def out_size(size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - 3) // stride + 1


def check_args(x: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor], stride: int,
               padding: int) -> None:
    """ValueError / TypeError naming the argument, for conv3x3_scaled's inputs."""
    if x.dim() != 4 or w.dim() != 4 or w.shape[2:] != (3, 3) or w.shape[1] != x.shape[1]:
        raise ValueError(f"x must be [B, C, H, W] and w [N, C, 3, 3] with the same C, got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if x_scale.numel() != 1 or w_scale.shape != (w.shape[0],):
        raise ValueError(f"x_scale must have one element and w_scale shape [{w.shape[0]}], got "
                         f"{tuple(x_scale.shape)} and {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must have shape [{w.shape[0]}], got {tuple(bias.shape)}")
    if stride < 1 or padding < 0 or min(out_size(n, stride, padding) for n in x.shape[2:]) < 1:
        raise ValueError(f"stride {stride} and padding {padding} leave no output for input {tuple(x.shape)}")
    if len({t.device for t in (x, w, x_scale, w_scale) + ((bias,) if bias is not None else ())}) != 1:
        raise ValueError("x, w, x_scale, w_scale and bias must be on one device")


@torch.library.custom_op("diffaug_kernels::conv3x3_scaled", mutates_args=())
def conv3x3_scaled_op(x: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor], stride: int,
                      padding: int, out_dtype: torch.dtype) -> Tensor:
    """conv3x3_scaled's kernel into a fresh channels_last output."""
    B, C, H, W = x.shape
    N = w.shape[0]
    HO, WO = out_size(H, stride, padding), out_size(W, stride, padding)
    out = torch.empty((B, N, HO, WO), device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    wk = w.permute(0, 2, 3, 1).contiguous()  # [N, 3, 3, C]: free for a channels_last weight
    xs = x_scale.reshape(1).float().contiguous()
    ws = w_scale.float().contiguous()
    b = bias.float().contiguous() if bias is not None else ws  # (not read without HAS_BIAS)

    def grid(meta):
        return (triton.cdiv(B * HO * WO, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    conv3x3_scaled_tuned[grid](x, wk, xs, ws, b, out, B, H, W, C, HO, WO, N, *x.stride(), *out.stride(),
                               STRIDE=stride, PAD=padding, HAS_BIAS=bias is not None,
                               PROMOTE=not FAST_ACC and x.dtype == torch.float8_e4m3fn)
    return out


@conv3x3_scaled_op.register_fake
def _(x, w, x_scale, w_scale, bias, stride, padding, out_dtype):
    B, _, H, W = x.shape
    return torch.empty((B, w.shape[0], out_size(H, stride, padding), out_size(W, stride, padding)), device=x.device,
                       dtype=out_dtype, memory_format=torch.channels_last)


def conv3x3_scaled(x: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                   stride: int = 1, padding: int = 1, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x_scale * w_scale[n] * conv2d(x, w) + bias[n] in out_dtype, channels_last, accumulated in float32: the
    Triton kernel (a CUDA tensor, or any under TRITON_INTERPRET=1). x [B, C, H, W] (channels_last is read
    fastest), w [N, C, 3, 3] in x's dtype (float8_e4m3fn on Hopper), x_scale one element, w_scale and bias [N]."""
    if triton is None:
        raise RuntimeError("conv3x3_scaled needs Triton, which is not installed")
    check_args(x, w, x_scale, w_scale, bias, stride, padding)
    return conv3x3_scaled_op(x, w, x_scale, w_scale, bias, int(stride), int(padding), out_dtype)


def conv3x3_scaled_reference(x: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                             stride: int = 1, padding: int = 1, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """conv3x3_scaled in plain PyTorch: the float32 convolution of the operands, then the scales and the bias."""
    y = F.conv2d(x.float(), w.float(), None, stride, padding) * (x_scale.float().reshape(()) *
                                                                 w_scale.float().view(1, -1, 1, 1))
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(out_dtype)


def conv2d_fp8(xq: Tensor, w_fp8: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor], stride: tuple,
               padding: tuple, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """FP8Conv2d's kernel call: square stride and padding (the ADM UNet's 3x3 convolutions have them)."""
    if stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError(f"the FP8 convolution takes a square stride and padding, got {stride} and {padding}")
    return conv3x3_scaled(xq, w_fp8, x_scale, w_scale, bias, stride[0], padding[0], out_dtype)
