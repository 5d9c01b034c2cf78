"""The benchmark's rows compute what they claim: a row that returned its input, or noise from another
formula, would report a speed-up that means nothing. (Timings themselves decide nothing in tests.)"""
import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels.bench import harness as bench
from diffaug_kernels.ops import reference

SHAPE = (4, 3, 16, 16)


def _rows(case):
    return {k: f for k, f in case.impls.items() if k != bench.SAME_COPY}


def test_published_tweedie_is_the_reference():
    s = dk.NoiseSchedule.linear(1000)
    x, mo = torch.randn(4, 3, 8, 8), torch.randn(4, 6, 8, 8)
    t = torch.randint(0, 1000, (4,))
    got = bench.published_tweedie(x, mo, t, s._np["sqrt_recip_alphas_cumprod"], s._np["sqrt_recipm1_alphas_cumprod"],
                                  normalize=dk.IMAGENET_NORM)
    torch.testing.assert_close(got, reference.tweedie(x, mo, t, s, normalize=dk.IMAGENET_NORM), atol=1e-5, rtol=0)


def test_published_forward_noise_is_q_sample():
    s = dk.NoiseSchedule.linear(1000)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    torch.manual_seed(1)
    got = bench.published_forward_noise(x, t, s._np["sqrt_alphas_cumprod"], s._np["sqrt_one_minus_alphas_cumprod"])
    torch.manual_seed(1)
    eps = torch.randn_like(x)
    a = s.table("sqrt_alphas_cumprod")[t].view(-1, 1, 1, 1)
    b = s.table("sqrt_one_minus_alphas_cumprod")[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(got, a * x + b * eps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [SHAPE, (4, 1, 16, 16)])
def test_every_tweedie_row_computes_tweedie(shape):
    """ImageNet normalisation for RGB; any other channel count runs too (its own per-channel normalisation)."""
    torch.manual_seed(0)
    case = bench.make_case("tweedie", shape, torch.float32)
    i = case.inputs
    assert (i["normalize"] == dk.IMAGENET_NORM) == (shape[1] == 3)
    want = reference.tweedie(i["x"], i["model_output"], i["t"], i["schedule"], normalize=i["normalize"])
    rows = _rows(case)
    assert {bench.EAGER, bench.COMPILED} < set(rows) and any(k.startswith("fused (") for k in rows)
    for impl, fn in rows.items():
        torch.testing.assert_close(fn(), want, atol=1e-5, rtol=1e-5, msg=impl)


def test_channels_last_layout_gives_every_image_input_that_layout():
    """make_case(layout="channels_last") (bench --layout): the image-shaped inputs are channels_last, and every
    row still computes the op (tweedie: the reference's numbers); a layout of another name is an error."""
    torch.manual_seed(0)
    case = bench.make_case("tweedie", SHAPE, torch.float32, layout="channels_last")
    i = case.inputs
    for name in ("x", "model_output"):
        assert i[name].is_contiguous(memory_format=torch.channels_last) and not i[name].is_contiguous()
    want = reference.tweedie(i["x"], i["model_output"], i["t"], i["schedule"], normalize=i["normalize"])
    for impl, fn in _rows(case).items():
        torch.testing.assert_close(fn(), want, atol=1e-5, rtol=1e-5, msg=impl)
    rs = bench.make_case("reverse_step", SHAPE, torch.float32, layout="channels_last").inputs
    assert all(rs[k].is_contiguous(memory_format=torch.channels_last) for k in ("x", "x0_hat", "sigma", "shift"))
    with pytest.raises(ValueError, match="layout must be one of"):
        bench.make_case("tweedie", SHAPE, torch.float32, layout="nhwc")


def _noise_of(out, case, k_times=None):
    """out = a[t] x + b[t] n, solved for n (per block of the multi op)."""
    i, s = case.inputs, case.inputs["schedule"]
    times = [None] if k_times is None else k_times
    x = i["x"]
    ns = []
    for k, tk in enumerate(times):
        t = i["t"] if tk is None else torch.full_like(i["t"], tk)
        blk = out[k * x.shape[0]:(k + 1) * x.shape[0]]
        a = s.table("sqrt_alphas_cumprod")[t].view(-1, 1, 1, 1)
        b = s.table("sqrt_one_minus_alphas_cumprod")[t].view(-1, 1, 1, 1)
        ns.append((blk - a * x) / b)
    return torch.cat(ns)


@pytest.mark.parametrize("op", ["forward_noise", "forward_noise_multi"])
def test_every_noise_row_adds_scaled_standard_normal_noise(op):
    """Each row's output minus sqrt(abar) x0, over sqrt(1 - abar), is fresh standard normal noise (the compiled
    published row uses inductor's own RNG, so the test is statistical for every row); the fused rows also equal
    the reference under the same torch seed (seed=None draws the Philox seed from torch's generator)."""
    torch.manual_seed(0)
    case = bench.make_case(op, SHAPE, torch.float32)
    times = case.inputs.get("times")
    rows = _rows(case)
    assert {bench.EAGER, bench.COMPILED} < set(rows)
    for impl, fn in rows.items():
        torch.manual_seed(7)
        out = fn()
        assert out.shape == ((len(times) if times else 1) * SHAPE[0], *SHAPE[1:]), impl
        n = _noise_of(out, case, times)
        n = n[torch.isfinite(n)]  # t = 0 with b ~ 0.01: still finite, kept
        assert abs(n.mean().item()) < 0.1 and abs(n.std().item() - 1) < 0.1, impl
        assert abs(torch.corrcoef(torch.stack([n[:-1], n[1:]]))[0, 1].item()) < 0.1, impl
        if impl.startswith("fused"):
            torch.manual_seed(7)
            i = case.inputs
            want = (reference.forward_noise_multi(i["x"], times, i["schedule"], _seed_like_none(), 0)
                    if times else reference.forward_noise(i["x"], i["t"], i["schedule"], _seed_like_none(), 0))
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=impl)


def _seed_like_none():
    """The Philox seed the ops draw for seed=None (checks.as_seed), from torch's generator."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


def test_variants_script_runs_and_names_a_variant_per_op(tmp_path):
    """tools/variants.py (gpu_check.sh's tune step, whose last lines name the bf16 picks) runs end to end on
    the CPU: its reference checks, timing rounds, JSON and one `best <op>:` line per op."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "tools" / "variants.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shape", "2x3x16x16", "--rounds", "1",
                          "--reps", "1", "--json", str(tmp_path / "v.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    last = [line.split() for line in out.stdout.strip().splitlines()[-2:]]
    assert [w[:2] for w in last] == [["best", "tweedie:"], ["best", "forward_noise:"]], out.stdout
    assert all(w[2] in ("1", "2", "4", "1l", "2l", "4l") for w in last), out.stdout
    rows = json.load(open(tmp_path / "v.json"))["rows"]
    assert {(r["op"], r["dtype"], r["variant"]) for r in rows} == {
        (o, d, v) for o in ("tweedie", "forward_noise") for d in ("bfloat16", "float32")
        for v in ("copy (same bytes)", "1", "2", "4", "1l", "2l", "4l")}
