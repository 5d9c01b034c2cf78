"""One benchmark per op: a copy of the same bytes (the ceiling at that size), published eager, published
compiled, each fused backend, grouped per shape and dtype so pytest-benchmark's table shows their ratios side
by side. No timing decides pass or fail."""
import functools

import pytest
import torch

from diffaug_kernels.bench import harness as bench

SHAPES = [(256, 3, 32, 32), (16, 3, 224, 224)]  # small enough for a ~2 minute run on a 2-core CPU
DTYPES = [torch.float32, torch.bfloat16]


@functools.cache
def _case(op, shape, dtype, device):
    """Inputs built once per (op, shape, dtype) and shared by that group's implementations."""
    torch.manual_seed(0)
    return bench.make_case(op, shape, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", bench.OPS + ("reverse_step",))
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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reverse_step_unfused(benchmark, run_timed, shape, dtype, device):
    """reverse_step's own baseline, in its group's table: the same update unfused, dk.philox_normal's noise tensor
    then torch's arithmetic (what dk.sampling ran before the fused op)."""
    test_op(benchmark, run_timed, "reverse_step", shape, dtype, bench.UNFUSED, device)


# What each row computes is tested in tests/bench/test_bench.py (the CI suite).


# ADM activations for group_norm_silu (32 groups): a 64x64 UNet's first level and a 256x256 one's 32x32 level
NORM_SHAPES = [(8, 128, 64, 64), (4, 512, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, run_timed, shape, dtype, impl, device):
    """The UNet's norm + scale-shift + SiLU (create_adm_unet(fused_norm=True)) against guided-diffusion's
    GroupNorm32, scale-shift and SiLU, eager and compiled."""
    test_op(benchmark, run_timed, "group_norm_silu", shape, dtype, impl, device)
