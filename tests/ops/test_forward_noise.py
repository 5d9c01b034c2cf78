"""forward_noise and forward_noise_multi: every fused backend against the reference, gradients, layouts."""
import pytest
import torch
from conftest import CPU_FUSED
from helpers import DTYPES, LAYOUTS, assert_matches, image_batches, make_layout
from hypothesis import given
from hypothesis import strategies as st

import diffaug_kernels as dk
from diffaug_kernels import reference

S = dk.NoiseSchedule.linear(1000)
seeds = st.integers(0, 2**64 - 1)
offsets = st.one_of(st.integers(0, 1000), st.integers(2**32 - 50, 2**32 + 50))


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(batch=image_batches(), seed=seeds, offset=offsets, data=st.data(),
       out_dtype=st.sampled_from([None] + DTYPES))
def test_matches_reference(backend, batch, seed, offset, data, out_dtype):
    x, layout = batch
    B = x.shape[0]
    t = torch.tensor(data.draw(st.lists(st.sampled_from([0, 1, 499, 998, 999]) | st.integers(0, 999),
                                        min_size=B, max_size=B)))
    got = dk.forward_noise(x, t, S, seed=seed, offset=offset, out_dtype=out_dtype, backend=backend)
    want = reference.forward_noise(x, t, S, seed, offset, out_dtype)
    assert_matches(got, want)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=5), seed=seeds, t=st.integers(0, 999))
def test_any_rank(backend, shape, seed, t):
    x = torch.rand(*shape) * 2 - 1
    got = dk.forward_noise(x, t, S, seed=seed, backend=backend)
    assert_matches(got, reference.forward_noise(x, t, S, seed))


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(batch=image_batches(max_b=3, max_hw=9), times=st.lists(st.integers(0, 999), min_size=1, max_size=5),
       seed=seeds, offset=offsets)
def test_multi_matches_reference(backend, batch, times, seed, offset):
    x, _ = batch
    got = dk.forward_noise_multi(x, times, S, seed=seed, offset=offset, backend=backend)
    assert got.shape == (len(times) * x.shape[0], *x.shape[1:])
    assert_matches(got, reference.forward_noise_multi(x, times, S, seed, offset))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_multi_is_forward_noise_on_repeated_input(backend):
    """The expansion's definition: the noise of one [K*B, ...] tensor, block k at times[k]."""
    x = torch.rand(3, 2, 5, 6) * 2 - 1
    times = [0, 350, 999, 350]
    got = dk.forward_noise_multi(x, times, S, seed=4, offset=3, backend=backend)
    want = dk.forward_noise(x.repeat(4, 1, 1, 1), torch.tensor(times).repeat_interleave(3), S, seed=4, offset=3,
                            backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_stride_0_batch_of_one_image_is_its_copies(backend, dtype):
    """One image expanded to K rows (stride 0 over the batch, what dk.certify's draws pass): read as it is, the
    same numbers as K real copies, and forward_noise_multi's with K times."""
    img = (torch.rand(1, 3, 5, 6) * 2 - 1).to(dtype)
    t = torch.full((4,), 259)
    got = dk.forward_noise(img.expand(4, -1, -1, -1), t, S, seed=6, offset=8, backend=backend)
    assert torch.equal(got, dk.forward_noise(img.repeat(4, 1, 1, 1), t, S, seed=6, offset=8, backend=backend))
    assert torch.equal(got, dk.forward_noise_multi(img, [259] * 4, S, seed=6, offset=8, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_int_t_and_tensor_t_agree(backend):
    x = torch.rand(4, 3, 8, 8)
    a = dk.forward_noise(x, 250, S, seed=1, backend=backend)
    b = dk.forward_noise(x, torch.full((4,), 250), S, seed=1, backend=backend)
    c = dk.forward_noise(x, torch.tensor(250), S, seed=1, backend=backend)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_formula_recovers_noise(backend):
    """x_t - sqrt(abar) x0 = sqrt(1 - abar) * philox_normal(shape, seed, offset): the noise is the documented one."""
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([10, 900])
    xt = dk.forward_noise(x, t, S, seed=123, offset=9, backend=backend)
    a = S.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = S.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = dk.philox_normal(x.shape, 123, 9, dtype=torch.float64)
    torch.testing.assert_close((xt - a * x) / s, eps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_deterministic_and_seed_sensitive(backend):
    x = torch.rand(2, 3, 33, 35)
    a = dk.forward_noise(x, 500, S, seed=5, backend=backend)
    assert torch.equal(a, dk.forward_noise(x, 500, S, seed=5, backend=backend))
    assert not torch.equal(a, dk.forward_noise(x, 500, S, seed=6, backend=backend))
    assert not torch.equal(a, dk.forward_noise(x, 500, S, seed=5, offset=1, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_seed_none_reproducible_under_manual_seed(backend):
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(3)
    a = dk.forward_noise(x, 500, S, backend=backend)
    torch.manual_seed(3)
    b = dk.forward_noise(x, 500, S, backend=backend)
    c = dk.forward_noise(x, 500, S, backend=backend)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend, layout):
    x = make_layout(torch.rand(2, 3, 4, 5, dtype=torch.float64) * 2 - 1, layout).requires_grad_()
    t = torch.tensor([3, 800])
    assert torch.autograd.gradcheck(lambda x: dk.forward_noise(x, t, S, seed=7, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda x: dk.forward_noise_multi(x, [0, 999, 3], S, seed=7, backend=backend), (x,))


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_equals_reference_autograd(backend, dtype):
    x = torch.rand(3, 2, 6, 6, dtype=dtype).requires_grad_()
    g = torch.randn(9, 2, 6, 6, dtype=dtype)
    (gx,) = torch.autograd.grad(dk.forward_noise_multi(x, [5, 500, 900], S, seed=1, backend=backend), x, g)
    x32 = x.detach().float().requires_grad_()  # the exact gradient, rounded once to dtype
    (rx,) = torch.autograd.grad(reference.forward_noise_multi(x32, [5, 500, 900], S, 1), x32, g.float())
    assert gx.dtype == dtype
    assert_matches(gx, rx.to(dtype), atol32=1e-5)



@pytest.mark.parametrize("backend", [b for b in CPU_FUSED if b == "cpu"])
def test_large_outputs_from_the_buffer_pool_stay_independent(backend):
    """Outputs >= 16 MiB come from a pool of reused buffers: a live output is never handed out again, and a
    recycled one is fully rewritten."""
    x = torch.rand(2, 1, 1536, 1536) * 2 - 1  # 18 MiB
    want = [reference.forward_noise(x, 300, S, s) for s in (1, 2, 3)]
    y1 = dk.forward_noise(x, 300, S, seed=1, backend=backend)
    y2 = dk.forward_noise(x, 300, S, seed=2, backend=backend)
    assert y1.data_ptr() != y2.data_ptr()
    assert_matches(y1, want[0])
    p1 = y1.data_ptr()
    del y1
    y3 = dk.forward_noise(x, 300, S, seed=3, backend=backend)
    assert y3.data_ptr() == p1  # the freed buffer came back: warm memory, no page faults
    assert_matches(y2, want[1])
    assert_matches(y3, want[2])


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 2, 20, 24), (1, 3, 17, 19)])
def test_large_planes_match_reference(backend, layout, shape):
    """Planes of 256+ elements (Triton's planar kernels; S % 4 != 0 keeps the flat one), single and multi."""
    x = make_layout(torch.rand(*shape, dtype=torch.float64).float() * 2 - 1, layout)
    t = torch.randint(0, 1000, (shape[0],))
    assert_matches(dk.forward_noise(x, t, S, seed=5, offset=2**32 - 3, backend=backend),
                   reference.forward_noise(x, t, S, 5, 2**32 - 3))
    assert_matches(dk.forward_noise_multi(x, [0, 450, 999], S, seed=6, offset=1, backend=backend),
                   reference.forward_noise_multi(x, [0, 450, 999], S, 6, 1))


def test_triton_autotune_tries_no_block_larger_than_the_work():
    """The Triton kernels' autotuners drop configs whose BLOCK exceeds the work (each config tried costs a
    compile on first use): checked through Triton's own Autotuner, which runs the hook as it would on a GPU."""
    import triton
    import triton.language as tl

    from diffaug_kernels.ops.triton_kernels import prune_blocks

    @triton.jit
    def kernel(x_ptr, N, BLOCK: tl.constexpr):
        pass

    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (128, 256, 512) for w in (4, 8)]
    tuner = triton.autotune(configs, key=["N"], prune_configs_by={
        "early_config_prune": prune_blocks(lambda a: (a["N"] + 3) // 4)})(kernel)
    for n, blocks in [(0, {128}), (35, {128}), (512, {128}), (516, {128, 256}), (1025, {128, 256, 512}),
                      (10**8, {128, 256, 512})]:
        tuner.nargs = {"x_ptr": None, "N": n}
        kept = tuner.prune_configs({})
        assert {c.kwargs["BLOCK"] for c in kept} == blocks and {c.num_warps for c in kept} == {4, 8}, n


@pytest.mark.parametrize("plane", [False, True])
def test_triton_counters_past_two_to_the_31(plane):
    """forward_noise_multi's block k starts at counter offset + k * N / 4. Triton passes sizes below 2**31 as
    int32, so K * N must be widened in the kernel: called directly (interpreter) on a claimed N = 2**29, one
    tile of each of K = 5 blocks, written side by side; blocks 4 and up need k * N >= 2**31."""
    if "triton" not in CPU_FUSED:
        pytest.skip("the Triton interpreter is not in use (a GPU run covers Triton)")
    from diffaug_kernels.ops import triton_kernels as tk

    N, K, seed, n = 2**29, 5, 123, 256
    x = torch.zeros(n)
    out = torch.full((K * n,), float("nan"))
    t = torch.zeros(K, 1, dtype=torch.int64)
    ca, cb = torch.zeros(1000), torch.ones(1000)  # out = the noise itself
    sd, off = torch.tensor([seed]), torch.tensor([0])
    if plane:  # one plane of n elements (x strides 0: the same n values), block k stored at out[k * n]
        tk.forward_noise_plane_kernel[(1, 1)](x, out, t, ca, cb, 1000, sd, off, N, K, 1, 1, n, 0, 0, 1, n, 0, 1, 0, 0,
                                       F64=False, BLOCK=n // 4)
    else:  # C = 1, S = N; out strides (n, 0, 1): block k stored at out[k * n]
        tk.forward_noise_kernel[(1,)](x, out, t, ca, cb, 1000, sd, off, N, K, 1, N, 0, 0, 1, n, 0, 1, 0, 0,
                               X_CONTIG=False, O_CONTIG=False, ALIGNED=True, F64=False, BLOCK=n // 4)
    for k in range(K):
        torch.testing.assert_close(out[k * n:(k + 1) * n], reference.philox_normal((n,), seed, k * N // 4),
                                   rtol=1e-6, atol=2e-6, msg=f"block {k}")


# ------------------------------------------------------------------------------- on a GPU (-m cuda)
# (Tests taking cuda_kernels run the CUDA backend on the GPU there, and emulated on a machine without one.)
CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 3, 17, 19), (8, 3, 32, 32), (2, 4, 64, 64), (5, 1, 1, 7)])
def test_forward_noise_on_gpu(gpu_backend, dtype, layout, shape):
    x = make_layout(torch.rand(*shape, device=CUDA, dtype=torch.float64).to(dtype) * 2 - 1, layout)
    t = torch.randint(0, 1000, (shape[0],), device=CUDA)
    for out_dtype in (None, torch.float32, torch.bfloat16):
        got = dk.forward_noise(x, t, S, seed=2**40 + 3, offset=2**32 - 7, out_dtype=out_dtype, backend=gpu_backend)
        assert_matches(got, reference.forward_noise(x, t, S, 2**40 + 3, 2**32 - 7, out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (2, 3, 56, 56)])
def test_cuda_planar_block_sizes(cuda_kernels, dtype, shape):
    """The CUDA planar launch's block choice: 16-bit planes take 224 threads (224x224: 28 whole blocks per
    plane; 56x56: 2, the second part idle); float32 takes 256 at 224x224 and 160 at 56x56 (5 whole blocks).
    Every element written, single and multi. (Triton's launch does not depend on this.)"""
    x = torch.rand(*shape, device=cuda_kernels, dtype=torch.float64).to(dtype) * 2 - 1
    t = torch.randint(0, 1000, (shape[0],), device=cuda_kernels)
    for out_dtype in (None, torch.float32):
        got = dk.forward_noise(x, t, S, seed=11, offset=5, out_dtype=out_dtype, backend="cuda")
        assert_matches(got, reference.forward_noise(x, t, S, 11, 5, out_dtype))
    got = dk.forward_noise_multi(x, [0, 250, 999], S, seed=12, backend="cuda")
    assert_matches(got, reference.forward_noise_multi(x, [0, 250, 999], S, 12, 0))


@pytest.mark.parametrize("variant", ["1", "2", "4", "1l", "2l", "4l"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_noise_cuda_planar_variants(cuda_kernels, monkeypatch, variant, dtype):
    """Every shape of the planar CUDA noise kernel (DIFFAUG_CUDA_NOISE_UNITS: units per thread, block order)
    gives the reference's noise, every element written (outputs start as NaN): planes a whole number of blocks
    (224x224), with spare units in the last slice (56x56, 24x20) and narrower than a block (8x32); single and
    multi (K blocks); a mixed output dtype takes the basic shape."""
    monkeypatch.setenv("DIFFAUG_CUDA_NOISE_UNITS", variant)
    for shape in ((2, 3, 224, 224), (2, 3, 56, 56), (3, 3, 24, 20), (3, 3, 8, 32)):
        x = torch.rand(*shape, device=cuda_kernels, dtype=torch.float64).to(dtype) * 2 - 1
        t = torch.randint(0, 1000, (shape[0],), device=cuda_kernels)
        for out_dtype in (None, torch.float32):
            got = dk.forward_noise(x, t, S, seed=2**40 + 5, offset=2**32 - 3, out_dtype=out_dtype, backend="cuda")
            assert_matches(got, reference.forward_noise(x, t, S, 2**40 + 5, 2**32 - 3, out_dtype))
        got = dk.forward_noise_multi(x, [0, 250, 999], S, seed=13, offset=7, backend="cuda")
        assert_matches(got, reference.forward_noise_multi(x, [0, 250, 999], S, 13, 7))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_cuda_general_kernels(cuda_kernels, layout):
    """Layouts the planar kernels do not take (channels_last: planes not dense; strided: no vector access) go
    to the general grid-stride kernel; 2x3x64x64 is more units than the emulated device's grid (1 SM, 2048
    threads), so the loop takes several passes there. Single, multi, and an odd size (K blocks not starting on
    a counter boundary)."""
    for shape in ((2, 3, 64, 64), (3, 3, 17, 19)):
        x = make_layout((torch.rand(*shape, device=cuda_kernels, dtype=torch.float64) * 2 - 1).float(), layout)
        t = torch.randint(0, 1000, (shape[0],), device=cuda_kernels)
        for out_dtype in (None, torch.bfloat16):
            got = dk.forward_noise(x, t, S, seed=21, offset=2**32 - 1, out_dtype=out_dtype, backend="cuda")
            assert_matches(got, reference.forward_noise(x, t, S, 21, 2**32 - 1, out_dtype))
        got = dk.forward_noise_multi(x, [0, 250, 999], S, seed=22, offset=3, backend="cuda")
        assert_matches(got, reference.forward_noise_multi(x, [0, 250, 999], S, 22, 3))


def test_forward_noise_cuda_variant_setting_is_checked(cuda_kernels, monkeypatch):
    monkeypatch.setenv("DIFFAUG_CUDA_NOISE_UNITS", "8")
    x = torch.rand(2, 3, 32, 32, device=cuda_kernels)
    with pytest.raises(RuntimeError, match="DIFFAUG_CUDA_NOISE_UNITS must be 1, 2 or 4"):
        dk.forward_noise(x, 5, S, seed=1, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3, 17, 19), (4, 3, 32, 32), (2, 3, 5, 5)])
def test_forward_noise_multi_on_gpu(gpu_backend, dtype, shape):
    x = torch.rand(*shape, device=CUDA).to(dtype) * 2 - 1
    times = list(range(0, 451, 50))
    got = dk.forward_noise_multi(x, times, S, seed=9, offset=1, backend=gpu_backend)
    assert_matches(got, reference.forward_noise_multi(x, times, S, 9, 1))
