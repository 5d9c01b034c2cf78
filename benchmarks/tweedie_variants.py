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
                                     inp["normalize"]).double()
            # the tests' tolerance (tests/helpers.assert_matches): 1e-5, plus 4 float32 ulps of the summed terms'
            # size (a x_t and b eps cancel: b is up to ~100 at large t) scaled by the normalisation, plus one
            # output ulp for 16-bit outputs (bounded here by 2**-7 of the value in bf16, 2**-10 in fp16)
            A, B = inp["schedule"].x0_coefficients("eps", dtype=torch.float64)
            A, B = A.to(dev)[inp["t"]].view(-1, 1, 1, 1), B.to(dev)[inp["t"]].view(-1, 1, 1, 1)
            C = shape[1]
            mag = ((A * inp["x"].double()).abs() + (B * inp["model_output"][:, :C].double()).abs()) / torch.tensor(
                inp["normalize"][1], dtype=torch.float64, device=dev).view(1, -1, 1, 1)
            ulp16 = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(dtype, 0.0)
            tol = 1e-5 + 4 * 2.0**-23 * mag + want.abs() * ulp16
            del A, B, mag
            ops.POISON_OUTPUTS = True  # outputs start as NaN: an element a variant leaves unwritten fails
            for v in VARIANTS:  # a variant is timed only if it computes the op (every element, in tolerance)
                os.environ[ENV] = v
                got = fused().double()
                bad = int(((got - want).abs() > tol).sum() + torch.isnan(got).sum())  # NaN compares False above
                if bad:
                    raise SystemExit(f"variant {v} ({dname}): {bad} elements differ from the reference")
            ops.POISON_OUTPUTS = False
            del want, tol, got
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
