"""Bad input raises a clear error that names the argument; a missing backend warns once and falls back."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import CPU_FUSED

import diffaug_kernels as dk
from diffaug_kernels import ops
from diffaug_kernels.ops import checks, dispatch, extension

S = dk.NoiseSchedule.linear(1000)
BACKENDS = ["reference"] + CPU_FUSED
x = torch.rand(2, 3, 4, 4)
m = torch.randn(2, 6, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, exc, match", [
    (lambda b: dk.forward_noise(torch.tensor(1.0), 0, S, backend=b), ValueError, "x0 must have shape"),
    (lambda b: dk.forward_noise(x.int(), 0, S, backend=b), TypeError, "x0 has unsupported dtype"),
    (lambda b: dk.forward_noise(x.to(torch.complex64), 0, S, backend=b), TypeError, "x0 has unsupported dtype"),
    (lambda b: dk.forward_noise([1.0], 0, S, backend=b), TypeError, "x0 must be a torch.Tensor"),
    (lambda b: dk.forward_noise(x, 1000, S, backend=b), ValueError, r"t must lie in \[0, 1000\)"),
    (lambda b: dk.forward_noise(x, -1, S, backend=b), ValueError, r"t must lie in \[0, 1000\)"),
    (lambda b: dk.forward_noise(x, torch.tensor([3, 1000]), S, backend=b), ValueError, r"t must lie in \[0, 1000\)"),
    (lambda b: dk.forward_noise(x, torch.tensor([3, 4, 5]), S, backend=b), ValueError, "t must be an int, a 0-d"),
    (lambda b: dk.forward_noise(x, torch.tensor([3.0, 4.0]), S, backend=b), TypeError, "t must be an integer tensor"),
    (lambda b: dk.forward_noise(x, 2.5, S, backend=b), TypeError, "t must be an int"),
    (lambda b: dk.forward_noise(x, True, S, backend=b), TypeError, "t must be an int"),
    (lambda b: dk.forward_noise(x, torch.tensor([1, 2], device="meta"), S, backend=b), ValueError, "t is on meta"),
    (lambda b: dk.forward_noise(x, 0, S, seed=1.5, backend=b), TypeError, "seed must be an integer"),
    (lambda b: dk.forward_noise(x, 0, S, seed="7", backend=b), TypeError, "seed must be an integer"),
    (lambda b: dk.forward_noise(x, 0, S, seed=True, backend=b), TypeError, "seed must be an integer"),
    (lambda b: dk.forward_noise(x, 0, S, seed=torch.tensor(1.0), backend=b), TypeError, "seed must be an integer"),
    (lambda b: dk.forward_noise(x, 0, S, seed=-2**63 - 1, backend=b), ValueError, r"seed must lie in \[-2\*\*63"),
    (lambda b: dk.forward_noise(x, 0, S, seed=2**64, backend=b), ValueError, "seed must lie in"),
    (lambda b: dk.forward_noise(x, 0, S, offset=2**64, backend=b), ValueError, "offset must lie in"),
    (lambda b: dk.forward_noise(x, 0, S, offset=None, backend=b), TypeError, "offset must be an integer"),
    (lambda b: dk.forward_noise(x, 0, S, out_dtype=torch.int32, backend=b), TypeError, "out_dtype must be"),
    (lambda b: dk.forward_noise(x, 0, "linear", backend=b), TypeError, "schedule must be a dk.NoiseSchedule"),
    (lambda b: dk.forward_noise_multi(x, [], S, backend=b), ValueError, "times must not be empty"),
    (lambda b: dk.forward_noise_multi(x, [0, 1000], S, backend=b), ValueError, r"times must lie in \[0, 1000\)"),
    (lambda b: dk.forward_noise_multi(x, torch.zeros(2, 2, dtype=torch.long), S, backend=b), ValueError,
     "times must be a 1-D"),
    (lambda b: dk.forward_noise_multi(x, [0.5], S, backend=b), TypeError, "times must hold integers"),
    (lambda b: dk.forward_noise_multi(x, None, S, backend=b), TypeError, "times must be a sequence of integers"),
    (lambda b: dk.forward_noise(x.to_sparse(), 0, S, backend=b), TypeError, "x0 must be a dense"),
    (lambda b: dk.forward_noise_multi(x.to_mkldnn(), [0], S, backend=b), TypeError, "x0 must be a dense"),
    (lambda b: dk.tweedie(x.to_sparse(), m, 0, S, backend=b), TypeError, "x_t must be a dense"),
    (lambda b: dk.tweedie(x, m.to_sparse(), 0, S, backend=b), TypeError, "model_output must be a dense"),
    (lambda b: dk.tweedie(x[:, 0, 0, 0], m, 0, S, backend=b), ValueError, "x_t must have shape"),
    (lambda b: dk.tweedie(x, m[:, :5], 0, S, backend=b), ValueError, "model_output must have shape"),
    (lambda b: dk.tweedie(x, m[:, :, :3], 0, S, backend=b), ValueError, "model_output must have shape"),
    (lambda b: dk.tweedie(x, m[:1], 0, S, backend=b), ValueError, "model_output must have shape"),
    (lambda b: dk.tweedie(x, m.int(), 0, S, backend=b), TypeError, "model_output has unsupported dtype"),
    (lambda b: dk.tweedie(x, m.to("meta"), 0, S, backend=b), ValueError, "model_output is on meta"),
    (lambda b: dk.tweedie(x, m, 0, S, prediction="epsilon", backend=b), ValueError, "prediction must be one of"),
    (lambda b: dk.tweedie(x, m, 0, S, clip=1, backend=b), TypeError, "clip must be a bool"),
    (lambda b: dk.tweedie(x, m, 0, S, normalize=((0.5,), (0.5,)), backend=b), ValueError, "normalize needs 3"),
    (lambda b: dk.tweedie(x, m, 0, S, normalize=(0.5, 0.5), backend=b), TypeError, "normalize must be"),
    (lambda b: dk.tweedie(x, m, 0, S, normalize=((0, 0, 0), (1, 0, 1)), backend=b), ValueError, "std must be"),
    (lambda b: dk.tweedie(x, m, 1000, S, backend=b), ValueError, r"t must lie in \[0, 1000\)"),
    (lambda b: dk.philox_normal((3,), seed=0.5, backend=b), TypeError, "seed must be an integer"),
    (lambda b: dk.philox_normal((-1,), seed=1, backend=b), ValueError, "negative sizes"),
    (lambda b: dk.philox_normal((2.5, 3), seed=1, backend=b), TypeError, "shape must be integers"),
    (lambda b: dk.tweedie(x, m, 5, S, normalize=([float("nan")] * 3, [1.0] * 3), backend=b), ValueError,
     "normalize mean must be finite"),
    (lambda b: dk.philox_normal((3,), seed=1, dtype=torch.int64, backend=b), TypeError, "dtype must be"),
])
def test_bad_input(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 0), (0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty_inputs_give_empty_outputs(backend, shape):
    """Nothing to compute is not an error: every op returns its (empty) output, on every backend."""
    x0, mo = torch.rand(shape), torch.randn(shape[0], 2 * shape[1], *shape[2:])
    t = torch.zeros(shape[0], dtype=torch.int64)
    assert dk.forward_noise(x0, t, S, seed=1, backend=backend).shape == shape
    assert dk.forward_noise_multi(x0, [0, 5], S, seed=1, backend=backend).shape == (2 * shape[0], *shape[1:])
    got = dk.tweedie(x0, mo, t, S, normalize=None, backend=backend)
    assert got.shape == shape and got.dtype == x0.dtype
    assert dk.philox_normal(shape, 1, backend=backend).shape == shape
    assert torch.equal(dk.philox_normal(7, 1, backend=backend), dk.philox_normal((7,), 1, backend=backend))


def test_x0_prediction_ignores_x_t_even_where_it_is_not_finite():
    """x0 prediction's x_t coefficient is 0; 0 * inf would be NaN, where the reference returns the model's
    output: every backend must not read x_t into the result at all."""
    xt = torch.randn(2, 3, 8, 8)
    xt[0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    mo = torch.rand(2, 6, 8, 8) * 2 - 1
    want = dk.reference.tweedie(xt, mo, torch.tensor([5, 900]), S, prediction="x0", clip=False)
    assert torch.isfinite(want).all()
    for backend in CPU_FUSED:
        got = dk.tweedie(xt, mo, torch.tensor([5, 900]), S, prediction="x0", clip=False, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 64, 64)])  # general and planar CUDA kernels
def test_x0_prediction_ignores_x_t_on_the_gpu(gpu_backend, shape):
    xt = torch.randn(shape, device="cuda")
    xt[0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    mo = torch.rand(shape[0], 2 * shape[1], *shape[2:], device="cuda") * 2 - 1
    t = torch.tensor([5, 900], device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        want = dk.reference.tweedie(xt.to(dtype), mo.to(dtype), t, S, prediction="x0", clip=False)
        got = dk.tweedie(xt.to(dtype), mo.to(dtype), t, S, prediction="x0", clip=False, backend=gpu_backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        dk.forward_noise(x, 0, S, backend="gpu")


def test_missing_backend_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delitem(dispatch.TABLE, "cuda", raising=False)  # (the tests' CPU emulation of it, if registered)
    dispatch.WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = dk.forward_noise(x, 5, S, seed=1, backend="cuda")  # no CUDA here (or not for CPU tensors)
        b = dk.forward_noise(x, 5, S, seed=1, backend="cuda")
    msgs = [str(v.message) for v in w if "backend 'cuda' is not available" in str(v.message)]
    assert len(msgs) == 1, [str(v.message) for v in w]
    assert torch.equal(a, b) and torch.equal(a, dk.forward_noise(x, 5, S, seed=1))  # same result, not silently other


def test_schedule_tables_follow_the_device_asked_for_and_are_cached():
    """One cached copy per (device, dtype), holding the float64 table's values: asked twice, the same tensor."""
    s = dk.NoiseSchedule.cosine(100)
    for device, dtype in [("cpu", torch.float32), ("cpu", torch.float64), ("meta", torch.float32)]:
        a = s.table("sqrt_alphas_cumprod", device, dtype)
        assert a.device.type == device and a.dtype == dtype and a.shape == (100,)
        assert s.table("sqrt_alphas_cumprod", device, dtype) is a
    want = torch.from_numpy(s._np["sqrt_alphas_cumprod"])
    assert torch.equal(s.table("sqrt_alphas_cumprod", "cpu", torch.float64), want)
    assert s.table("sqrt_alphas_cumprod", "cpu") is not s.table("sqrt_one_minus_alphas_cumprod", "cpu")


def test_extension_was_built():
    """CI must exercise the fused kernels: fail loudly if the build silently fell back to the reference."""
    if os.environ.get("DIFFAUG_ALLOW_NO_EXT") == "1":
        pytest.skip("DIFFAUG_ALLOW_NO_EXT=1")
    assert "cpu" in dk.available_backends(), f"compiled extension missing: {extension.ERROR}"
    assert not extension.stale_sources(), "the extension was built from other sources than csrc/ holds"


def test_an_extension_built_from_other_sources_is_noticed(monkeypatch):
    """The fingerprint check compares the extension's build-time hash of csrc/ with csrc/ now."""
    from diffaug_kernels.ops import sources

    if extension.C is None:
        pytest.skip("no compiled extension")
    assert not extension.stale_sources()
    monkeypatch.setattr(sources, "sources_hash", lambda csrc: 12345)
    assert extension.stale_sources()


def test_triton_kernels_are_tested_here():
    """Without a GPU the Triton kernels run in the interpreter and every backend-parametrised test covers them:
    fail loudly if Triton is missing rather than let those tests vanish from the collection."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton kernels are tested on the device (-m cuda)")
    assert "triton" in CPU_FUSED, f"Triton backend not usable in the interpreter: {dk.available_backends()}"


def test_runs_on_reference_without_extension():
    """Without the compiled extension the package imports, says so once, and every op runs on the reference."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import diffaug_kernels as dk\n"
        "s = dk.NoiseSchedule.linear()\n"
        "print('BACKENDS', dk.available_backends())\n"
        "x = torch.rand(2, 3, 4, 4)\n"
        "y = dk.forward_noise(x, 3, s, seed=1, backend='cpu')\n"
        "y = dk.forward_noise(x, 3, s, seed=1, backend='cpu')\n"
        "z = dk.tweedie(y, torch.randn(2, 6, 4, 4), 3, s)\n"
        "assert torch.equal(y, dk.reference.forward_noise(x, 3, s, 1))\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no Triton-on-CPU either
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, DIFFAUG_DISABLE_EXT="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    assert "BACKENDS ['reference']" in r.stdout
    assert r.stderr.count("compiled extension is not available") == 1, r.stderr
    assert r.stderr.count("backend 'cpu' is not available") == 1, r.stderr


def test_auto_picks_the_fastest_measured_backend(monkeypatch):
    """With several fused backends for a device, "auto" times each once per (op, dtype, size class)."""
    if "triton" not in CPU_FUSED or "cpu" not in CPU_FUSED:
        pytest.skip("needs two fused CPU backends (cpu, and triton in the interpreter)")
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("cpu", "triton"))
    monkeypatch.setattr(dispatch, "MEASURED", {})
    timed = []

    def fake_time(name, run, device, reps=5):
        timed.append(name)
        run(name)
        return {"cpu": 2.0, "triton": 1.0}[name]

    monkeypatch.setattr(dispatch, "_time_backend", fake_time)
    y = dk.forward_noise(x, 5, S, seed=1)
    assert sorted(timed) == ["cpu", "triton"]
    assert list(dispatch.MEASURED.values()) == ["triton"]
    z = dk.forward_noise(x, 5, S, seed=1)  # cached: no more timing
    assert len(timed) == 2
    torch.testing.assert_close(y, z)
    assert_matches_ref = dk.reference.forward_noise(x, 5, S, 1)
    torch.testing.assert_close(z, assert_matches_ref, rtol=1e-6, atol=1e-5)
    assert ops.auto_choice("forward_noise", x) == "triton"
    assert ops.auto_choice("tweedie", x) == "cpu"  # not measured yet: the default order's first

    # the kernel benchmark's auto row says what auto ran
    from diffaug_kernels.bench import harness as bench

    monkeypatch.setattr(dispatch, "MEASURED", {})
    r = bench.run_bench(shapes=[(2, 3, 8, 8)], dtypes=[torch.float32], reps=1, warmup=1, op_names=["forward_noise"],
                        flush=False, print_table=False, progress=False, backends=["cpu", "triton"])
    assert [row["impl"] for row in r["rows"]][-1] == "fused (auto: triton)"


@pytest.mark.parametrize("op", ["forward_noise", "forward_noise_multi", "tweedie"])
@pytest.mark.parametrize("hw", [8, 32])  # Triton's flat kernels (8x8 planes) and planar ones (32x32)
def test_triton_kernels_never_read_outside_the_tables(monkeypatch, op, hw):
    """While a CUDA graph is captured no check of t can run before a Triton kernel (the CUDA kernels assert
    in-kernel). With every check off, a t outside [0, T) gives NaN for its sample, not coefficients read from
    other memory; the in-range sample is untouched. (Triton interpreter: it fails on the old kernels, whose
    unmasked gathers read past the table.)"""
    from diffaug_kernels.ops import reference, triton_kernels

    monkeypatch.setattr(checks, "check_t_values", lambda *a: None)
    monkeypatch.setattr(triton_kernels, "_check_t", lambda *a: None)
    S = dk.NoiseSchedule.linear(1000)
    x = torch.rand(3, 3, hw, hw) * 2 - 1
    t = torch.tensor([5, 1000, -1])
    if op == "tweedie":
        got = dk.tweedie(x, x, t, S, backend="triton")
        want = reference.tweedie(x[:1], x[:1], t[:1], S)
    elif op == "forward_noise":
        got = dk.forward_noise(x, t, S, seed=1, backend="triton")
        want = reference.forward_noise(x, t.clamp(0, 999), S, seed=1)[:1]
    else:
        got = dk.forward_noise_multi(x, t, S, seed=1, backend="triton").view(3, 3, *x.shape[1:])
        got = got.diagonal(dim1=0, dim2=1).movedim(-1, 0)  # time k on sample k: t[k] as the only time
        want = reference.forward_noise_multi(x, t.clamp(0, 999), S, seed=1).view(3, 3, *x.shape[1:])[0, :1]
    assert torch.isnan(got[1:]).all(), "an out-of-range t must give NaN"
    torch.testing.assert_close(got[:1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
@pytest.mark.parametrize("op", ["forward_noise", "tweedie"])
@pytest.mark.parametrize("bad", [1000, -1])  # -1 would otherwise index the table's last entry silently
@pytest.mark.parametrize("hw", [8, 32])  # the CUDA backend's general kernels (8x8 planes) and planar ones (32x32)
def test_out_of_range_t_on_the_gpu_fails_on_the_device(backend, op, bad, hw):
    """A t tensor on the GPU is range-checked on the device (no host sync): the CUDA kernels assert, the Triton
    wrapper and the reference assert asynchronously. A device-side assertion poisons the CUDA context, so each
    case runs in its own process."""
    import subprocess
    import sys

    code = (f"import torch, diffaug_kernels as dk\n"
            f"S = dk.NoiseSchedule.linear(1000)\n"
            f"x = torch.rand(2, 3, {hw}, {hw}, device='cuda')\n"
            f"t = torch.tensor([5, {bad}], device='cuda')\n"
            f"y = dk.forward_noise(x, t, S, seed=1, backend={backend!r}) if {op!r} == 'forward_noise' else "
            f"dk.tweedie(x, x, t, S, backend={backend!r})\n"
            f"torch.cuda.synchronize()\n"
            f"print('NO ERROR')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "NO ERROR" not in r.stdout, r.stdout + r.stderr
    assert "device-side assert" in r.stderr or "Assertion" in r.stderr, r.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["forward_noise", "tweedie"])
def test_compiled_reference_on_the_gpu_refuses_a_negative_t(op):
    """Compiled, the reference asserts 0 <= t < T inside the graph (inductor's device assertion), so t = -1 does
    not read the table's last entry. Its own process: the assertion poisons the CUDA context."""
    import subprocess
    import sys

    call = ("dk.forward_noise(x, t, S, seed=1, backend='reference')" if op == "forward_noise" else
            "dk.tweedie(x, x, t, S, backend='reference')")
    code = (f"import torch, diffaug_kernels as dk\n"
            f"S = dk.NoiseSchedule.linear(1000)\n"
            f"x = torch.rand(2, 3, 8, 8, device='cuda')\n"
            f"f = torch.compile(lambda x, t: {call}, fullgraph=True)\n"
            f"f(x, torch.tensor([5, 6], device='cuda')); torch.cuda.synchronize()\n"
            f"print('GOOD T RAN')\n"
            f"f(x, torch.tensor([5, -1], device='cuda')); torch.cuda.synchronize()\n"
            f"print('NO ERROR')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "GOOD T RAN" in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.returncode != 0 and "NO ERROR" not in r.stdout, r.stdout + r.stderr[-2000:]
    assert "t must lie in" in r.stderr or "device-side assert" in r.stderr or "Assertion" in r.stderr, r.stderr[-2000:]


def test_meta_inputs_give_meta_outputs_of_the_right_shape():
    """Meta tensors (shape inference, no data) pass through every op, and times are still range-checked where
    their values are (a list), not only on a device that has none."""
    xm = torch.empty(2, 3, 8, 8, device="meta", dtype=torch.bfloat16)
    for y, shape in [(dk.forward_noise(xm, 5, S), (2, 3, 8, 8)),
                     (dk.forward_noise_multi(xm, [1, 2, 3], S), (6, 3, 8, 8)),
                     (dk.tweedie(xm, xm, torch.zeros(2, dtype=torch.long, device="meta"), S), (2, 3, 8, 8))]:
        assert y.is_meta and tuple(y.shape) == shape and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"times must lie in \[0, 1000\) for this schedule, got values in \[1, 2000\]"):
        dk.forward_noise_multi(xm, [1, 2000], S)
