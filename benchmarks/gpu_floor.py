"""What bounds the fused ops on a GPU, measured beside them: the copy ceiling, the Philox + Box-Muller rate
alone (dk.philox_normal writes float32 normals and reads nothing), and the per-call time of each op on a tiny
tensor, timed host-side over back-to-back calls (the launch cost; the GPU work is negligible).
Usage: python benchmarks/gpu_floor.py [JSON]."""
import time
import json
import sys

import torch

import diffaug_kernels as dk
from diffaug_kernels import bench

dev = torch.device("cuda")


def host_ms(fn, calls=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


n = 256 * 3 * 224 * 224
copy = bench.copy_bandwidth(dev)
rows = []
S = dk.NoiseSchedule.linear(1000)
for b in ("cuda", "triton"):
    out_ms = bench.time_fn(lambda: dk.philox_normal((n,), 1, device=dev, backend=b), reps=30, warmup=5,
                           device=dev).ms
    x = torch.rand(1, 3, 8, 8, device=dev) * 2 - 1
    t = torch.tensor([500], device=dev)
    m = torch.randn(1, 6, 8, 8, device=dev)
    tiny_fn = host_ms(lambda: dk.forward_noise(x, t, S, backend=b))
    tiny_tw = host_ms(lambda: dk.tweedie(x, m, t, S, normalize=dk.IMAGENET_NORM, backend=b))
    rows.append(dict(backend=b, philox_normal_ms=out_ms, normals_per_ns=n / (out_ms * 1e6),
                     write_gb_s=4 * n / (out_ms * 1e-3) / 1e9, pct_copy=100 * 4 * n / (out_ms * 1e-3) / 1e9 / copy,
                     tiny_forward_noise_ms=tiny_fn, tiny_tweedie_ms=tiny_tw))
print(f"{bench.device_name(dev)}: copy {copy:.0f} GB/s; {n / 1e6:.1f}M normals (the 256x3x224x224 batch)")
for r in rows:
    print(f"{r['backend']:<7} philox_normal {r['philox_normal_ms']:.3f} ms = {r['normals_per_ns']:.0f} normals/ns, "
          f"writes at {r['write_gb_s']:.0f} GB/s ({r['pct_copy']:.0f}% of copy); per call on 1x3x8x8: "
          f"forward_noise {r['tiny_forward_noise_ms'] * 1e3:.0f} us, tweedie {r['tiny_tweedie_ms'] * 1e3:.0f} us")
if len(sys.argv) > 1:
    json.dump(dict(env=bench.environment(dev), copy_gb_s=copy, n=n, rows=rows), open(sys.argv[1], "w"), indent=1)
