"""Can the emulated CUDA tests fail? Each mutant below is a small bug put into csrc/cuda_kernels.cu; the
emulation is rebuilt from it and the tests of the "cuda" backend (or, for the out-of-bounds mutant, the
AddressSanitizer workload) are run; the source is restored after each. Run from the repository root:
    python benchmarks/results/emu-2026-11-26-s11/mutants.py
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
from cuda_emu import asan_env  # noqa: E402
SRC = ROOT / "csrc" / "cuda_kernels.cu"
MUTANTS = [
    ("noise planar, units after the first reuse the first unit's counters",
     "normals4(ctr0 + static_cast<uint64_t>(k * N + j * step) / 4 + v",
     "normals4(ctr0 + static_cast<uint64_t>(k * N) / 4 + v", "tests"),
    ("memory-order launch, plane index off by one block",
     "const unsigned plane32 = LIN ? blockIdx.x / slices : blockIdx.x;",
     "const unsigned plane32 = LIN ? (blockIdx.x + 1) / slices : blockIdx.x;", "tests"),
    ("general tweedie kernel, position carry one late",
     "        if (++sp == xv.S) {", "        if (++sp > xv.S) {", "tests"),
    ("general noise kernel, K > 1 unaligned: lane from the wrong element",
     "const int64_t l = el % 4;", "const int64_t l = (el + 1) % 4;", "tests"),
    ("planar block choice: one lane too few per block",
     "  return {dim3(static_cast<unsigned>(ok ? planes : 1), static_cast<unsigned>(ok ? slices : 1)),\n"
     "          dim3(static_cast<unsigned>(threads)), ok};",
     "  return {dim3(static_cast<unsigned>(ok ? planes : 1), static_cast<unsigned>(ok ? slices : 1)),\n"
     "          dim3(static_cast<unsigned>(threads - 1)), ok};", "tests"),
    ("philox_normal grid-stride loop at half stride (every unit written twice, none missed)",
     "  const int64_t units = (N + 3) / 4;\n"
     "  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;\n"
     "       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {",
     "  const int64_t units = (N + 3) / 4;\n"
     "  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;\n"
     "       u += static_cast<int64_t>(gridDim.x) * blockDim.x / 2) {", "tests"),
    ("planar noise, a thread's last unit may run past its plane (out of bounds)",
     "      if (j > 0 && s0 + j * step >= xv.S) break;\n      float nz[E];",
     "      if (j > 0 && s0 + j * step >= xv.S + step) break;\n      float nz[E];", "asan"),
]
TESTS = ["tests/test_forward_noise.py", "tests/test_tweedie.py", "tests/test_philox.py", "-m", "not cuda", "-k", "cuda"]


def run(kind):
    if kind == "tests":
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                           cwd=ROOT, capture_output=True, text=True)
        return r.returncode, r.stdout.strip().splitlines()[-1]
    env = asan_env()
    r = subprocess.run([sys.executable, "benchmarks/sanitize_workload.py", "--emulated", "--asan"], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    summary = [x for x in r.stderr.splitlines() if x.startswith("SUMMARY")] or r.stdout.strip().splitlines()[-1:]
    return r.returncode, summary[0][:200]


def main():
    original = SRC.read_text()
    rc, line = run("tests")
    print(f"unmutated: tests exit {rc}: {line}")
    rc, line = run("asan")
    print(f"unmutated: asan workload exit {rc}: {line}\n")
    try:
        for name, old, new, kind in MUTANTS:
            assert original.count(old) == 1, name
            SRC.write_text(original.replace(old, new))
            rc, line = run(kind)
            print(f"{'CAUGHT' if rc != 0 else 'MISSED'}  {name} ({kind}): exit {rc}: {line}")
    finally:
        SRC.write_text(original)


if __name__ == "__main__":
    main()
