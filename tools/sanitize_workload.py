"""The memory checkers' workload for the CUDA backend: every CUDA kernel and every planar variant, on planes that
fill whole blocks (64x64), leave spare units or lanes (56x56, 17x19), go to the general kernels (channels_last,
odd sizes), single and multi (K blocks), tweedie with the learned-sigma split, normalisation and a mixed output
dtype, reverse_step with a per-element sigma and a shift, philox_normal with a tail. Every result is compared
with the reference (computed on the CPU), so a kernel that reads the wrong memory without faulting fails too.

  GPU:  compute-sanitizer --tool memcheck python tools/sanitize_workload.py   (tools/gpu_check.sh)
  CPU:  LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \\
        ASAN_OPTIONS=detect_leaks=0 python tools/sanitize_workload.py --emulated --asan
        (tests/ops/test_build.py, with tests/cuda_emu.py's asan_env(): AddressSanitizer on csrc/cuda_kernels.cu
        compiled for the CPU)
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from helpers import assert_matches, tweedie_magnitude  # noqa: E402 - the tests' comparison rule
from variants import ENV, VARIANTS  # noqa: E402

import diffaug_kernels as dk  # noqa: E402
from diffaug_kernels.ops import reference  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emulated", action="store_true", help="run the CUDA kernels on the CPU (tests/cuda_emu.py)")
    p.add_argument("--asan", action="store_true", help="with --emulated: the AddressSanitizer build of them")
    a = p.parse_args(argv)
    if a.emulated:
        import cuda_emu

        cuda_emu.register(asan=a.asan)
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda")
    S = dk.NoiseSchedule.linear()
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    runs = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape in ((3, 3, 17, 19), (4, 3, 32, 32), (2, 3, 64, 64), (2, 3, 56, 56)):  # 56x56: 224-thread blocks
            B, C = shape[:2]
            x = (torch.rand(shape, generator=g) * 2 - 1).to(dtype)
            m = torch.randn(B, 2 * C, *shape[2:], generator=g).to(dtype)
            t = torch.randint(0, 1000, (B,), generator=g)
            times = [0, 50, 450]
            noise = reference.forward_noise(x, t, S, 1, 0)
            multi = reference.forward_noise_multi(x, times, S, 2, 0)
            den = reference.tweedie(noise, m, t, S, normalize=dk.IMAGENET_NORM)
            mag = tweedie_magnitude(S, noise, m, t, "eps", dk.IMAGENET_NORM, C)
            for cl in (False, True):
                fmt = torch.channels_last if cl else torch.contiguous_format
                xd, md, td = (x.to(dev).contiguous(memory_format=fmt), m.to(dev).contiguous(memory_format=fmt),
                              t.to(dev))
                nd = noise.to(dev).contiguous(memory_format=fmt)
                for v in VARIANTS:  # the planar kernels' variants (the general kernels ignore the setting)
                    os.environ[ENV["forward_noise"]] = os.environ[ENV["tweedie"]] = v
                    assert_matches(dk.forward_noise(xd, td, S, seed=1, backend="cuda").to(cpu), noise)
                    assert_matches(dk.forward_noise_multi(xd, times, S, seed=2, backend="cuda").to(cpu), multi)
                    assert_matches(dk.tweedie(nd, md, td, S, normalize=dk.IMAGENET_NORM, backend="cuda").to(cpu),
                                   den, mag=mag)
                    runs += 3
                got = dk.tweedie(nd, md, td, S, backend="cuda", out_dtype=torch.float16).to(cpu)
                assert_matches(got, reference.tweedie(noise, m, t, S, out_dtype=torch.float16))
                runs += 1
                # reverse_step with a per-element sigma (a learned variance) and a guidance shift
                c1, c2 = torch.rand(B, generator=g), torch.rand(B, generator=g)
                sig = torch.rand(shape, generator=g).to(dtype)
                want = reference.reverse_step(den.to(dtype), noise, c1, c2, sig, x, seed=5, offset=3)
                got = dk.reverse_step(den.to(dtype).to(dev).contiguous(memory_format=fmt), nd, c1.to(dev), c2.to(dev),
                                      sig.to(dev).contiguous(memory_format=fmt), xd, seed=5, offset=3,
                                      backend="cuda").to(cpu)
                assert_matches(got, want)
                runs += 1
    got = dk.philox_normal((1001,), 3, device=dev, backend="cuda").to(cpu)
    torch.testing.assert_close(got, reference.philox_normal((1001,), 3), rtol=1e-6, atol=2e-6)
    runs += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize workload done: {runs} CUDA-backend calls on {'the CPU emulation' if a.emulated else dev}, "
          "each matching the reference")


if __name__ == "__main__":
    main()
