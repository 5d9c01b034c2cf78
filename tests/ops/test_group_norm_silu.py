"""group_norm_silu: every backend against a float64 reference (NCHW and channels_last, every dtype, with and without
ADM's scale-shift, strided views), shifted statistics, gradients (gradcheck through the custom op), the op's
registration, which kernel each backend runs, errors, and the Triton kernel's global accesses in its sm_90 PTX."""
import sys

import pytest
import torch
from conftest import CPU_FUSED
from helpers import DTYPES, MANTISSA, assert_matches, ulp

import diffaug_kernels as dk
from diffaug_kernels import reference
from diffaug_kernels.ops import dispatch
from diffaug_kernels.ops.group_norm_silu import group_norm_silu_op

BACKENDS = ["reference"] + CPU_FUSED
# (B, C, spatial, groups): ADM's 32 groups of several channels, one channel per group, odd sizes, a 3-D input,
# groups longer than the CPU kernel's 512-value chunks (several chunks per channel and per pixel block), groups of
# 8 channels (the 256x256 UNet's first level) and a group wider than the Triton kernel's channel chunk (the
# interpreter's is 256 channels: two chunks, the second part masked); for the CPU kernel's channels_last path,
# blocks of 64 channels (4 of them) and groups of 6 channels (blocks of 96: one whole, one partial)
SHAPES = [(2, 64, (5, 3), 32), (1, 6, (4, 4), 6), (3, 12, (7, 1), 2), (2, 8, (9,), 4), (2, 6, (23, 25), 2),
          (2, 64, (4, 6), 8), (1, 300, (3, 2), 1), (2, 256, (3, 5), 32), (1, 162, (6, 7), 27)]


def ref64(x, G, w, b, eps=1e-5, scale=None, shift=None):
    """The reference in float64 on x's values (what a kernel reads)."""
    d = (None if v is None else v.detach().double() for v in (scale, shift))
    return reference.group_norm_silu(x.detach().double(), G, w.detach().double(), b.detach().double(), eps, *d)


def case(shape, dtype, layout, scale_shift, seed, mean=0.5, std=2.0):
    B, C, sp, G = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, *sp, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = 1 + 0.5 * torch.randn(C, generator=g), 0.5 * torch.randn(C, generator=g)
    ss = (torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)) if scale_shift else (None, None)
    return x, G, w, b, ss


def check(out, x, want):
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.dim() == 4 and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    if x.dtype == torch.float64:
        assert_matches(out, want, atol32=1e-10)
    elif x.dtype in MANTISSA:
        assert_matches(out, want.to(x.dtype), atol32=1e-5)  # one ulp of the output dtype
        assert ((out.double() - want).abs() <= 1e-5 + 1.0001 * ulp(want, x.dtype)).all()
    else:
        assert_matches(out, want.float(), atol32=1e-5, mag=want.abs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_shift", [False, True])
def test_matches_float64_reference(backend, layout, dtype, scale_shift):
    for i, shape in enumerate(SHAPES):
        if layout == "channels_last" and len(shape[2]) != 2:
            continue
        x, G, w, b, (sc, sh) = case(shape, dtype, layout, scale_shift, seed=17 * i + DTYPES.index(dtype))
        out = dk.group_norm_silu(x, G, w, b, 1e-5, sc, sh, backend=backend)
        check(out, x, ref64(x, G, w, b, 1e-5, sc, sh))


FUSED = [n for n in CPU_FUSED if dispatch.kernels(n).group_norm_silu_out is not None]  # those with a kernel


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]])
def test_large_mean_small_spread(backend, layout, shape):
    """|mean| >> std: the kernels' statistics do not cancel (they take x - k, k a value of the group), so they
    stay within float32 rounding of the float64 reference, where torch's float32 group_norm (the reference's)
    loses about 1e-3 here."""
    x, G, w, b, _ = case(shape, torch.float32, layout, False, seed=5, mean=300.0, std=0.05)
    check(dk.group_norm_silu(x, G, w, b, backend=backend), x, ref64(x, G, w, b))


def strided_views():
    """x as views the kernels read in place or copy: a channel slice, a stride-2 spatial slice, swapped spatial
    dims (not mergeable), a channels-last 3-D input (read pixel by pixel, written contiguous), 1x1 channels_last,
    a channel slice of a channels_last tensor (rows 16 channels apart, 8 read)."""
    g = torch.Generator().manual_seed(12)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 2 + 0.5

    return [rnd(2, 12, 5, 6)[:, 2:10], rnd(2, 8, 6, 10)[..., ::2], rnd(2, 8, 5, 6).transpose(2, 3),
            rnd(2, 9, 8).transpose(1, 2), rnd(3, 8, 1, 1).contiguous(memory_format=torch.channels_last),
            rnd(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)[:, 4:12]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_shift", [False, True])
def test_strided_inputs(backend, scale_shift):
    for i, x in enumerate(strided_views()):
        B, C = x.shape[:2]
        g = torch.Generator().manual_seed(i)
        w, b = 1 + 0.5 * torch.randn(C, generator=g), 0.5 * torch.randn(C, generator=g)
        sc, sh = (torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)) if scale_shift else (None, None)
        out = dk.group_norm_silu(x, 4, w, b, 1e-5, sc, sh, backend=backend)
        assert out.shape == x.shape and out.dtype == x.dtype
        want = ref64(x, 4, w, b, 1e-5, sc, sh)
        assert_matches(out, want.float(), atol32=1e-5, mag=want.abs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_adm_chunked_scale_shift_and_eps(backend):
    """scale and shift as ADM passes them (chunks of a [B, 2C, 1, 1] tensor), another eps, mixed dtypes."""
    x, G, w, b, _ = case(SHAPES[0], torch.bfloat16, "channels_last", False, seed=9)
    emb = torch.randn(2, 128, 1, 1).to(torch.bfloat16)
    sc, sh = emb.chunk(2, dim=1)
    out = dk.group_norm_silu(x, G, w, b, 1e-6, sc, sh, backend=backend)
    check(out, x, ref64(x, G, w, b, 1e-6, sc, sh))


def test_reference_is_guided_diffusions_group_norm32_then_silu():
    """GroupNorm32 (float32 statistics, cast back) then SiLU, and ADM's scale-shift order, in float32."""
    x, G, w, b, (sc, sh) = case(SHAPES[0], torch.float32, "contiguous", True, seed=1)
    gn = torch.nn.functional.group_norm(x, G, w, b, 1e-5)
    torch.testing.assert_close(reference.group_norm_silu(x, G, w, b), torch.nn.functional.silu(gn))
    want = torch.nn.functional.silu(gn * (1 + sc[:, :, None, None]) + sh[:, :, None, None])
    torch.testing.assert_close(reference.group_norm_silu(x, G, w, b, 1e-5, sc, sh), want)


@pytest.mark.skipif("cpu" not in CPU_FUSED, reason="the compiled extension is not loaded")
def test_cpu_backend_and_auto_run_the_cpp_kernel(monkeypatch):
    """"cpu" and "auto" on CPU tensors call csrc/'s kernel (plain calls and through the op), which gives the float64
    reference's numbers to the op's tolerances."""
    kernel, calls = dispatch.kernels("cpu").group_norm_silu_out, []
    assert kernel is not None
    monkeypatch.setattr(dispatch.kernels("cpu"), "group_norm_silu_out", lambda *a: calls.append(1) or kernel(*a))
    x, G, w, b, (sc, sh) = case(SHAPES[0], torch.float32, "channels_last", True, seed=2)
    want = ref64(x, G, w, b, 1e-5, sc, sh)
    for backend in ("cpu", "auto"):
        check(dk.group_norm_silu(x, G, w, b, 1e-5, sc, sh, backend=backend), x, want)
        check(dk.group_norm_silu(x.requires_grad_(), G, w, b, 1e-5, sc, sh, backend=backend).detach(), x, want)
        x = x.detach()
    assert len(calls) == 4


@pytest.mark.skipif("cpu" not in CPU_FUSED, reason="the compiled extension is not loaded")
def test_a_backend_without_the_kernel_runs_the_reference(monkeypatch):
    """A backend built without this op's kernel (its entry None) runs the reference, auto's choice included."""
    monkeypatch.setattr(dispatch.kernels("cpu"), "group_norm_silu_out", None)
    x, G, w, b, (sc, sh) = case(SHAPES[0], torch.bfloat16, "contiguous", True, seed=2)
    want = reference.group_norm_silu(x, G, w, b, 1e-5, sc, sh)
    for backend in ("cpu", "auto"):
        assert torch.equal(dk.group_norm_silu(x, G, w, b, 1e-5, sc, sh, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_gradcheck(backend, layout, scale_shift):
    x, G, w, b, (sc, sh) = case((2, 4, (2, 2), 2), torch.float64, layout, scale_shift, seed=3)
    ins = [x, w.double(), b.double()] + ([sc.double(), sh.double()] if scale_shift else [])
    ins = [v.detach().requires_grad_() for v in ins]

    def f(x, w, b, *ss):
        return dk.group_norm_silu(x, G, w, b, 1e-5, *ss, backend=backend)

    assert torch.autograd.gradcheck(f, ins)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_the_references_autograd(backend, dtype):
    """The op's closed-form backward (float32) against autograd through the reference, low-precision x included:
    gradients come back in each input's dtype."""
    x, G, w, b, (sc, sh) = case(SHAPES[0], dtype, "channels_last", True, seed=4)
    sc, sh = sc.to(dtype), sh.to(dtype)
    grads = []
    for fn in (lambda *a: dk.group_norm_silu(*a[:4], 1e-5, *a[4:], backend=backend), reference.group_norm_silu):
        ins = [v.detach().requires_grad_() for v in (x, w, b, sc, sh)]
        out = fn(ins[0], G, *ins[1:3], *([1e-5] if fn is reference.group_norm_silu else []), *ins[3:])
        g = torch.Generator().manual_seed(0)
        out.backward(torch.randn(out.shape, generator=g).to(dtype))
        grads.append([v.grad for v in ins])
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        tol = 1e-4 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


BACKWARD = [n for n in CPU_FUSED if dispatch.kernels(n).group_norm_silu_backward_out is not None]


@pytest.mark.parametrize("backend", BACKWARD)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_backward_kernel_equals_the_closed_form(monkeypatch, backend, dtype, scale_shift):
    """channels_last x on the CPU backend: the C++ backward (dx and the sums behind the other gradients) against
    the closed form in PyTorch it replaces, in float64 to rounding, in float32 against float64; blocks of 64
    channels, a partial block of groups of 6, the gradient in either layout."""
    gns = sys.modules["diffaug_kernels.ops.group_norm_silu"]  # the module (ops.group_norm_silu is the function)

    def grads(x, G, w, b, sc, sh, gout, dt):
        ins = [v.detach().to(dt).requires_grad_() for v in (x, w, b, *((sc, sh) if scale_shift else ()))]
        out = dk.group_norm_silu(ins[0], G, ins[1], ins[2], 1e-5, *ins[3:], backend=backend)
        out.backward(gout.to(dt))
        return [v.grad for v in ins]

    for i, shape in enumerate([(2, 256, (3, 5), 32), (1, 162, (6, 7), 27), (2, 64, (5, 3), 32)]):
        x, G, w, b, (sc, sh) = case(shape, torch.float64, "channels_last", True, seed=30 + i)
        for gout in (torch.randn_like(x), torch.randn(x.shape, dtype=x.dtype)):  # channels_last, contiguous
            assert gns.backward_kernel(x, backend) is not None
            got = grads(x, G, w, b, sc, sh, gout, dtype)
            with monkeypatch.context() as m:
                m.setattr(gns, "backward_kernel", lambda x, backend: None)
                want = grads(x, G, w, b, sc, sh, gout, torch.float64)
            assert got[0].is_contiguous(memory_format=torch.channels_last)
            for g, ref in zip(got, want):
                tol = 1e-10 if dtype == torch.float64 else 2e-5
                torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKWARD)
def test_double_backward_through_the_cpu_kernel_path(backend):
    """create_graph=True takes the differentiable closed form, so second derivatives work in channels_last too
    (the backward kernel has no derivative of its own)."""
    x, G, w, b, (sc, sh) = case((2, 4, (2, 2), 2), torch.float64, "channels_last", True, seed=6)
    ins = [v.detach().double().requires_grad_() for v in (x, w, b, sc, sh)]

    def f(x, w, b, sc, sh):
        return dk.group_norm_silu(x, G, w, b, 1e-5, sc, sh, backend=backend)

    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.parametrize("backend", BACKWARD)
def test_backward_opcheck(backend):
    from diffaug_kernels.ops.group_norm_silu import group_norm_silu_backward_op

    x = torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    w, b, sc, sh = torch.rand(8), torch.rand(8), torch.rand(2, 8), torch.rand(2, 8)
    torch.library.opcheck(group_norm_silu_backward_op, (torch.randn_like(x), x, w, b, sc, sh, 2, 1e-5, backend))
    torch.library.opcheck(group_norm_silu_backward_op, (torch.randn(2, 8, 3, 5), x, w, b, None, None, 4, 1e-5,
                                                        backend))


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    w, b = torch.rand(8, requires_grad=True), torch.rand(8, requires_grad=True)
    sc, sh = torch.rand(2, 8, requires_grad=True), torch.rand(2, 8, requires_grad=True)
    torch.library.opcheck(group_norm_silu_op, (x, w, b, None, None, 4, 1e-5, backend))
    torch.library.opcheck(group_norm_silu_op, (x.contiguous(memory_format=torch.channels_last), w, b, sc, sh, 2, 1e-5,
                                               backend))


def test_errors():
    x, w, b = torch.randn(2, 8, 4, 4), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="num_groups"):
        dk.group_norm_silu(x, 3, w, b)
    with pytest.raises(ValueError, match="weight"):
        dk.group_norm_silu(x, 4, torch.ones(4), b)
    with pytest.raises(ValueError, match="scale and shift"):
        dk.group_norm_silu(x, 4, w, b, scale=torch.ones(2, 8))
    with pytest.raises(ValueError, match="scale"):
        dk.group_norm_silu(x, 4, w, b, scale=torch.ones(8), shift=torch.ones(8))
    with pytest.raises(TypeError, match="x"):
        dk.group_norm_silu(x.int(), 4, w, b)
    with pytest.raises(ValueError, match="x"):
        dk.group_norm_silu(torch.randn(8), 4, w, b)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu(layout, dtype):
    x, G, w, b, (sc, sh) = case((4, 256, (32, 32), 32), dtype, layout, True, seed=6)
    x, w, b, sc, sh = (v.cuda() for v in (x, w, b, sc, sh))
    check(dk.group_norm_silu(x, G, w, b, 1e-5, sc, sh), x, ref64(x, G, w, b, 1e-5, sc, sh))


def test_bench_case_rows_compute_the_op():
    """`bench --ops group_norm_silu`: every row but the copy gives the op's result (float32: the published rows
    round nothing that the op keeps)."""
    from diffaug_kernels.bench import harness as bench

    torch.manual_seed(0)
    case = bench.make_case("group_norm_silu", (2, 64, 4, 4), torch.float32)
    i = case.inputs
    want = ref64(i["x"], i["num_groups"], i["weight"], i["bias"], 1e-5, i["scale"].flatten(1), i["shift"].flatten(1))
    assert case.nbytes == 2 * i["x"].numel() * 4
    for impl, fn in case.impls.items():
        if impl != bench.SAME_COPY:
            torch.testing.assert_close(fn().double(), want, rtol=1e-5, atol=1e-5, msg=impl)


TRITON_SM90 = r"""
import re

import torch
from sm90 import global_accesses, launch_configs

from diffaug_kernels.ops import triton_kernels as tk

failures = []
for dtype in (torch.bfloat16, torch.float32):
    for (C, H, W), layouts in [((256, 56, 56), ("nchw", "cl")), ((512, 28, 28), ("nchw", "cl")),
                               ((1024, 14, 14), ("cl",))]:
        for layout in layouts:
            x = torch.zeros(2, C, H, W, dtype=dtype)
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
            w, b, sc = torch.ones(C), torch.zeros(C), torch.zeros(2, C)
            launch = lambda: tk.group_norm_silu_out(x, 32, w, b, 1e-5, sc, sc, torch.empty_like(x))  # noqa: E731
            for cfg, k in launch_configs(tk, "_group_norm_silu", launch):
                ld, st = global_accesses(k.asm["ptx"], "ld"), global_accesses(k.asm["ptx"], "st")
                case = (str(dtype), C, H, layout, cfg.kwargs["BLOCK"], cfg.num_warps, sorted(ld), sorted(st))
                narrow = [n for n in ld if n == x.element_size()]
                # both passes read x in 16-byte vectors, every store is one; the one narrow read of x is the shift k
                if ld.count(16) < 2 or not st or set(st) != {16} or (dtype == torch.bfloat16 and len(narrow) > 1):
                    failures.append(case)
                # every pointer offset is 64-bit (a channel stride times a channel index may pass 2**31)
                ttir = [line.split(" loc(")[0].strip() for line in k.asm["ttir"].splitlines()]
                if [line for line in ttir if "tt.addptr" in line and not re.search(r"(, i64|xi64>)$", line)]:
                    failures.append(case + ("32-bit pointer offset",))
                print(*case)
assert not failures, failures
print("GN-SM90-16B-OK")
"""


def test_triton_kernel_moves_16_byte_vectors_on_hopper(tmp_path):
    """The interpreter does not show how the kernel compiles: compile the launches a GPU would make on the 256x256
    UNet's activation shapes, with every config the autotuner keeps (tests/sm90.py), and check the PTX: both
    passes read x in 16-byte vectors and every store writes 16 bytes, channels_last (the compiled UNet's layout)
    and NCHW, bf16 and fp32 (NCHW only where the plane is 16-divisible: 14x14 is not); and every pointer offset
    is 64-bit (TTIR)."""
    from sm90 import run_script

    r = run_script(TRITON_SM90, tmp_path)
    assert "GN-SM90-16B-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
