"""Times the planar CUDA kernels' variants, units per thread (1, 2 or 4) and block order ("l": memory order), for
tweedie (DIFFAUG_CUDA_TWEEDIE_UNITS) and forward_noise (DIFFAUG_CUDA_NOISE_UNITS), on the benchmark's DiffAug
case, against a copy of the same bytes, in rounds that interleave the variants (so clock and thermal drift fall
on all alike), each first checked against the reference with the tests' rule. Prints a table and, last, one line
"best <op>: <variant>" per op (the fastest variant in the first dtype, by median over rounds), for
tools/gpu_check.sh's tune step.

    python tools/variants.py [--ops tweedie,forward_noise] [--shape 256x3x224x224] [--rounds 5] [--reps 30]
                             [--json PATH]
"""
import argparse
import os
import statistics
import sys

import torch

import diffaug_kernels as dk
from diffaug_kernels.bench import harness
from diffaug_kernels.ops import dispatch, reference
from diffaug_kernels.utils import write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import assert_matches, tweedie_magnitude  # noqa: E402 - the tests' comparison rule, not a copy

VARIANTS = ["1", "2", "4", "1l", "2l", "4l"]
ENV = {"tweedie": "DIFFAUG_CUDA_TWEEDIE_UNITS", "forward_noise": "DIFFAUG_CUDA_NOISE_UNITS"}


def _checker(op, inp, backend):
    """A function that runs the op on the case's inputs and compares it with the reference, the tests' way."""
    x, t, sched = inp["x"], inp["t"], inp["schedule"]
    if op == "tweedie":
        want = reference.tweedie(x, inp["model_output"], t, sched, "eps", True, inp["normalize"])
        mag = tweedie_magnitude(sched, x, inp["model_output"], t, "eps", inp["normalize"], x.shape[1])
        got = lambda: dk.tweedie(x, inp["model_output"], t, sched, prediction="eps", clip=True,  # noqa: E731
                                 normalize=inp["normalize"], backend=backend)
        return lambda: assert_matches(got(), want, mag=mag)
    want = reference.forward_noise(x, t, sched, 2**40 + 7, 2**32 - 3)  # a counter carry inside the tensor
    return lambda: assert_matches(dk.forward_noise(x, t, sched, seed=2**40 + 7, offset=2**32 - 3, backend=backend),
                                  want)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="tweedie,forward_noise")
    ap.add_argument("--shape", default="256x3x224x224")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks this script (the variants are CUDA's)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("variants: no CUDA device", file=sys.stderr)
        return 2
    op_names = a.ops.split(",")
    unknown = set(op_names) - set(ENV)
    if unknown:
        ap.error(f"--ops: {sorted(unknown)} not among {sorted(ENV)}")
    backend = "cuda" if dev.type == "cuda" else "cpu"
    shape = tuple(int(s) for s in a.shape.split("x"))
    copy_gbs = harness.copy_bandwidth(dev)
    print(f"{harness.device_name(dev)}: copy {copy_gbs:.0f} GB/s (1 GiB); {a.shape}; tweedie: eps, learned sigma, "
          f"clip, ImageNet normalisation; median of {a.reps} calls per round, {a.rounds} rounds", flush=True)
    rows, saved = [], {e: os.environ.get(e) for e in ENV.values()}
    try:
        for op in op_names:
            env = ENV[op]
            for dname in a.dtypes.split(","):
                dtype = getattr(torch, dname)
                case = harness.make_case(op, shape, dtype, dev, backends=[backend])
                fused, copy = case.impls[f"fused ({backend})"], case.impls[harness.SAME_COPY]
                check = _checker(op, case.inputs, backend)
                dispatch.POISON_OUTPUTS = True  # outputs start as NaN: an element a variant leaves unwritten fails
                for v in VARIANTS:  # a variant is timed only if it computes the op
                    os.environ[env] = v
                    try:
                        check()
                    except AssertionError as e:
                        raise SystemExit(f"{op} variant {v} ({dname}) differs from the reference: {e}") from None
                dispatch.POISON_OUTPUTS = False
                del check
                per = {v: [] for v in ["copy (same bytes)"] + VARIANTS}
                for _ in range(a.rounds):
                    per["copy (same bytes)"].append(harness.time_fn(copy, reps=a.reps, warmup=3, device=dev).ms)
                    for v in VARIANTS:
                        os.environ[env] = v
                        per[v].append(harness.time_fn(fused, reps=a.reps, warmup=3, device=dev).ms)
                same = statistics.median(per["copy (same bytes)"])
                for v, ms in per.items():
                    med = statistics.median(ms)
                    gbs = case.nbytes / (med * 1e-3) / 1e9
                    rows.append(dict(op=op, dtype=dname, variant=v, ms=med, ms_rounds=ms, gb_s=gbs,
                                     pct_copy=100 * gbs / copy_gbs, vs_same_bytes_copy=same / med))
                    print(f"{op:<14} {dname:<9} {v:<18} {med * 1e3:8.1f} us  (rounds {min(ms) * 1e3:.1f}-"
                          f"{max(ms) * 1e3:.1f})  {gbs:6.0f} GB/s  {100 * gbs / copy_gbs:5.1f}% of copy  "
                          f"{100 * same / med:5.1f}% of same-bytes copy", flush=True)
                del case
                os.environ.pop(env, None)
    finally:
        dispatch.POISON_OUTPUTS = False
        for e, v in saved.items():
            os.environ.pop(e, None) if v is None else os.environ.__setitem__(e, v)
    if a.json:
        write_json({"env": harness.environment(dev), "copy_gb_s": copy_gbs, "shape": list(shape), "rows": rows}, a.json)
    first = a.dtypes.split(",")[0]
    for op in op_names:
        best = min((r for r in rows if r["op"] == op and r["dtype"] == first and r["variant"] in VARIANTS),
                   key=lambda r: r["ms"])
        print(f"best {op}: {best['variant']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
