"""The noise stream: Philox4x32-10 words, the normal transform, offsets, statistics, determinism."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import CPU_FUSED
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import stats

import diffaug_kernels as dk
from diffaug_kernels import reference
from diffaug_kernels.ops import philox_uint32

# The backends that expose raw Philox words (philox_uint32); the others' words are checked through their normals.
WORDS = [b for b in CPU_FUSED if b == "cpu"]

# Random123's known-answer vectors for philox4x32-10 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
]


@pytest.mark.parametrize("backend", ["reference"] + WORDS)
def test_known_answers(backend):
    for ctr, key, want in KAT:
        if ctr[2:] != (0, 0):  # our stream fixes words 2, 3 to zero; check the all-ones vector via the raw rounds
            continue
        seed = key[0] | (key[1] << 32)
        got = philox_uint32(1, seed, ctr[0] | (ctr[1] << 32), backend=backend)
        assert tuple(got[0].tolist()) == want


def test_known_answer_all_ones_through_rounds():
    """The reference's round function itself (counter words 2, 3 non-zero, which the streams never use)
    against Random123's known answer."""
    (ctr, key, want) = KAT[1]
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    got = reference.philox_rounds(*c, torch.tensor(key[0]), torch.tensor(key[1]))
    assert tuple(int(v) for v in got[0]) == want


@pytest.mark.parametrize("backend", WORDS)
@given(seed=st.integers(0, 2**64 - 1), offset=st.one_of(st.integers(0, 2**40), st.integers(2**32 - 70, 2**32 + 5)),
       n=st.integers(1, 300))
@example(seed=2**64 - 1, offset=2**32 - 9, n=64)  # the carry inside a 16-counter vector block (AVX-512 path)
def test_uint32_stream_exact(backend, seed, offset, n):
    """Same words on every backend, including counters that carry from word 0 into word 1. The CPU backend's
    words come from the same function its normals use (16 counters at a time where AVX-512 is there)."""
    assert torch.equal(philox_uint32(n, seed, offset, backend=backend),
                       philox_uint32(n, seed, offset, backend="reference"))


@pytest.mark.parametrize("backend", CPU_FUSED)
@given(seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**33), n=st.integers(0, 2000))
def test_normals_match_reference(backend, seed, offset, n):
    got = dk.philox_normal((n,), seed, offset, backend=backend)
    want = reference.philox_normal((n,), seed, offset)
    assert got.shape == want.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_one_rule_for_int_and_tensor_seeds_and_offsets(backend):
    """A seed or offset is 64 bits: the int -v, the tensor -v (its int64 bits) and the int 2**64 - v are one value,
    and the counter wraps from 2**64 - 1 to 0."""
    for v in (1, 5, 2**63):
        want = dk.philox_normal((32,), 2**64 - v, 2**64 - v, backend=backend)
        assert torch.equal(dk.philox_normal((32,), -v, -v, backend=backend), want)
        assert torch.equal(dk.philox_normal((32,), torch.tensor(-v), torch.tensor(-v), backend=backend), want)
    wrapped = dk.philox_normal((24,), 7, 2**64 - 2, backend=backend)  # counters 2**64 - 2, 2**64 - 1, 0, 1, ...
    assert torch.equal(wrapped[8:], dk.philox_normal((16,), 7, 0, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_offset_shifts_the_stream(backend):
    full = dk.philox_normal((4 * 100 + 37,), 9, 0, backend=backend)
    part = dk.philox_normal((37,), 9, 100, backend=backend)
    assert torch.equal(part, full[400:])


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_shape_and_dtype(backend):
    z = dk.philox_normal((2, 3, 5), seed=1, dtype=torch.bfloat16, backend=backend)
    assert z.shape == (2, 3, 5) and z.dtype == torch.bfloat16
    assert torch.equal(z, dk.philox_normal((30,), 1, backend=backend).to(torch.bfloat16).reshape(2, 3, 5))


def test_seed_none_uses_torch_generator():
    torch.manual_seed(0)
    a = dk.philox_normal((64,))
    torch.manual_seed(0)
    b = dk.philox_normal((64,))
    c = dk.philox_normal((64,))
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_deterministic_across_thread_counts(backend):
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = dk.philox_normal((100_003,), 77, 5, backend=backend)
        torch.set_num_threads(max(2, n0))
        b = dk.philox_normal((100_003,), 77, 5, backend=backend)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- statistics
N = 1 << 20


@pytest.fixture(scope="module")
def z():
    return dk.philox_normal((N,), seed=20241125, offset=0).double().numpy()


def test_mean_variance(z):
    assert abs(z.mean()) < 5 / np.sqrt(N)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / N)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / N)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / N)


def test_normality(z):
    assert stats.kstest(z, "norm").pvalue > 1e-4
    hist, edges = np.histogram(z, bins=np.linspace(-4, 4, 41))
    expected = N * np.diff(stats.norm.cdf(edges))
    assert stats.chisquare(hist, expected * hist.sum() / expected.sum()).pvalue > 1e-4


@pytest.mark.parametrize("k", [3.0, 4.0])
def test_tails(z, k):
    hits = int((np.abs(z) > k).sum())
    assert stats.binomtest(hits, N, 2 * stats.norm.sf(k)).pvalue > 1e-4
    assert np.abs(z).max() < 5.7  # Box-Muller's u1 >= 1e-7 bounds |z| by sqrt(-2 ln 1e-7) = 5.68


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8, 224])
def test_independent_neighbours(z, lag):
    r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
    assert abs(r) < 5 / np.sqrt(N)
    # the two members of a Box-Muller pair are uncorrelated in magnitude too (|z| shares the radius)
    if lag == 1:
        r2 = np.corrcoef(z[0::4] ** 2, z[1::4] ** 2)[0, 1]
        assert abs(r2) < 5 / np.sqrt(N // 4)


def test_independent_lanes(z):
    lanes = z.reshape(-1, 4)
    c = np.corrcoef(lanes.T)
    assert np.all(np.abs(c - np.eye(4)) < 5 / np.sqrt(N // 4))


@pytest.mark.parametrize("other", [dict(seed=20241126, offset=0), dict(seed=20241125, offset=N // 4),
                                   dict(seed=20241125 + 2**32, offset=0)])
def test_independent_seeds_and_offsets(z, other):
    w = dk.philox_normal((N,), **other).double().numpy()
    assert abs(np.corrcoef(z, w)[0, 1]) < 5 / np.sqrt(N)
    assert stats.ks_2samp(z[: N // 4], w[: N // 4]).pvalue > 1e-4


# ------------------------------------------------------------------------------------ against Triton
TRITON_SCRIPT = textwrap.dedent("""
    import sys, torch, triton, triton.language as tl
    import diffaug_kernels as dk
    from diffaug_kernels.ops import philox_uint32

    @triton.jit
    def k(seed, off_ptr, ints, normals, n: tl.constexpr):
        o = tl.load(off_ptr + tl.arange(0, n))
        a, b, c, d = tl.randint4x(seed, o)
        i = tl.arange(0, n) * 4
        tl.store(ints + i, a.to(tl.int32, bitcast=True)); tl.store(ints + i + 1, b.to(tl.int32, bitcast=True))
        tl.store(ints + i + 2, c.to(tl.int32, bitcast=True)); tl.store(ints + i + 3, d.to(tl.int32, bitcast=True))
        p, q, r, s = tl.randn4x(seed, o)
        tl.store(normals + i, p); tl.store(normals + i + 1, q)
        tl.store(normals + i + 2, r); tl.store(normals + i + 3, s)

    n = 64
    for seed, off0, odt in [(123, 5, torch.int32), (2**40 + 7, 2**32 - 20, torch.int64)]:
        offs = torch.arange(off0, off0 + n, dtype=odt)
        ints = torch.empty(4 * n, dtype=torch.int32); normals = torch.empty(4 * n)
        k[(1,)](seed, offs, ints, normals, n)
        want = philox_uint32(n, seed, off0).reshape(-1)
        assert torch.equal(ints.to(torch.int64) & 0xFFFFFFFF, want), "uint32 words differ from Triton"
        ours = dk.philox_normal((4 * n,), seed, off0)
        torch.testing.assert_close(ours, normals, rtol=1e-6, atol=2e-6)
    print("TRITON-OK")
""")


def test_stream_is_tritons_randn4x():
    """docs/design.md section 5 defines the stream as Triton's tl.randint4x / tl.randn4x: check against Triton."""
    import triton  # noqa: F401 - a dependency: missing, this must fail, not skip

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert "TRITON-OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------- on a GPU (-m cuda)
# (Tests taking cuda_kernels run the CUDA backend on the GPU there, and emulated on a machine without one.)
CUDA = torch.device("cuda")
S = dk.NoiseSchedule.linear(1000)


@pytest.mark.cuda
def test_one_noise_stream_on_every_backend():
    x = torch.rand(4, 3, 40, 40)
    cpu = dk.forward_noise(x, 700, S, seed=77, backend="cpu")
    for b in ("cuda", "triton"):
        gpu = dk.forward_noise(x.to(CUDA), 700, S, seed=77, backend=b).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-5)
        z = dk.philox_normal((10_001,), 5, 3, device=CUDA, backend=b).cpu()
        torch.testing.assert_close(z, dk.philox_normal((10_001,), 5, 3, backend="cpu"), rtol=1e-6, atol=2e-6)


def test_cuda_normals_with_either_math_match_the_reference(cuda_kernels, monkeypatch):
    """The CUDA kernels' branch-free log, sincos and sqrt (philox.h, the default) and libm's
    (DIFFAUG_CUDA_RNG_MATH=libm, philox_normal only, kept for tools/floor.py's comparison) both give the
    reference's normals, over 4M of them; any other value is an error naming the setting."""
    n, seed, off = 1 << 22, 2**40 + 3, 2**32 - 5
    want = reference.philox_normal((n,), seed, off)
    for math in ("poly", "libm"):
        monkeypatch.setenv("DIFFAUG_CUDA_RNG_MATH", math)
        got = dk.philox_normal((n,), seed, off, device=cuda_kernels, backend="cuda").cpu()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
    monkeypatch.setenv("DIFFAUG_CUDA_RNG_MATH", "fast")
    with pytest.raises(RuntimeError, match="DIFFAUG_CUDA_RNG_MATH must be poly"):
        dk.philox_normal((8,), 1, device=cuda_kernels, backend="cuda")


@pytest.mark.cuda
def test_cuda_graph_replay_gives_fresh_noise(gpu_backend):
    x = torch.rand(8, 3, 32, 32, device=CUDA) * 2 - 1
    t = torch.full((8,), 900, device=CUDA)
    dk.forward_noise(x, t, S, backend=gpu_backend)  # warm up (autotune, caches) outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = dk.forward_noise(x, t, S, backend=gpu_backend)
    outs = []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        outs.append(y.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert torch.isfinite(outs[0]).all()


@pytest.mark.cuda
def test_host_copies_inside_a_capture_are_clear_errors(gpu_backend):
    """times as a Python list, or a seed tensor on the CPU, would need a host-to-device copy: inside a CUDA-graph
    capture that is an error naming the argument (and a device tensor made before the capture works)."""
    x = torch.rand(2, 3, 8, 8, device=CUDA)
    times = torch.tensor([0, 50], device=CUDA)
    dk.forward_noise_multi(x, times, S, backend=gpu_backend)  # warm up outside the capture
    torch.cuda.synchronize()
    for call, name in [(lambda: dk.forward_noise_multi(x, [0, 50], S, backend=gpu_backend), "times"),
                       (lambda: dk.forward_noise(x, 5, S, seed=torch.tensor(3), backend=gpu_backend), "seed")]:
        g = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=f"{name} would be copied from the host"):
            with torch.cuda.graph(g):
                call()
    g, seed = torch.cuda.CUDAGraph(), torch.tensor(3, device=CUDA)  # made before the capture: no copy in it
    with torch.cuda.graph(g):
        y = dk.forward_noise_multi(x, times, S, seed=seed, backend=gpu_backend)
    g.replay()
    torch.testing.assert_close(y, dk.forward_noise_multi(x, times, S, seed=3, backend=gpu_backend))
