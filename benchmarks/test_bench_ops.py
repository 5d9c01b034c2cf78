"""One benchmark per op: a copy of the same bytes (the ceiling at that size), published eager, published
compiled, each fused backend, grouped per shape and dtype so pytest-benchmark's table shows their ratios side
by side. No timing decides pass or fail."""
import functools

import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels import bench

SHAPES = [(256, 3, 32, 32), (16, 3, 224, 224)]  # small enough for a ~2 minute run on a 2-core CPU
DTYPES = [torch.float32, torch.bfloat16]


@functools.cache
def _case(op, shape, dtype, device):
    """Inputs built once per (op, shape, dtype) and shared by that group's implementations."""
    torch.manual_seed(0)
    return bench.make_case(op, shape, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", bench.OPS)
def test_op(benchmark, run_timed, op, shape, dtype, impl, device):
    case = _case(op, shape, dtype, device)
    fn = case.impls[impl]
    for _ in range(2):  # outside the timed rounds: torch.compile compiles here
        fn()
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["bytes"] = case.nbytes
    run_timed(benchmark, fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(case.nbytes / benchmark.stats.stats.median / 1e9, 2)


def test_published_tweedie_is_the_reference(device):
    """The baseline must compute what the fused ops compute, or the ratios mean nothing (not timed)."""
    s = dk.NoiseSchedule.linear(1000)
    x, mo = torch.randn(4, 3, 8, 8, device=device), torch.randn(4, 6, 8, 8, device=device)
    t = torch.randint(0, 1000, (4,), device=device)
    got = bench.published_tweedie(x, mo, t, s._np["sqrt_recip_alphas_cumprod"], s._np["sqrt_recipm1_alphas_cumprod"],
                                  normalize=dk.IMAGENET_NORM)
    want = dk.reference.tweedie(x, mo, t, s, normalize=dk.IMAGENET_NORM)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_published_forward_noise_is_q_sample(device):
    s = dk.NoiseSchedule.linear(1000)
    x, t = torch.randn(4, 3, 8, 8, device=device), torch.randint(0, 1000, (4,), device=device)
    torch.manual_seed(1)
    got = bench.published_forward_noise(x, t, s._np["sqrt_alphas_cumprod"], s._np["sqrt_one_minus_alphas_cumprod"])
    torch.manual_seed(1)
    eps = torch.randn_like(x)
    a = s.table("sqrt_alphas_cumprod", device)[t].view(-1, 1, 1, 1)
    b = s.table("sqrt_one_minus_alphas_cumprod", device)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(got, a * x + b * eps, atol=1e-6, rtol=0)
