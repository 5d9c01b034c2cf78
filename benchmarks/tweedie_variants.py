"""Times the planar CUDA tweedie kernel's variants (DIFFAUG_CUDA_TWEEDIE_UNITS: units per thread, 1, 2 or 4; "l"
for blocks in memory order) on the benchmark's DiffAug case, against a copy of the same bytes, in rounds that
interleave the variants (so clock and thermal drift fall on all alike), each first checked against the
reference. Prints a table and, last, the line "best: <variant>" (the fastest bf16 variant by median over
rounds) for benchmarks/gpu_check.sh's tune step.

    python benchmarks/tweedie_variants.py [--shape 256x3x224x224] [--rounds 5] [--reps 30] [--json PATH]
"""
import argparse
import os
import statistics
import sys

import torch

from diffaug_kernels import bench, ops, reference
from diffaug_kernels.jsonfile import write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import assert_matches, tweedie_magnitude  # noqa: E402 - the tests' comparison rule, not a copy

VARIANTS = ["1", "2", "4", "1l", "2l", "4l"]
ENV = "DIFFAUG_CUDA_TWEEDIE_UNITS"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256x3x224x224")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks this script (the variants are CUDA's)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("tweedie_variants: no CUDA device", file=sys.stderr)
        return 2
    backend = "cuda" if dev.type == "cuda" else "cpu"
    shape = tuple(int(s) for s in a.shape.split("x"))
    copy_gbs = bench.copy_bandwidth(dev)
    print(f"{bench.device_name(dev)}: copy {copy_gbs:.0f} GB/s (1 GiB); tweedie {a.shape}, eps, learned "
          f"sigma, clip, ImageNet normalisation; median of {a.reps} calls per round, {a.rounds} rounds", flush=True)
    rows, saved = [], os.environ.get(ENV)
    try:
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            case = bench.make_case("tweedie", shape, dtype, dev, backends=[backend])
            fused, copy = case.impls[f"fused ({backend})"], case.impls[bench.SAME_COPY]
            inp = case.inputs
            want = reference.tweedie(inp["x"], inp["model_output"], inp["t"], inp["schedule"], "eps", True,
                                     inp["normalize"])
            mag = tweedie_magnitude(inp["schedule"], inp["x"], inp["model_output"], inp["t"], "eps",
                                    inp["normalize"], shape[1])
            ops.POISON_OUTPUTS = True  # outputs start as NaN: an element a variant leaves unwritten fails
            for v in VARIANTS:  # a variant is timed only if it computes the op: the tests' comparison
                os.environ[ENV] = v
                try:
                    assert_matches(fused(), want, mag=mag)
                except AssertionError as e:
                    raise SystemExit(f"variant {v} ({dname}) differs from the reference: {e}") from None
            ops.POISON_OUTPUTS = False
            del want, mag
            per = {v: [] for v in ["copy (same bytes)"] + VARIANTS}
            for r in range(a.rounds):
                per["copy (same bytes)"].append(bench.time_fn(copy, reps=a.reps, warmup=3, device=dev).ms)
                for v in VARIANTS:
                    os.environ[ENV] = v
                    per[v].append(bench.time_fn(fused, reps=a.reps, warmup=3, device=dev).ms)
            same = statistics.median(per["copy (same bytes)"])
            for v, ms in per.items():
                med = statistics.median(ms)
                gbs = case.nbytes / (med * 1e-3) / 1e9
                rows.append(dict(dtype=dname, variant=v, ms=med, ms_rounds=ms, gb_s=gbs, pct_copy=100 * gbs / copy_gbs,
                                 vs_same_bytes_copy=same / med))
                print(f"{dname:<9} {v:<18} {med * 1e3:8.1f} us  (rounds {min(ms) * 1e3:.1f}-{max(ms) * 1e3:.1f})  "
                      f"{gbs:6.0f} GB/s  {100 * gbs / copy_gbs:5.1f}% of copy  "
                      f"{100 * same / med:5.1f}% of same-bytes copy", flush=True)
            del case
    finally:
        os.environ.pop(ENV, None) if saved is None else os.environ.__setitem__(ENV, saved)
    if a.json:
        write_json({"env": bench.environment(dev), "copy_gb_s": copy_gbs, "shape": list(shape), "rows": rows}, a.json)
    first = a.dtypes.split(",")[0]
    best = min((r for r in rows if r["dtype"] == first and r["variant"] in VARIANTS), key=lambda r: r["ms"])
    print(f"best: {best['variant']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
