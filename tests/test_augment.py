"""dk.DiffAug: the op chain with a model in the middle, t sampling, reproducibility, gradients, dtype."""
import pytest
import torch
from helpers import TinyEps
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import reference

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
