"""What bounds the fused ops, measured beside them: the copy ceiling, the Philox + Box-Muller rate alone
(dk.philox_normal writes float32 normals and reads nothing; on CUDA also with libm's log, sqrt and sincos,
DIFFAUG_CUDA_RNG_MATH=libm, against the default branch-free ones), and the host cost of one call on a tiny
tensor, timed over back-to-back calls (the GPU work is negligible there): the public op, and what the custom-op
dispatch adds to the kernel call (plain eager calls skip it; traced, autograd and dispatch-mode calls pay it).
Usage: python tools/floor.py [--device cpu|cuda] [JSON]."""
import argparse
import os
import time

import torch

import diffaug_kernels as dk
from diffaug_kernels.bench import harness
from diffaug_kernels.ops.forward_noise import forward_noise_impl, forward_noise_op
from diffaug_kernels.utils import write_json

LIBM = "DIFFAUG_CUDA_RNG_MATH"


def host_us(fn, device, calls=300):
    """Best of five: mean host microseconds per call over back-to-back calls, synchronised at both ends."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        harness.sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        harness.sync(device)
        best = min(best, (time.perf_counter() - t0) * 1e6 / calls)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("json", nargs="?")
    args = p.parse_args()
    dev = torch.device(args.device)
    n = 256 * 3 * 224 * 224
    copy = harness.copy_bandwidth(dev)
    S = dk.NoiseSchedule.linear(1000)
    x = torch.rand(1, 3, 8, 8, device=dev) * 2 - 1
    t = torch.tensor([500], device=dev)
    m = torch.randn(1, 6, 8, 8, device=dev)
    a = S.table("sqrt_alphas_cumprod", dev, torch.float32)
    b = S.table("sqrt_one_minus_alphas_cumprod", dev, torch.float32)
    seed, off = torch.tensor(1, device=dev), torch.tensor(0, device=dev)
    rows = []
    for name in harness.fused_backends(dev) + ["reference"]:
        r = dict(backend=name)
        if name != "reference":
            ms = harness.time_fn(lambda: dk.philox_normal((n,), 1, device=dev, backend=name), reps=10, warmup=2,
                                 device=dev).ms
            r.update(philox_normal_ms=ms, normals_per_ns=n / (ms * 1e6), write_gb_s=4 * n / (ms * 1e-3) / 1e9,
                     pct_copy=100 * 4 * n / (ms * 1e-3) / 1e9 / copy)
            if name == "cuda":  # the same kernel with CUDA's libm log/sqrt/sincos (csrc/cuda_kernels.cu)
                os.environ[LIBM] = "libm"
                try:
                    r["philox_normal_libm_ms"] = harness.time_fn(
                        lambda: dk.philox_normal((n,), 1, device=dev, backend=name), reps=10, warmup=2, device=dev).ms
                finally:
                    del os.environ[LIBM]
            args8 = (x, t.reshape(1, -1), a, b, seed, off, torch.float32, name)
            r["dispatch_us"] = (host_us(lambda: forward_noise_op(*args8), dev)
                                - host_us(lambda: forward_noise_impl(*args8), dev))
        r["forward_noise_us"] = host_us(lambda: dk.forward_noise(x, t, S, backend=name), dev)
        r["tweedie_us"] = host_us(lambda: dk.tweedie(x, m, t, S, normalize=dk.IMAGENET_NORM, backend=name), dev)
        rows.append(r)
    print(f"{harness.device_name(dev)}: copy {copy:.0f} GB/s; {n / 1e6:.1f}M normals (the 256x3x224x224 batch)")
    for r in rows:
        rng = (f"philox_normal {r['philox_normal_ms']:.3f} ms = {r['normals_per_ns']:.2f} normals/ns, writes at "
               f"{r['write_gb_s']:.0f} GB/s ({r['pct_copy']:.0f}% of copy); " if "philox_normal_ms" in r else "")
        if "philox_normal_libm_ms" in r:
            rng += (f"with libm's log/sqrt/sincos {r['philox_normal_libm_ms']:.3f} ms "
                    f"({r['philox_normal_libm_ms'] / r['philox_normal_ms']:.2f}x); ")
        disp = f" (the custom-op dispatch would add {r['dispatch_us']:.0f} us)" if "dispatch_us" in r else ""
        print(f"{r['backend']:<9} {rng}host per call on 1x3x8x8: forward_noise {r['forward_noise_us']:.0f} us, "
              f"tweedie {r['tweedie_us']:.0f} us{disp}")
    if args.json:
        write_json(dict(env=harness.environment(dev), copy_gb_s=copy, n=n, rows=rows), args.json)


if __name__ == "__main__":
    main()
