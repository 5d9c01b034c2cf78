"""torch.compile(fullgraph=True) through forward_noise -> tweedie (and tweedie -> reverse_step, a sampler's step): same
result as eager, fresh noise per call with seed=None and no recompilation."""
import importlib

import pytest
import torch
import torch._dynamo
from conftest import CPU_FUSED

import diffaug_kernels as dk

S = dk.NoiseSchedule.linear(1000)
BACKENDS = ["reference"] + CPU_FUSED


def step(x, m, t, seed, backend):
    xt = dk.forward_noise(x, t, S, seed=seed, backend=backend)
    return dk.tweedie(xt, m, t, S, normalize=dk.IMAGENET_NORM, backend=backend)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_equals_eager(backend, compiler):
    x, m, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 6, 8, 8), torch.tensor([100, 700])
    f = torch.compile(lambda x, m, t: step(x, m, t, 1234, backend), fullgraph=True, backend=compiler)
    torch.testing.assert_close(f(x, m, t), step(x, m, t, 1234, backend), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_shapes_compile(backend):
    """dynamic=True: Dynamo makes floats read from globals (dk.IMAGENET_NORM) symbolic; the normalisation still
    traces, and one graph serves two batch sizes with eager's results."""
    f = torch.compile(lambda x, m, t: step(x, m, t, 77, backend), fullgraph=True, dynamic=True)
    for b in (2, 3):
        x, m, t = torch.rand(b, 3, 8, 8) * 2 - 1, torch.randn(b, 6, 8, 8), torch.arange(b) * 300 + 5
        torch.testing.assert_close(f(x, m, t), step(x, m, t, 77, backend), rtol=1e-6, atol=1e-5)


def test_tensor_normalize_inside_compile_is_a_clear_error():
    """normalize's values become per-channel constants read on the host, which a graph cannot do with tensors:
    inside torch.compile, tensors are refused with what to pass instead (not dynamo's tolist() graph-break
    error); floats compile, and eager takes tensors."""
    x, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([3, 500])
    mean, std = torch.tensor(dk.IMAGENET_NORM[0]), torch.tensor(dk.IMAGENET_NORM[1])
    want = dk.tweedie(x, x, t, S, normalize=(mean, std))
    f = torch.compile(lambda x, t, n: dk.tweedie(x, x, t, S, normalize=n), fullgraph=True)
    with pytest.raises(Exception, match="give normalize's mean and std as sequences of Python floats"):
        f(x, t, (mean, std))
    torch.testing.assert_close(f(x, t, (mean.tolist(), std.tolist())), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["forward_noise", "forward_noise_multi", "tweedie"])
@pytest.mark.parametrize("bad", [-1, 1000])
def test_compiled_ops_refuse_out_of_range_t(op, bad, backend):
    """Compiled, the ops' host check of t is skipped. The reference's gather asserts in the graph instead, the
    CPU kernels check t themselves, and the Triton wrapper checks a CPU t on the host (left to the skipped
    check, the kernels would read past the table, silently); the CUDA kernels assert on the device
    (emulated here: the assert raises). So a negative t does not read the table's last entry, nor 1000 past its
    end."""
    x = torch.rand(2, 3, 4, 4)
    fn = {"forward_noise": lambda x, t: dk.forward_noise(x, t, S, seed=1, backend=backend),
          "forward_noise_multi": lambda x, t: dk.forward_noise_multi(x, t, S, seed=1, backend=backend),
          "tweedie": lambda x, t: dk.tweedie(x, x, t, S, clip=False, backend=backend)}[op]
    f = torch.compile(fn, fullgraph=True)
    f(x, torch.tensor([3, 4]))
    msg = r"device-side assert: ti >= 0 && ti < T" if backend == "cuda" else r"t must lie in \[0, 1000\)"
    with pytest.raises((RuntimeError, ValueError), match=msg):
        f(x, torch.tensor([bad, 4]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_noise_without_recompiling(backend):
    x, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([900, 900])
    counts = torch._dynamo.utils.counters
    counts.clear()
    f = torch.compile(lambda x: dk.forward_noise(x, t, S, backend=backend), fullgraph=True, backend="inductor")
    outs = [f(x) for _ in range(4)]
    for i in range(4):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j]), "compiled function repeated its noise"
    assert counts["stats"]["unique_graphs"] == 1, dict(counts["stats"])
    torch.manual_seed(5)
    a = f(x)
    torch.manual_seed(5)
    assert torch.equal(a, f(x)), "torch.manual_seed must make the compiled function reproducible"


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_new_int_seed_does_not_recompile_forever(backend):
    x = torch.rand(2, 3, 8, 8)
    f = torch.compile(lambda x, s: dk.forward_noise(x, 5, S, seed=s, backend=backend), fullgraph=True,
                      backend="aot_eager", dynamic=None)
    counts = torch._dynamo.utils.counters
    counts.clear()
    outs = [f(x, s) for s in range(5)]
    assert counts["stats"]["unique_graphs"] <= 2  # one static, then one with the seed dynamic
    for s, o in enumerate(outs):
        assert torch.equal(o, dk.forward_noise(x, 5, S, seed=s, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_of_2_63_and_more_inside_compile_are_a_clear_error(backend):
    """Seeds lie in [0, 2**64), but inductor holds an int argument that became a symbol as int64: a seed of 2**63
    or more failed inside the compiled graph ("too big to convert to int64_t", or a bad int arg at run time,
    from the second distinct seed on). Inside torch.compile it is refused with what to pass instead; that
    tensor (the seed's int64 bits) gives the eager noise of the int, and smaller ints keep working."""
    x = torch.rand(2, 3, 8, 8)
    f = torch.compile(lambda x, s: dk.forward_noise(x, 5, S, seed=s, backend=backend), fullgraph=True,
                      dynamic=True)
    big = 0xE3E70682C2094CAC
    with pytest.raises(Exception, match="give such a seed as a tensor"):
        f(x, big)
    want = dk.forward_noise(x, 5, S, seed=big, backend=backend)  # eager takes it
    # (inductor's fusion of the reference's math rounds a little differently from eager)
    torch.testing.assert_close(f(x, torch.tensor(big - 2**64)), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f(x, 2**63 - 1), dk.forward_noise(x, 5, S, seed=2**63 - 1, backend=backend),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_compiled_backward(backend):
    x = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_()
    m = torch.randn(2, 6, 8, 8).requires_grad_()
    t = torch.tensor([10, 20])
    f = torch.compile(lambda x, m: step(x, m, t, 3, backend).square().sum(), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(f(x, m), (x, m))
    want = torch.autograd.grad(step(x, m, t, 3, backend).square().sum(), (x, m))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake kernel, autograd registration and aot dispatch agree."""
    if not CPU_FUSED:
        pytest.skip("no fused backend built")
    from diffaug_kernels.ops.forward_noise import forward_noise_op
    from diffaug_kernels.ops.tweedie import tweedie_op
    a, b = S.table("sqrt_alphas_cumprod"), S.table("sqrt_one_minus_alphas_cumprod")
    x = torch.rand(2, 3, 4, 5, requires_grad=True)
    seed, off = torch.tensor(3), torch.tensor(0)
    torch.library.opcheck(forward_noise_op, (x, torch.tensor([[1, 2], [3, 4]]), a, b, seed, off, torch.float32, "cpu"))
    A, B = S.x0_coefficients("eps")
    m = torch.randn(2, 3, 4, 5, requires_grad=True)
    sc, sh = torch.rand(3), torch.rand(3)
    torch.library.opcheck(tweedie_op, (x, m, torch.tensor([5, 6]), A, B, True, sc, sh, torch.bfloat16, "cpu"))
    from diffaug_kernels.ops.reverse_step import reverse_step_op
    c1, c2 = torch.rand(2, requires_grad=True), torch.rand(2)
    for sigma in (None, torch.rand(2, requires_grad=True), torch.rand(2, 3, 4, 5, requires_grad=True)):
        torch.library.opcheck(reverse_step_op, (x, m, c1, c2, sigma, torch.randn(2, 3, 4, 5, requires_grad=True),
                                                seed, off, torch.float32, "cpu"))


def sampler_step(x, m, c1, seed, backend):
    """A guided DDPM step with a learned variance, fused end to end: tweedie, then reverse_step."""
    x0 = dk.tweedie(x, m, torch.tensor([100, 700]), S, backend=backend)
    return dk.reverse_step(x0, x, c1, 0.9, m[:, 3:].sigmoid() * 0.1, x * 0.01, seed=seed, offset=2**40,
                           backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_reverse_step_equals_eager_and_draws_fresh_noise(backend, compiler):
    x, m, c1 = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 6, 8, 8), torch.tensor([0.3, 0.7])
    f = torch.compile(lambda x, m, c1: sampler_step(x, m, c1, 1234, backend), fullgraph=True, backend=compiler)
    torch.testing.assert_close(f(x, m, c1), sampler_step(x, m, c1, 1234, backend), rtol=1e-6, atol=1e-5)
    counts = torch._dynamo.utils.counters
    counts.clear()
    g = torch.compile(lambda x, m, c1: sampler_step(x, m, c1, None, backend), fullgraph=True, backend=compiler)
    outs = [g(x, m, c1) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert counts["stats"]["unique_graphs"] == 1, dict(counts["stats"])


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_compiled_reverse_step_backward(backend):
    x = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_()
    m = torch.randn(2, 6, 8, 8).requires_grad_()
    c1 = torch.tensor([0.3, 0.7], requires_grad=True)
    f = torch.compile(lambda x, m, c1: sampler_step(x, m, c1, 3, backend).square().sum(), fullgraph=True,
                      backend="aot_eager")
    got = torch.autograd.grad(f(x, m, c1), (x, m, c1))
    want = torch.autograd.grad(sampler_step(x, m, c1, 3, backend).square().sum(), (x, m, c1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_tables_first_used_inside_a_compiled_region_are_not_graph_outputs(backend):
    """A schedule's device tables and the normalisation constants are made eagerly at trace time and read by
    the graph as inputs: a table made inside the graph would be a graph output that CUDA graphs
    (mode="reduce-overhead") overwrite on the next replay while the cache still holds it."""
    sched = dk.NoiseSchedule.from_betas(torch.linspace(1e-4, 0.03, 321, dtype=torch.float64))  # never used yet
    norm = ([0.11, 0.22, 0.33], [0.5, 0.6, 0.7])
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, m, t):
        xt = dk.forward_noise(x, t, sched, seed=3, backend=backend)
        return dk.tweedie(xt, m, t, sched, normalize=norm, backend=backend)

    x, m, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 6, 8, 8), torch.tensor([5, 300])
    got = torch.compile(f, backend=capture, fullgraph=True)(x, m, t)
    (gm,) = graphs
    (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    assert len(outputs) == 1  # x0_hat alone
    torch.testing.assert_close(got, f(x, m, t))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, m, t), f(x, m, t))


# ------------------------------------------------------------------------------- on a GPU (-m cuda)
CUDA = torch.device("cuda")


@pytest.mark.cuda
def test_compile_reduce_overhead(gpu_backend):
    x = torch.rand(8, 3, 32, 32, device=CUDA) * 2 - 1
    m = torch.randn(8, 6, 32, 32, device=CUDA)
    t = torch.full((8,), 300, device=CUDA)

    def step(x, m):
        xt = dk.forward_noise(x, t, S, backend=gpu_backend)
        return dk.tweedie(xt, m, t, S, normalize=dk.IMAGENET_NORM, backend=gpu_backend)

    f = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    outs = [f(x, m).clone() for _ in range(4)]
    assert not torch.equal(outs[-1], outs[-2])
    torch.testing.assert_close(
        (lambda x, m: dk.tweedie(dk.forward_noise(x, t, S, seed=1, backend=gpu_backend), m, t, S,
                                 normalize=dk.IMAGENET_NORM, backend=gpu_backend))(x, m),
        torch.compile(lambda x, m: dk.tweedie(dk.forward_noise(x, t, S, seed=1, backend=gpu_backend), m, t, S,
                                              normalize=dk.IMAGENET_NORM, backend=gpu_backend), fullgraph=True)(x, m))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_plain_eager_calls_skip_the_op_dispatch_and_give_the_same_result(backend, monkeypatch):
    """Plain eager calls run the kernel directly (the custom-op dispatch costs ~20 us of host time per call);
    calls that need the op (a gradient, a dispatch mode) still go through it, with identical results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    for name in ("forward_noise", "tweedie"):  # the modules (the package's attributes of these names are the ops)
        module = importlib.import_module(f"diffaug_kernels.ops.{name}")
        name += "_op"
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, m, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 6, 8, 8), torch.tensor([100, 700])

    direct = step(x, m, t, 7, backend)
    assert calls == []
    with torch.no_grad():
        step(x.requires_grad_(), m, t, 7, backend)  # no gradient wanted: still direct
    assert calls == []

    via_grad = step(x, m, t, 7, backend)  # x requires grad: the op carries the autograd formula
    assert calls == ["forward_noise_op", "tweedie_op"] and via_grad.requires_grad
    torch.testing.assert_close(via_grad.detach(), direct, rtol=0, atol=0)

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    calls.clear()
    with Log():
        logged = step(x.detach(), m, t, 7, backend)
    assert calls == ["forward_noise_op", "tweedie_op"]
    assert any("diffaug_kernels.forward_noise" in f for f in seen) and any("diffaug_kernels.tweedie" in f for f in seen)
    torch.testing.assert_close(logged, direct, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_forward_ad_and_func_transforms_give_the_reference_derivatives(backend):
    """The custom ops carry a backward formula only: under torch.func transforms and forward-mode AD the
    reference runs instead, so a jvp is right (it came back as zeros through the op) and torch.func.grad works."""
    import torch.autograd.forward_ad as fwAD

    x, m, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 6, 8, 8), torch.tensor([100, 700])
    vx, vm = torch.randn_like(x), torch.randn_like(m)

    def f(b):
        return lambda x, m: step(x, m, t, 3, b)

    out, tan = torch.func.jvp(f(backend), (x, m), (vx, vm))
    ref_out, ref_tan = torch.func.jvp(f("reference"), (x, m), (vx, vm))
    assert tan.abs().max() > 0.1
    torch.testing.assert_close(tan, ref_tan, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, step(x, m, t, 3, backend), rtol=1e-5, atol=1e-5)

    a = torch.tensor(S._np["sqrt_alphas_cumprod"][[100, 700]], dtype=torch.float32).view(2, 1, 1, 1)
    with fwAD.dual_level():
        y = dk.forward_noise(fwAD.make_dual(x, vx), t, S, seed=3, backend=backend)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, a * vx, rtol=1e-5, atol=1e-6)

    g = torch.func.grad(lambda x: step(x, m, t, 3, backend).square().sum())(x)
    xr = x.clone().requires_grad_()
    step(xr, m, t, 3, backend).square().sum().backward()  # the custom op's own backward formula
    torch.testing.assert_close(g, xr.grad, rtol=1e-5, atol=1e-5)


def norm_block(x, w, b, emb, backend):
    """ADM's ResBlock output norm: group_norm_silu with the scale-shift chunks of an embedding."""
    scale, shift = emb.chunk(2, dim=1)
    return dk.group_norm_silu(x, 4, w, b, 1e-5, scale, shift, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_group_norm_silu_equals_eager_with_gradients(backend, compiler):
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (1 + 0.1 * torch.randn(8)).requires_grad_(), (0.1 * torch.randn(8)).requires_grad_()
    emb = torch.randn(2, 16, 1, 1, requires_grad=True)
    f = torch.compile(lambda *a: norm_block(*a, backend), fullgraph=True, backend=compiler)
    got, want = f(x, w, b, emb), norm_block(x, w, b, emb, backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gw = torch.randn(want.shape)
    for g, r in zip(torch.autograd.grad(got, (x, w, b, emb), gw), torch.autograd.grad(want, (x, w, b, emb), gw)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
