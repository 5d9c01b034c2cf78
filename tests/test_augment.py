"""dk.DiffAug: the op chain with a model in the middle, t sampling, reproducibility, gradients, dtype."""
import pytest
import torch
from helpers import TinyEps
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import augment, reference
from diffaug_kernels.ops import dispatch

S = dk.NoiseSchedule.linear(1000)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyEps()


def test_same_shape_and_dtype_and_t_in_range(model):
    aug = dk.DiffAug(model, S, t_range=(100, 200))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = (torch.rand(4, 3, 8, 8) * 2 - 1).to(dtype)
        m = model.to(dtype)
        out, t = dk.DiffAug(m, S, t_range=(100, 200))(x, return_t=True)
        assert out.shape == x.shape and out.dtype == dtype
        assert t.shape == (4,) and ((t >= 100) & (t < 200)).all()
        assert out.abs().max() <= 1  # clipped
    model.float()
    assert "t_range=(100, 200)" in repr(aug)


@pytest.mark.parametrize("T", [100, 1000, 4000])
def test_default_t_range_is_the_whole_schedule(T):
    """t ~ U{0..T-1} by default: the paper's U{0..999} for T = 1000, and all of another schedule."""
    aug = dk.DiffAug(TinyEps(), dk.NoiseSchedule.linear(T))
    aug.model.temb = nn.Embedding(T, 6)
    assert aug.t_range == (0, T)
    torch.manual_seed(0)
    _, t = aug(torch.zeros(4000, 3, 1, 1), return_t=True)
    assert 0 <= int(t.min()) <= 0.01 * T and 0.99 * (T - 1) <= int(t.max()) <= T - 1
    assert t.float().mean().sub((T - 1) / 2).abs() < 0.05 * T


def test_equals_the_op_chain(model):
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    t = torch.tensor([5, 500, 999])
    aug = dk.DiffAug(model, S, prediction="eps")
    got = aug(x, t=t, seed=42)
    with torch.no_grad():
        xt = reference.forward_noise(x, t, S, 42)
        want = reference.tweedie(xt, model(xt, t), t, S, "eps", True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reproducible_under_manual_seed(model):
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    aug = dk.DiffAug(model, S)
    torch.manual_seed(1)
    a, ta = aug(x, return_t=True)
    torch.manual_seed(1)
    b, tb = aug(x, return_t=True)
    c, tc = aug(x, return_t=True)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(b, c)


def test_model_without_grad_unless_x_requires_it(model):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    aug = dk.DiffAug(model, S, clip=False)
    out = aug(x, t=300)
    assert not out.requires_grad  # nothing to differentiate: no graph through the UNet
    assert model.conv.weight.grad is None and model.temb.weight.grad is None
    xg = x.clone().requires_grad_()
    out = aug(xg, t=300, seed=3)
    out.sum().backward()
    g = xg.grad
    # d x0_hat / d x = sqrt(abar) * (A + B * d model / d x_t): the reference chain's gradient through the model
    xr = x.clone().requires_grad_()
    t = torch.full((2,), 300)
    xt = reference.forward_noise(xr, t, S, 3)
    (want,) = torch.autograd.grad(reference.tweedie(xt, model(xt, t), t, S, "eps", False).sum(), xr)
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
    a = S.sqrt_alphas_cumprod[300] * S.sqrt_recip_alphas_cumprod[300]
    assert not torch.allclose(g, torch.full_like(g, float(a)))  # not the model-free part alone
    assert model.conv.weight.grad is not None  # x requires grad: the graph runs through the network


def test_class_conditional_kwargs_pass_through(model):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    aug = dk.DiffAug(model, S)
    a = aug(x, t=10, seed=1, y=torch.tensor([0, 0]))
    b = aug(x, t=10, seed=1, y=torch.tensor([5, 5]))
    assert not torch.equal(a, b)


def test_bf16_autocast_runs_model_in_bf16(model):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    seen = {}
    model.conv.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None: output kept
    out = dk.DiffAug(model, S, dtype=torch.bfloat16)(x, t=50)
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32


def test_compiled_equals_eager(model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    eager = dk.DiffAug(model, S)(x, t=200, seed=9)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    aug = dk.DiffAug(model, S, compile=True)
    seen = []
    model.conv.register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous(
        memory_format=torch.channels_last)))
    comp = aug(x, t=200, seed=9)
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-4)
    # the model really went through torch.compile (a dynamo graph was captured) and got channels_last input
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert isinstance(aug._compiled["cpu"], torch._dynamo.eval_frame.OptimizedModule)
    assert aug._compiled["cpu"]._orig_mod is model
    assert seen and all(seen)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(t_range=(0, 1001)), ValueError, "t_range"),
    (dict(t_range=(10, 10)), ValueError, "t_range"),
    (dict(prediction="noise"), ValueError, "prediction"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(t_range=(0.5, 10.9)), TypeError, "t_range must be two integers"),  # not silently (0, 10)
    (dict(t_range=(5,)), TypeError, "t_range must be two integers"),
    (dict(clip=1), TypeError, "clip must be True or False"),
    (dict(backend="gpu"), ValueError, "backend must be 'auto' or one of"),  # at construction, not first call
])
def test_bad_arguments(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dk.DiffAug(model, S, **kwargs)


def test_bad_t(model):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        dk.DiffAug(model, S)(torch.rand(2, 3, 8, 8), t=1000)


@pytest.mark.cuda
def test_compiled_on_gpu_uses_cuda_graphs_and_equals_eager(gpu_backend):
    """compile=True on CUDA is torch.compile(mode="reduce-overhead"): replays must match eager for each call's
    own seed (no output overwritten by a later replay) and fresh seeds must give fresh noise."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = dk.models.create_adm_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                      attention_resolutions="8", num_head_channels=16, learn_sigma=True).cuda().eval()
    x = torch.rand(4, 3, 16, 16, device="cuda") * 2 - 1
    t = torch.tensor([10, 300, 600, 999], device="cuda")
    eager = dk.DiffAug(model, S, dtype=torch.bfloat16, backend=gpu_backend)
    comp = dk.DiffAug(model, S, dtype=torch.bfloat16, compile=True, backend=gpu_backend)
    outs = [comp(x, t=t, seed=s) for s in (1, 2, 3, 1)]  # the first calls warm up, record, then replay
    with torch.no_grad():
        for s, out in zip((1, 2, 3, 1), outs):
            torch.testing.assert_close(out, eager(x, t=t, seed=s), rtol=0.05, atol=0.05)
    torch.testing.assert_close(outs[3], outs[0], rtol=1e-3, atol=1e-3)  # same seed, same image
    assert (outs[1] - outs[2]).abs().mean() > 0.01  # fresh seed, fresh noise


# ------------------------------------------------------------------------------------- weights cast once
class _WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten::_to_copy calls whose input is one of the given tensors' storage (a weight being cast)."""

    def __init__(self, tensors):
        super().__init__()
        self.ptrs = {p.data_ptr() for p in tensors}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def _tiny_unet():
    torch.manual_seed(0)
    return dk.models.create_adm_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                     attention_resolutions="8", num_head_channels=16, learn_sigma=True).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_model_weights_cast_once_equal_autocast(dtype):
    """A frozen model under dtype runs a copy whose conv / linear weights were cast once: no weight is cast
    during a call (autocast casts each one at every call), the output equals autocast's, and the user's model
    keeps its fp32 weights and state_dict; DiffAug's own state_dict is the model's alone."""
    unet = _tiny_unet().requires_grad_(False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.tensor([30, 700])
    once = dk.DiffAug(unet, S, dtype=dtype)
    per_call = dk.DiffAug(unet, S, dtype=dtype, cast_weights=False)
    assert once.weights_cast_once() and not per_call.weights_cast_once()
    weights = list(unet.parameters())
    with _WeightCasts(weights) as counter:
        want = per_call(x, t=t, seed=5)
    assert counter.casts >= 10  # the autocast path: every conv and linear weight and bias, every call
    once(x, t=t, seed=5)  # the first call makes the copy
    with _WeightCasts(weights) as counter:
        got = once(x, t=t, seed=5)
    assert counter.casts == 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the same casts, made once: the same numbers
    cast = once._cast[x.device].model
    assert cast is not unet and cast.input_blocks[0][0].weight.dtype == dtype
    assert cast.out[0].weight is unet.out[0].weight  # norms (and buffers) shared, not copied or cast
    assert unet.input_blocks[0][0].weight.dtype == torch.float32
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in unet.state_dict().items())
    assert list(once.state_dict()) == ["model." + k for k in unet.state_dict()]


def test_cast_copy_follows_the_model():
    """The copy is remade when the model's weights change in place (load_state_dict) and follows its
    train / eval mode; a weight that starts to require grad sends the call back to autocast."""
    unet = _tiny_unet().requires_grad_(False)
    aug = dk.DiffAug(unet, S, dtype=torch.bfloat16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = aug(x, t=500, seed=1)
    first = aug._cast[x.device].model
    other = _tiny_unet()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.load_state_dict(other.state_dict())
    b = aug(x, t=500, seed=1)
    assert aug._cast[x.device].model is not first and not torch.equal(a, b)
    torch.testing.assert_close(b, dk.DiffAug(unet, S, dtype=torch.bfloat16, cast_weights=False)(x, t=500, seed=1),
                               rtol=0, atol=1e-6)
    unet.train()
    aug(x, t=500, seed=1)
    assert aug._cast[x.device].model.training and all(m.training for m in aug._cast[x.device].model.modules())
    unet.eval()
    unet.input_blocks[0][0].weight.requires_grad_(True)
    with _WeightCasts(list(unet.parameters())) as counter:
        aug(x, t=500, seed=1)
    assert counter.casts > 0 and not aug._cast


def test_trainable_model_keeps_autocast(model):
    """A model with trainable parameters keeps autocast's per-call casts (its weights change every step, and
    gradients must reach them); cast_weights=True casts anyway, and then the model gets no gradient."""
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    aug = dk.DiffAug(model, S, dtype=torch.bfloat16)
    assert not aug.weights_cast_once()
    with _WeightCasts([model.conv.weight]) as counter:
        aug(x, t=50)
    assert counter.casts == 1 and not aug._cast
    xg = x.clone().requires_grad_()
    aug(xg, t=50, seed=2).sum().backward()
    assert model.conv.weight.grad is not None  # x requires grad: the graph reaches the fp32 weights
    model.conv.weight.grad = None
    forced = dk.DiffAug(model, S, dtype=torch.bfloat16, cast_weights=True)
    assert forced.weights_cast_once()
    with _WeightCasts([model.conv.weight]) as counter:
        forced(x, t=50)
    assert counter.casts == 1  # the copy, made at the first call
    with _WeightCasts([model.conv.weight]) as counter:
        out = forced(xg, t=50, seed=2)
    assert counter.casts == 0
    out.sum().backward()
    assert model.conv.weight.grad is None and xg.grad is not None
    # the embedding's weight is no conv / linear weight: autocast leaves it alone, so does the copy
    assert forced._cast[x.device].model.temb.weight is model.temb.weight


def test_compiled_cast_copy_equals_autocast():
    torch._dynamo.reset()
    unet = _tiny_unet().requires_grad_(False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    want = dk.DiffAug(unet, S, dtype=torch.bfloat16, cast_weights=False)(x, t=[10, 900], seed=3)
    aug = dk.DiffAug(unet, S, dtype=torch.bfloat16, compile=True)
    got = aug(x, t=[10, 900], seed=3)
    cast, run = aug._cast[x.device].model, aug._compiled["cpu"]._orig_mod
    if augment.cpu_kernel_fused():  # fused_norm=None's CPU rule: the fused copy of the cast copy runs
        source, switched = aug._norm_copies[(x.device, True)]
        assert source is cast and run is switched
    else:
        assert run is cast
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)  # inductor's own bf16 kernels


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(cast_weights=1), TypeError, "cast_weights must be None, True or False"),
    (dict(cast_weights=True), ValueError, "cast_weights=True casts to dtype"),
    (dict(cast_weights=True, dtype=torch.float32), ValueError, "cast_weights=True casts to dtype"),
])
def test_bad_cast_weights(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dk.DiffAug(model, S, **kwargs)


# ------------------------------------------------------------------------------------------- fused norm
def _random_unet():
    """A tiny ADM UNet with scale-shift and random weights everywhere (its output convs are not zero)."""
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                     attention_resolutions="8", num_head_channels=16, learn_sigma=True,
                                     use_scale_shift_norm=True).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
            else:  # norm weights near 1, biases near 0
                p.copy_(0.1 * torch.randn(p.shape) + (1.0 if "norm" in name or name.endswith(".0.weight") else 0.0))
    return unet


def _count_fused_calls(monkeypatch):
    from diffaug_kernels.models import unet as unet_module

    calls, real = [], unet_module.group_norm_silu
    monkeypatch.setattr(unet_module, "group_norm_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_norm_forced_on_equals_off_and_leaves_the_model_alone(monkeypatch, dtype):
    unet = _random_unet().requires_grad_(dtype is None)  # bf16: frozen, so the calls run the weights-cast copy
    calls = _count_fused_calls(monkeypatch)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    off = dk.DiffAug(unet, S, dtype=dtype, fused_norm=False)(x, t=[30, 90], seed=4)  # (bf16 errors grow with t)
    assert calls == []
    on_aug = dk.DiffAug(unet, S, dtype=dtype, fused_norm=True)
    on = on_aug(x, t=[30, 90], seed=4)
    assert len(calls) == len(unet.norm_silu_sites())  # every ResBlock's two norms and the output norm
    assert unet.fused_norm is False and not any(getattr(m, "fused_norm", False) for m in unet.modules())
    tol = 1e-4 if dtype is None else 0.05
    torch.testing.assert_close(on, off, rtol=tol, atol=tol)
    # the switched copy is of the model that runs (the weights-cast copy under bf16) and shares its parameters
    source, switched = on_aug._norm_copies[(x.device, True)]
    assert source is (on_aug._cast[x.device].model if dtype else unet) and switched.fused_norm is True
    assert [id(p) for p in switched.parameters()] == [id(p) for p in source.parameters()]


def test_fused_norm_false_switches_a_fused_model_off_and_none_leaves_it_be(monkeypatch):
    unet = _random_unet().set_fused_norm(True)
    calls = _count_fused_calls(monkeypatch)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    dk.DiffAug(unet, S, fused_norm=False)(x, t=50)
    assert calls == [] and unet.fused_norm is True
    dk.DiffAug(unet, S)(x, t=50)
    assert calls


def test_fused_norm_none_on_cpu_fuses_compiled_models_without_measuring(monkeypatch):
    """On the CPU, fused_norm=None fuses a compiled model where the C++ kernel is built (a fixed rule: nothing is
    timed), and leaves an eager model, or any model without that kernel, as it is."""

    unet = _random_unet()
    calls = _count_fused_calls(monkeypatch)
    monkeypatch.setattr(augment, "time_candidate", lambda *a: pytest.fail("nothing is timed on CPU"))
    x, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([1, 2])
    aug = dk.DiffAug(unet, S, compile=True)
    assert aug.fused_norm is None
    assert aug.fused_norm_for(x, t) is augment.cpu_kernel_fused()
    assert augment.cpu_kernel_fused() is (dispatch.usable("cpu", x.device)
                                          and dispatch.kernels("cpu").group_norm_silu_out is not None)
    monkeypatch.setattr(augment, "cpu_kernel_fused", lambda: False)
    assert aug.fused_norm_for(x, t) is None
    eager = dk.DiffAug(unet, S)
    assert eager.fused_norm_for(x, t) is None
    eager(x, t=50)
    assert calls == [] and aug.fused_norm_measured == {} and unet.fused_norm is False


def test_compiled_diffaug_on_cpu_runs_the_fused_kernel(monkeypatch):
    """A compiled DiffAug on the CPU (aot_eager for inductor, whose CPU compile would take a minute) traces the
    fused op at every norm + SiLU pair and gives the unfused model's numbers; the user's UNet stays unfused."""
    import functools


    if not augment.cpu_kernel_fused():
        pytest.skip("the C++ extension is not built")
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    unet = _random_unet()
    calls = _count_fused_calls(monkeypatch)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        on = dk.DiffAug(unet, S, compile=True)(x, t=[30, 90], seed=4)
        assert len(calls) == len(unet.norm_silu_sites())
        off = dk.DiffAug(unet, S, compile=True, fused_norm=False)(x, t=[30, 90], seed=4)
    assert unet.fused_norm is False
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused_faster", [True, False])
def test_fused_norm_none_picks_the_faster_measured_setting_once_per_shape(monkeypatch, fused_faster):
    """The decision of fused_norm=None (CUDA with compile=True; reached on CPU here by letting it measure there),
    with a timer that makes one candidate faster: both candidates are timed for each distinct norm + SiLU input
    of the model, weighted by how many pairs see it, once per input shape."""

    timed = []

    def fake_time(name, fn, device):
        timed.append(name)
        return 1.0 if (name == "fused") == fused_faster else 2.0

    monkeypatch.setattr(augment, "time_candidate", fake_time)
    monkeypatch.setattr(augment, "MEASURED_DEVICES", ("cpu",))
    unet = _random_unet()
    aug = dk.DiffAug(unet, S, compile=True, dtype=torch.bfloat16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.tensor([5, 600])
    assert aug.fused_norm_for(x, t) is fused_faster
    # 16x16 and 8x8 levels: in-norms and out-norms (with scale-shift) at 32 and 64 channels, the output norm
    assert timed.count("fused") == timed.count("compiled") >= 4
    fused_s, compiled_s = aug.fused_norm_measured[(x.device, (2, 3, 16, 16), torch.float32)]
    n = len(unet.norm_silu_sites())  # each pair counted once
    assert (fused_s, compiled_s) == ((n, 2.0 * n) if fused_faster else (2.0 * n, n))
    timed.clear()
    assert aug.fused_norm_for(x, t) is fused_faster and timed == []  # cached for this shape
    aug.fused_norm_for(x[:1], t[:1])
    assert timed  # a new shape is measured


def test_fused_norm_measurement_times_the_real_candidates(monkeypatch):
    """measure_fused_norm with the real timer: both totals are positive (the fused op and the compiled pair ran;
    aot_eager for inductor here, whose CPU compiles would take minutes on a small machine)."""
    import functools

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    aug = dk.DiffAug(_random_unet(), S, fused_norm=None)
    fused_s, compiled_s = aug.measure_fused_norm(torch.rand(1, 3, 16, 16) * 2 - 1, torch.tensor([5]))
    assert fused_s > 0 and compiled_s > 0


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(fused_norm=1), TypeError, "fused_norm must be None, True or False"),
    (dict(fused_norm="auto"), TypeError, "fused_norm must be None, True or False"),
    (dict(fused_norm=True), ValueError, "fused_norm=True needs a model with set_fused_norm"),
])
def test_bad_fused_norm(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dk.DiffAug(model, S, **kwargs)


def test_fused_norm_false_on_a_model_without_the_switch_runs_it_as_it_is(model):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    want = dk.DiffAug(model, S)(x, t=[3, 400], seed=1)
    torch.testing.assert_close(dk.DiffAug(model, S, fused_norm=False)(x, t=[3, 400], seed=1), want, rtol=0, atol=0)


def test_repr_shows_fused_norm(model):
    assert "fused_norm=None" in repr(dk.DiffAug(model, S))
    assert "fused_norm=False" in repr(dk.DiffAug(model, S, fused_norm=False))
