"""Triton kernels for forward_noise (+ the ensemble expansion), tweedie, reverse_step, philox_normal and
group_norm_silu.

The same Philox4x32-10 stream as csrc/philox.h (written out here rather than taken from tl.randint4x, whose
treatment of 64-bit offsets has changed across Triton releases), Triton's uniform and Box-Muller conversion
with csrc/philox.h's branch-free log and sincos,
per-sample coefficients gathered in-kernel, fp32 math (fp64 for fp64 I/O). Elements are handled as
[BLOCK, 4] tiles: row r is one Philox counter, column l its lane, so each counter is computed once.

Registered as the "triton" backend for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import os

import torch

from .reference import assert_t_on_device, check_t_on_host

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency of torch on Linux
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def prune_blocks(units):
    """An autotune early_config_prune: drop configs whose BLOCK exceeds the work along the block axis
    (units(kernel args), rounded up to a power of two; the smallest BLOCK always stays). A block larger than
    the work only masks lanes off, and every config tried costs a compile on first use: a small tensor then
    compiles and times 2 configs instead of 6."""
    def prune(configs, nargs, **kwargs):  # Triton passes the positional arguments as nargs, the keywords apart
        n = max(int(units({**nargs, **kwargs})), 1)
        cap = max(min(c.kwargs["BLOCK"] for c in configs), 1 << (n - 1).bit_length())
        return [c for c in configs if c.kwargs["BLOCK"] <= cap]
    return prune


def prune_narrow_blocks(units, data: str):
    """prune_blocks(units), then, of what it keeps, only the configs whose tile gives each thread at least 16
    bytes of the tensor argument `data` (BLOCK * element size >= 16 * 32 * num_warps), when any remain: Triton
    splits a tile evenly over the threads, and fewer bytes per thread make narrower loads and stores (a bf16
    tile of 512 over 4 warps moves 8 bytes per instruction)."""
    fits = prune_blocks(units)

    def prune(configs, nargs, **kwargs):
        kept = fits(configs, nargs, **kwargs)
        size = {**nargs, **kwargs}[data].element_size()
        wide = [c for c in kept if c.kwargs["BLOCK"] * size >= 16 * 32 * c.num_warps]
        return wide or kept
    return prune


# group_norm_silu's autotune candidates: its tile holds CG * S values of x at most, in 16-byte pieces per thread
GROUP_NORM_PRUNE = prune_narrow_blocks(lambda a: a["CG"] * a["S"], "x_ptr")


if triton is not None:

    @triton.jit
    def _randn4(k0, k1, ctr):
        """Four normals for 64-bit counters ctr (int64 tensor) with key (k0, k1) (uint32)."""
        c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((ctr >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c2 = c0 * 0
        c3 = c0 * 0
        for _ in tl.static_range(10):
            # one 32x32 -> 64-bit product per word (one IMAD.WIDE.U32 on sm_90; umulhi and a low multiply are two)
            w0 = c0.to(tl.uint64) * 0xD2511F53
            w2 = c2.to(tl.uint64) * 0xCD9E8D57
            c0, c2 = (w2 >> 32).to(tl.uint32) ^ c1 ^ k0, (w0 >> 32).to(tl.uint32) ^ c3 ^ k1
            c1, c3 = w2.to(tl.uint32), w0.to(tl.uint32)
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        r0 = tl.sqrt(_neg2_log_unit(tl.maximum(_uniform(c0), 1.0e-7)))
        r1 = tl.sqrt(_neg2_log_unit(tl.maximum(_uniform(c2), 1.0e-7)))
        s0, co0 = _sincos_unit(6.283185307179586 * _uniform(c1))
        s1, co1 = _sincos_unit(6.283185307179586 * _uniform(c3))
        return r0 * co0, r0 * s0, r1 * co1, r1 * s1

    # The log and sincos of csrc/philox.h (Cephes polynomials, about 1 ulp on log's [1e-7, 1) and sincos's
    # [0, 2*pi]), in place of tl.log, tl.cos and tl.sin: libdevice's carry guards for inputs that cannot occur
    # here and a huge-argument reduction with a local-memory array, and sin and cos each reduced the angle.
    @triton.jit
    def _neg2_log_unit(x):
        """-2 log(x) for positive normal float32 x: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), no branch; the -2
        folded into every coefficient (exact), as in philox.h."""
        d = x.to(tl.int32, bitcast=True) - 0x3F3504F3
        e = (d >> 23).to(tl.float32)
        f = ((d & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True) - 1.0
        z = f * f
        p = f * -1.40753672584e-1 + 2.3029220620e-1
        p = p * f - 2.3353997480e-1
        p = p * f + 2.4840281692e-1
        p = p * f - 2.8498645574e-1
        p = p * f + 3.3336115330e-1
        p = p * f - 4.0001429530e-1
        p = p * f + 4.9999987986e-1
        p = p * f - 6.6666662348e-1
        y = p * f * z + 4.24388880e-4 * e + z
        return (-2.0 * f + y) - 1.38671875 * e

    @triton.jit
    def _sincos_unit(x):
        """(sin x, cos x) for float32 x in [0, 2*pi]: one reduction by pi/2 for both, as in philox.h."""
        big = x * 0.63661977236758134 + 12582912.0  # 1.5 * 2^23: rounds to an integer, j's bits at the bottom
        q = big.to(tl.uint32, bitcast=True)
        j = big - 12582912.0
        y = (x - j * 1.5703125) - j * 4.8382679233327508e-4  # j <= 4: two parts of pi/2 suffice (philox.h)
        z = y * y
        ps = y + y * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
        pc = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
        odd = (q & 1) != 0
        sv = tl.where(odd, pc, ps).to(tl.uint32, bitcast=True)
        cv = tl.where(odd, ps, pc).to(tl.uint32, bitcast=True)
        s = (sv ^ ((q << 30) & 0x80000000)).to(tl.float32, bitcast=True)
        c = (cv ^ (((q + 1) << 30) & 0x80000000)).to(tl.float32, bitcast=True)
        return s, c

    @triton.jit
    def _uniform(v):
        x = v.to(tl.int32, bitcast=True)
        x = tl.where(x < 0, ~x, x)
        return x.to(tl.float32) * 4.6566127342e-10

    @triton.jit
    def _key(seed_ptr):
        seed = tl.load(seed_ptr)
        return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)

    @triton.jit
    def _cast_out(y, out_ptr):
        """To the output dtype; 16-bit outputs go through float32 like torch's own conversions do."""
        ty = out_ptr.dtype.element_ty
        if ty.primitive_bitwidth == 16:
            y = y.to(tl.float32)
        return y.to(ty)

    @triton.jit
    def _pick(lane, n0, n1, n2, n3):
        return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))

    @triton.jit
    def _offset3(i, C, S, sb, sc, ss, CONTIG: tl.constexpr):
        """Memory offset of logical element i of a [B, C, S] view with strides (sb, sc, ss)."""
        if CONTIG:
            return i
        s = i % S
        bc = i // S
        return (bc // C) * sb + (bc % C) * sc + s * ss

    @triton.jit
    def forward_noise_kernel(x_ptr, out_ptr, t_ptr, ca_ptr, cb_ptr, T, seed_ptr, off_ptr, N, K, C, S,
                             xsb, xsc, xss, osb, osc, oss, tk, tb,
                             X_CONTIG: tl.constexpr, O_CONTIG: tl.constexpr, ALIGNED: tl.constexpr,
                             F64: tl.constexpr, BLOCK: tl.constexpr):
        # Tile: BLOCK counters x 4 lanes of x's logical elements; x is read once and written K times.
        # Sizes arrive as int32 when they are below 2**31, but K * N and C * S may not be: 64-bit from here.
        N, C, S = tl.cast(N, tl.int64), tl.cast(C, tl.int64), tl.cast(S, tl.int64)
        k0, k1 = _key(seed_ptr)
        off = tl.load(off_ptr)
        row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        lane = tl.arange(0, 4).to(tl.int64)
        i = row[:, None] * 4 + lane[None, :]
        mask = i < N
        xv = tl.load(x_ptr + _offset3(i, C, S, xsb, xsc, xss, X_CONTIG), mask=mask, other=0.0)
        xv = xv.to(tl.float64) if F64 else xv.to(tl.float32)
        b = i // (C * S)
        o_off = _offset3(i, C, S, osb, osc, oss, O_CONTIG)
        for k32 in range(K):
            k = tl.cast(k32, tl.int64)
            t = tl.load(t_ptr + k * tk + b * tb, mask=mask, other=0)
            a, s = _coefs(ca_ptr, cb_ptr, t, T)  # masked-off lanes hold t = 0
            e = k * N + i  # element index in the [K*B, ...] output: its counter and lane
            if ALIGNED:  # K*N keeps rows on counter boundaries: one counter per row
                n0, n1, n2, n3 = _randn4(k0, k1, off + (k * N) // 4 + row[:, None])
                n = _pick(lane[None, :], n0, n1, n2, n3)
            else:  # block k starts mid-counter: each element computes its own counter
                n0, n1, n2, n3 = _randn4(k0, k1, off + e // 4)
                n = _pick(e % 4, n0, n1, n2, n3)
            y = a * xv + s * n.to(xv.dtype)
            tl.store(out_ptr + k * (N // C // S) * osb + o_off, _cast_out(y, out_ptr), mask=mask)

    @triton.jit
    def tweedie_kernel(x_ptr, m_ptr, out_ptr, t_ptr, ca_ptr, cb_ptr, T, sc_ptr, sh_ptr, N, C, S,
                       xsb, xsc, xss, msb, msc, mss, osb, osc, oss, tb,
                       X_CONTIG: tl.constexpr, M_CONTIG: tl.constexpr, O_CONTIG: tl.constexpr,
                       CLIP: tl.constexpr, NORM: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        C, S = tl.cast(C, tl.int64), tl.cast(S, tl.int64)  # C * S may pass 2**31 (see forward_noise_kernel)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < N
        xv = tl.load(x_ptr + _offset3(i, C, S, xsb, xsc, xss, X_CONTIG), mask=mask, other=0.0)
        mv = tl.load(m_ptr + _offset3(i, C, S, msb, msc, mss, M_CONTIG), mask=mask, other=0.0)
        cdt = tl.float64 if F64 else tl.float32
        t = tl.load(t_ptr + (i // (C * S)) * tb, mask=mask, other=0)
        a, s = _coefs(ca_ptr, cb_ptr, t, T)  # masked-off lanes hold t = 0
        y = _xt_term(a, xv.to(cdt)) + s * mv.to(cdt)
        if CLIP:
            y = _clip(y)
        if NORM:
            c = (i // S) % C
            y = y * tl.load(sc_ptr + c, mask=mask, other=1.0) + tl.load(sh_ptr + c, mask=mask, other=0.0)
        tl.store(out_ptr + _offset3(i, C, S, osb, osc, oss, O_CONTIG), _cast_out(y, out_ptr), mask=mask)

    # Planar kernels: program (p, j) handles block j of plane p = b * C + c, so sample, channel, time and
    # coefficients are per-program scalars and no element pays a 64-bit division (the flat kernels above do).
    # Taken when planes are large (S >= PLANE_MIN); the forward-noise one also needs S % 4 == 0 (rows on counters).
    @triton.jit
    def forward_noise_plane_kernel(x_ptr, out_ptr, t_ptr, ca_ptr, cb_ptr, T, seed_ptr, off_ptr, N, K, B, C, S,
                                   xsb, xsc, xss, osb, osc, oss, tk, tb, F64: tl.constexpr, BLOCK: tl.constexpr):
        N, B, C, S = tl.cast(N, tl.int64), tl.cast(B, tl.int64), tl.cast(C, tl.int64), tl.cast(S, tl.int64)
        k0, k1 = _key(seed_ptr)
        off = tl.load(off_ptr)
        plane = tl.program_id(0).to(tl.int64)
        b = plane // C
        c = plane % C
        row = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # counter in the plane
        lane = tl.arange(0, 4).to(tl.int64)
        sp = row[:, None] * 4 + lane[None, :]
        mask = sp < S
        xv = tl.load(x_ptr + b * xsb + c * xsc + sp * xss, mask=mask, other=0.0)
        xv = xv.to(tl.float64) if F64 else xv.to(tl.float32)
        o_off = c * osc + sp * oss
        for k32 in range(K):
            k = tl.cast(k32, tl.int64)  # k * N passes 2**31 for large K * N
            tv = tl.load(t_ptr + k * tk + b * tb)
            a, sg = _coefs(ca_ptr, cb_ptr, tv, T)
            n0, n1, n2, n3 = _randn4(k0, k1, off + (k * N + plane * S) // 4 + row[:, None])
            y = a * xv + sg * _pick(lane[None, :], n0, n1, n2, n3).to(xv.dtype)
            tl.store(out_ptr + (k * B + b) * osb + o_off, _cast_out(y, out_ptr), mask=mask)

    @triton.jit
    def tweedie_plane_kernel(x_ptr, m_ptr, out_ptr, t_ptr, ca_ptr, cb_ptr, T, sc_ptr, sh_ptr, C, S,
                             xsb, xsc, xss, msb, msc, mss, osb, osc, oss, tb,
                             CLIP: tl.constexpr, NORM: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        plane = tl.program_id(0).to(tl.int64)
        b = plane // C
        c = plane % C
        sp = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = sp < S
        cdt = tl.float64 if F64 else tl.float32
        tv = tl.load(t_ptr + b * tb)
        a, sg = _coefs(ca_ptr, cb_ptr, tv, T)
        xv = tl.load(x_ptr + b * xsb + c * xsc + sp * xss, mask=mask, other=0.0)
        mv = tl.load(m_ptr + b * msb + c * msc + sp * mss, mask=mask, other=0.0)
        y = _xt_term(a, xv.to(cdt)) + sg * mv.to(cdt)
        if CLIP:
            y = _clip(y)
        if NORM:
            y = y * tl.load(sc_ptr + c) + tl.load(sh_ptr + c)
        tl.store(out_ptr + b * osb + c * osc + sp * oss, _cast_out(y, out_ptr), mask=mask)

    @triton.jit
    def _coefs(ca_ptr, cb_ptr, t, T):
        """coef_a[t], coef_b[t]; NaN for a t outside [0, T), never a read outside the tables. The wrapper checks t
        before launching, except while a CUDA graph is captured (no check can run there; the CUDA kernels
        assert instead): a bad t then gives NaN outputs, not numbers read from other memory."""
        ok = (t >= 0) & (t < T)
        return (tl.load(ca_ptr + t, mask=ok, other=float("nan")), tl.load(cb_ptr + t, mask=ok, other=float("nan")))

    @triton.jit
    def _xt_term(a, x):
        """a * x, or 0 where a = 0: x0 prediction ignores x_t, as the reference does, even where it is not finite."""
        return tl.where(a == 0, 0.0, a * x)

    @triton.jit
    def _clip(y):
        """Clamp to [-1, 1], NaN passing through (tl.clamp's NaN option does not lower for float64)."""
        return tl.where(y != y, y, tl.minimum(tl.maximum(y, -1.0), 1.0))

    @triton.jit
    def reverse_step_kernel(x0_ptr, xt_ptr, sig_ptr, sh_ptr, out_ptr, c1_ptr, c2_ptr, seed_ptr, off_ptr, N, C, S,
                            asb, asc, ass, xsb, xsc, xss, ssb, ssc, sss, hsb, hsc, hss, osb, osc, oss,
                            A_CONTIG: tl.constexpr, X_CONTIG: tl.constexpr, S_CONTIG: tl.constexpr,
                            H_CONTIG: tl.constexpr, O_CONTIG: tl.constexpr, NOISE: tl.constexpr, SHIFT: tl.constexpr,
                            F64: tl.constexpr, BLOCK: tl.constexpr):
        # Tile: BLOCK counters x 4 lanes, as forward_noise_kernel; the terms in the reference's order,
        # ((c1 x0_hat + c2 x_t) + sigma z) + shift. NOISE: 0 none, 1 sigma per sample, 2 per element.
        N, C, S = tl.cast(N, tl.int64), tl.cast(C, tl.int64), tl.cast(S, tl.int64)
        row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        lane = tl.arange(0, 4).to(tl.int64)
        i = row[:, None] * 4 + lane[None, :]
        mask = i < N
        cdt = tl.float64 if F64 else tl.float32
        b = i // (C * S)
        a0 = tl.load(x0_ptr + _offset3(i, C, S, asb, asc, ass, A_CONTIG), mask=mask, other=0.0).to(cdt)
        at = tl.load(xt_ptr + _offset3(i, C, S, xsb, xsc, xss, X_CONTIG), mask=mask, other=0.0).to(cdt)
        y = tl.load(c1_ptr + b, mask=mask, other=0.0) * a0 + tl.load(c2_ptr + b, mask=mask, other=0.0) * at
        if NOISE != 0:
            k0, k1 = _key(seed_ptr)
            n0, n1, n2, n3 = _randn4(k0, k1, tl.load(off_ptr) + row[:, None])
            z = _pick(lane[None, :], n0, n1, n2, n3).to(cdt)
            if NOISE == 2:
                sg = tl.load(sig_ptr + _offset3(i, C, S, ssb, ssc, sss, S_CONTIG), mask=mask, other=0.0).to(cdt)
            else:
                sg = tl.load(sig_ptr + b, mask=mask, other=0.0)
            y = y + sg * z
        if SHIFT:
            y = y + tl.load(sh_ptr + _offset3(i, C, S, hsb, hsc, hss, H_CONTIG), mask=mask, other=0.0).to(cdt)
        tl.store(out_ptr + _offset3(i, C, S, osb, osc, oss, O_CONTIG), _cast_out(y, out_ptr), mask=mask)

    @triton.jit
    def philox_normal_kernel(out_ptr, seed_ptr, off_ptr, N, BLOCK: tl.constexpr):
        k0, k1 = _key(seed_ptr)
        row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        lane = tl.arange(0, 4).to(tl.int64)
        i = row[:, None] * 4 + lane[None, :]
        n0, n1, n2, n3 = _randn4(k0, k1, tl.load(off_ptr) + row[:, None])
        tl.store(out_ptr + i, _pick(lane[None, :], n0, n1, n2, n3), mask=i < N)

    @triton.jit
    def _gn_tile(c, s, sc, ss, PIXEL_MAJOR: tl.constexpr):
        """Offsets of a tile of channels c [CB] by pixels s [P] (strides sc, ss), the memory's contiguous axis
        last: [P, CB] for channels_last (PIXEL_MAJOR), else [CB, P]."""
        if PIXEL_MAJOR:
            o = s[:, None] * ss + c[None, :] * sc
        else:
            o = c[:, None] * sc + s[None, :] * ss
        return o

    @triton.jit
    def _gn_mask(cm, sm, PIXEL_MAJOR: tl.constexpr):
        """The mask of such a tile from its channel mask cm [CB] and pixel mask sm [P]."""
        if PIXEL_MAJOR:
            m = sm[:, None] & cm[None, :]
        else:
            m = cm[:, None] & sm[None, :]
        return m

    @triton.jit
    def _gn_channels(v, PIXEL_MAJOR: tl.constexpr):
        """A per-channel vector [CB] shaped to broadcast over such a tile."""
        if PIXEL_MAJOR:
            r = v[None, :]
        else:
            r = v[:, None]
        return r

    @triton.jit
    def group_norm_silu_kernel(x_ptr, out_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, C, S, G, eps,
                               xsb, xsc, xss, osb, osc, oss, CG: tl.constexpr, CB: tl.constexpr,
                               PIXEL_MAJOR: tl.constexpr, SS: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (sample, group), two reads of its slice: pass 1 sums x - k and (x - k)^2 with k the
        # slice's first element (shifted sums: no cancellation when |mean| >> std); pass 2 normalises
        # ((x - k) - mean(x - k)), applies the affine and the optional scale-shift as one factor and one offset
        # per channel, then SiLU, and stores. The second read of a slice comes from L2.
        # The slice is walked in tiles of CB channels (a chunk of the group's CG) by P = BLOCK // CB pixels whose
        # inner axis is the memory's contiguous one: pixels for NCHW, channels for channels_last (PIXEL_MAJOR).
        # With a unit inner stride (Triton specialises arguments equal to 1) and 16-divisible outer strides the
        # loads and stores are 16-byte vectors; CG is a compile-time constant so that the group's first channel,
        # g * CG, is known aligned. The per-channel factors are loaded once per chunk, not per element.
        P: tl.constexpr = BLOCK // CB
        CFULL: tl.constexpr = CG % CB == 0  # no chunk runs past the group: the channel mask is all true
        pid = tl.program_id(0).to(tl.int64)
        C, S = tl.cast(C, tl.int64), tl.cast(S, tl.int64)
        bi = pid // G
        c0 = (pid % G) * CG
        cdt = tl.float64 if F64 else tl.float32
        xb = x_ptr + bi * xsb + c0 * xsc
        ob = out_ptr + bi * osb + c0 * osc
        k = tl.load(xb).to(cdt)
        cr = tl.arange(0, CB).to(tl.int64)  # 64-bit offsets: c * a channel stride may pass 2**31
        sr = tl.arange(0, P).to(tl.int64)
        if PIXEL_MAJOR:
            acc = tl.zeros([P, CB], dtype=cdt)
            acc2 = tl.zeros([P, CB], dtype=cdt)
        else:
            acc = tl.zeros([CB, P], dtype=cdt)
            acc2 = tl.zeros([CB, P], dtype=cdt)
        for cs in range(0, CG, CB):
            c = cs + cr
            cm = (c < CB) if CFULL else (c < CG)
            for s0 in range(0, S, P):
                sp = s0 + sr
                m = _gn_mask(cm, sp < S, PIXEL_MAJOR)
                v = tl.load(xb + _gn_tile(c, sp, xsc, xss, PIXEL_MAJOR), mask=m, other=0.0).to(cdt)
                d = tl.where(m, v - k, 0.0)
                acc += d
                acc2 += d * d
        n = CG * S
        mean_d = tl.sum(tl.sum(acc, axis=1), axis=0) / n
        var = tl.maximum(tl.sum(tl.sum(acc2, axis=1), axis=0) / n - mean_d * mean_d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        for cs in range(0, CG, CB):
            c = cs + cr
            cm = (c < CB) if CFULL else (c < CG)
            a = rstd * tl.load(w_ptr + c0 + c, mask=cm, other=0.0).to(cdt)
            b = tl.load(b_ptr + c0 + c, mask=cm, other=0.0).to(cdt)
            if SS:
                f = 1.0 + tl.load(sc_ptr + bi * C + c0 + c, mask=cm, other=0.0).to(cdt)
                a = a * f
                b = b * f + tl.load(sh_ptr + bi * C + c0 + c, mask=cm, other=0.0).to(cdt)
            a = _gn_channels(a, PIXEL_MAJOR)
            b = _gn_channels(b, PIXEL_MAJOR)
            for s0 in range(0, S, P):
                sp = s0 + sr
                m = _gn_mask(cm, sp < S, PIXEL_MAJOR)
                v = tl.load(xb + _gn_tile(c, sp, xsc, xss, PIXEL_MAJOR), mask=m, other=0.0).to(cdt)
                y = ((v - k) - mean_d) * a + b
                y = y / (1.0 + tl.exp(-y))
                tl.store(ob + _gn_tile(c, sp, osc, oss, PIXEL_MAJOR), _cast_out(y, out_ptr), mask=m)

    CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b in (128, 256, 512) for w in (4, 8)]
    # tweedie blocks count elements, not 4-element rows: the same configs with 4x the block
    CONFIGS_X4 = [triton.Config({"BLOCK": 4 * c.kwargs["BLOCK"]}, num_warps=c.num_warps) for c in CONFIGS]
    if INTERPRET:  # the interpreter runs every config: one small block is enough for tests
        _forward_noise = forward_noise_kernel
        _tweedie = tweedie_kernel
        _reverse_step = reverse_step_kernel
        _philox_normal = philox_normal_kernel
        _group_norm_silu = group_norm_silu_kernel
        _forward_noise_plane = forward_noise_plane_kernel
        _tweedie_plane = tweedie_plane_kernel
        _FIXED = {"BLOCK": 64}
    else:
        def _tune(kernel, configs, key, units, prune=None):
            prune = prune or prune_blocks(units)
            return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

        _forward_noise = _tune(forward_noise_kernel, CONFIGS, ["N", "K", "X_CONTIG", "O_CONTIG", "ALIGNED", "F64"],
                               lambda a: (a["N"] + 3) // 4)
        _tweedie = _tune(tweedie_kernel, CONFIGS_X4, ["N", "X_CONTIG", "M_CONTIG", "O_CONTIG"], lambda a: a["N"])
        _reverse_step = _tune(reverse_step_kernel, CONFIGS, ["N", "A_CONTIG", "X_CONTIG", "S_CONTIG", "H_CONTIG",
                                                             "O_CONTIG", "NOISE", "SHIFT", "F64"],
                              lambda a: (a["N"] + 3) // 4)
        _philox_normal = _tune(philox_normal_kernel, CONFIGS, ["N"], lambda a: (a["N"] + 3) // 4)
        _forward_noise_plane = _tune(forward_noise_plane_kernel, CONFIGS, ["S", "K", "F64"], lambda a: a["S"] // 4)
        _tweedie_plane = _tune(tweedie_plane_kernel, CONFIGS_X4, ["S", "CLIP", "NORM", "F64"], lambda a: a["S"])
        _group_norm_silu = _tune(group_norm_silu_kernel, CONFIGS_X4, ["S", "CG", "CB", "PIXEL_MAJOR", "SS", "F64"],
                                 None, GROUP_NORM_PRUNE)
        _FIXED = {}

PLANE_MIN = 256  # planes at least this large take the planar kernels (smaller ones would idle most lanes)


def _view3(x: torch.Tensor):
    """(x, C, S, strides) with x seen as [B, C, S]; copies only when the spatial dims cannot merge."""
    for _ in range(2):
        C = x.shape[1] if x.dim() > 1 else 1
        sc = x.stride(1) if x.dim() > 1 else 0
        S, ss, expect, ok = 1, 1, None, True
        for k in range(x.dim() - 1, 1, -1):
            if x.shape[k] == 1:
                continue
            if expect is not None and x.stride(k) != expect:
                ok = False
                break
            if expect is None:
                ss = x.stride(k)
            expect = x.stride(k) * x.shape[k]
            S *= x.shape[k]
        if ok:
            contig = x.is_contiguous()
            return x, C, S, (x.stride(0), sc, ss), contig
        x = x.contiguous()
    raise AssertionError("unreachable")


def _grid(n_units):
    return lambda meta: (triton.cdiv(max(n_units, 1), meta["BLOCK"]),)


def _check_t(t, T: int) -> None:
    """0 <= t < T, before a launch (the kernels cannot raise: a bad t gives NaN there, see _coefs). A CUDA t is
    asserted on the device (no host sync; nothing runs while a CUDA graph is captured); a t elsewhere (the CPU,
    through the interpreter) is checked here on the host, since inside a compiled graph the op's own host check
    was skipped while tracing and nothing else would catch it."""
    if t.is_cuda:
        assert_t_on_device(t, T)
    else:
        check_t_on_host("t", t, T)


def forward_noise_out(x0, t, coef_a, coef_b, seed, offset, out):
    _check_t(t, coef_a.shape[0])
    x0, C, S, xs, xc = _view3(x0)
    _, _, _, os_, oc = _view3(out)
    K, N = t.shape[0], x0.numel()
    if N == 0:
        return
    seed, offset = seed.to(x0.device).reshape(1), offset.to(x0.device).reshape(1)
    F64 = coef_a.dtype == torch.float64
    if S >= PLANE_MIN and S % 4 == 0 and (S // 4 + 127) // 128 < 65536:
        B = N // (C * S)
        _forward_noise_plane[lambda meta: (B * C, triton.cdiv(S // 4, meta["BLOCK"]))](
            x0, out, t, coef_a, coef_b, coef_a.shape[0], seed, offset, N, K, B, C, S, *xs, *os_, t.stride(0),
            t.stride(1), F64=F64,
            **_FIXED)
        return
    _forward_noise[_grid((N + 3) // 4)](x0, out, t, coef_a, coef_b, coef_a.shape[0], seed, offset, N, K, C, S, *xs,
                                        *os_, t.stride(0), t.stride(1), X_CONTIG=xc, O_CONTIG=oc,
                                        ALIGNED=(K == 1 or N % 4 == 0), F64=coef_a.dtype == torch.float64, **_FIXED)


def tweedie_out(x_t, m, t, coef_a, coef_b, clip, scale, shift, out):
    _check_t(t, coef_a.shape[0])
    x_t, C, S, xs, xc = _view3(x_t)
    m, _, _, ms, mc = _view3(m)
    _, _, _, os_, oc = _view3(out)
    N = x_t.numel()
    if N == 0:
        return
    norm = scale is not None
    if S >= PLANE_MIN and (S + 511) // 512 < 65536:
        B = N // (C * S)
        _tweedie_plane[lambda meta: (B * C, triton.cdiv(S, meta["BLOCK"]))](
            x_t, m, out, t, coef_a, coef_b, coef_a.shape[0], scale if norm else coef_a, shift if norm else coef_a, C,
            S, *xs, *ms, *os_, t.stride(0), CLIP=clip, NORM=norm, F64=coef_a.dtype == torch.float64,
            **{k: 4 * v for k, v in _FIXED.items()})
        return
    _tweedie[_grid(N)](x_t, m, out, t, coef_a, coef_b, coef_a.shape[0], scale if norm else coef_a,
                       shift if norm else coef_a, N, C, S, *xs, *ms, *os_, t.stride(0), X_CONTIG=xc, M_CONTIG=mc,
                       O_CONTIG=oc, CLIP=clip, NORM=norm,
                       F64=coef_a.dtype == torch.float64, **{k: 4 * v for k, v in _FIXED.items()})


def reverse_step_out(x0_hat, x_t, c1, c2, sigma, shift, seed, offset, out):
    """Schema reverse_step_out of csrc/schemas.h: sigma None, [B] (per sample) or of x_t's shape (per element)."""
    x0_hat, C, S, as_, ac = _view3(x0_hat)
    x_t, _, _, xs, xc = _view3(x_t)
    _, _, _, os_, oc = _view3(out)
    N = x_t.numel()
    if N == 0:
        return
    noise = 0 if sigma is None else (1 if sigma.dim() == 1 else 2)
    if noise == 2:
        sigma, _, _, ss, sc = _view3(sigma)
    else:
        ss, sc = (0, 0, 0), True
        sigma = sigma.contiguous() if sigma is not None else None  # [B], read as sigma[b]
    if shift is not None:
        shift, _, _, hs, hc = _view3(shift)
    else:
        hs, hc = (0, 0, 0), True
    seed, offset = seed.to(x_t.device).reshape(1), offset.to(x_t.device).reshape(1)
    _reverse_step[_grid((N + 3) // 4)](
        x0_hat, x_t, sigma if sigma is not None else c1, shift if shift is not None else x_t, out, c1.contiguous(),
        c2.contiguous(), seed, offset, N, C, S, *as_, *xs, *ss, *hs, *os_, A_CONTIG=ac, X_CONTIG=xc, S_CONTIG=sc,
        H_CONTIG=hc, O_CONTIG=oc, NOISE=noise, SHIFT=shift is not None, F64=c1.dtype == torch.float64, **_FIXED)


def philox_normal_out(seed, offset, out):
    N = out.numel()
    if N:
        _philox_normal[_grid((N + 3) // 4)](out, seed.to(out.device).reshape(1), offset.to(out.device).reshape(1),
                                            N, **_FIXED)


def group_norm_silu_out(x, num_groups, weight, bias, eps, scale, shift, out):
    """out = SiLU(GroupNorm(x) * weight + bias [* (1 + scale) + shift]); weight, bias [C] and scale, shift [B, C]
    (or None) in the compute dtype."""
    x, C, S, xs, _ = _view3(x)
    _, _, _, os_, _ = _view3(out)
    if not x.numel():
        return
    B, CG = x.shape[0], C // num_groups
    pixel_major = xs[1] == 1 and S > 1 and CG > 1  # channels_last: tiles with channels as the inner axis
    # chunks of at most the smallest BLOCK channels, so that every config's tile holds at least one pixel
    smallest = 4 * _FIXED["BLOCK"] if _FIXED else min(c.kwargs["BLOCK"] for c in CONFIGS_X4)
    ss = scale is not None
    _group_norm_silu[(B * num_groups,)](
        x, out, weight.contiguous(), bias.contiguous(), scale.contiguous() if ss else weight,
        shift.contiguous() if ss else weight, C, S, num_groups, float(eps), *xs, *os_, CG=CG,
        CB=min(triton.next_power_of_2(CG), smallest), PIXEL_MAJOR=pixel_major, SS=ss,
        F64=weight.dtype == torch.float64,
        **{k: 4 * v for k, v in _FIXED.items()})
