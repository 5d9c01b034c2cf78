"""The Philox header builds on its own (CMake, no torch) and gives the reference's stream."""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffaug_kernels.ops import extension, reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_standalone_philox_header(tmp_path):
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path)], check=True, capture_output=True)
    for seed, offset in [(0, 0), (2**63 + 12345, 2**32 - 2)]:
        out = subprocess.run([str(tmp_path / "philox_check"), str(seed), str(offset)], check=True,
                             capture_output=True, text=True).stdout.split("\n")[:4]
        rows = [line.split() for line in out]
        words = torch.tensor([[int(v) for v in r[:4]] for r in rows])
        normals = torch.tensor([[float(v) for v in r[4:]] for r in rows])
        assert torch.equal(words, reference.philox_uint32(4, seed, offset))
        torch.testing.assert_close(normals.reshape(-1), reference.philox_normal((16,), seed, offset),
                                   rtol=1e-6, atol=2e-6)


def test_box_muller_math_is_accurate_on_every_input(tmp_path):
    """philox.h's branch-free log, sincos and sqrt give every backend's normals (the CUDA kernels compile them
    with FMA contraction; the Triton kernels port the log and sincos), in place of libm's and libdevice's, whose
    guards for inputs that cannot occur here split the noise kernels into blocks. tests/cpp/math_check.cpp
    measures them against double precision: with FMA contraction over all 2^31 uniforms, without it over every
    7th. Bounds: r = sqrt(-2 log u1) within 1.1e-7 relative and sin, cos within 1.05e-7 (about 1 ulp each;
    measured 9.8e-8 and 9.3e-8; moving one log coefficient by 0.09%, or one sine coefficient by 0.01%, breaks
    them), so a normal (|r| < 5.7) is off by under 1.1e-7 relative plus 6e-7 absolute, inside the cross-backend
    tolerance (rtol 1e-6, atol 2e-6) with room for the reference's own rounding; and the device's sqrt step,
    from an rsqrt off by 2^-22, within half an ulp."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    fma = ["-mfma"] if platform.machine() in ("x86_64", "AMD64") else []
    for flags, stride in [(fma + ["-ffp-contract=fast"], 1), (["-ffp-contract=off"], 7)]:
        exe = tmp_path / f"math_check{stride}"
        subprocess.run([cxx, "-O2", "-std=c++17", "-fopenmp", "-fno-math-errno", *flags, "-I", str(ROOT / "csrc"),
                        str(ROOT / "tests/cpp/math_check.cpp"), "-o", str(exe)], check=True, capture_output=True)
        words = subprocess.run([str(exe), str(stride)], check=True, capture_output=True, text=True).stdout.split()
        got = dict(zip(words[::2], map(float, words[1::2])))
        assert got["r_rel"] <= 1.1e-7 and got["sincos_abs"] <= 1.05e-7, (flags, got)
        assert got["sqrt_newton_ulp"] <= 0.5 + 1e-6, (flags, got)


def test_cuda_sources_compiled_where_nvcc_is():
    """The CUDA kernels build wherever torch has CUDA and nvcc is found (CI compiles them without a GPU)."""
    from diffaug_kernels.ops import extension

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("torch without CUDA or no nvcc: the CUDA sources are not built here")
    if extension.C is None:
        pytest.fail(f"the extension did not load: {extension.ERROR}")
    assert extension.has_kernel("CUDA"), "csrc/*.cu were not compiled into the extension"


def test_cuda_kernels_keep_to_registers_and_whole_vector_stores():
    """Two properties of the compiled sm_90 code that the GPU timings depend on, read from the extension's own
    SASS, so CI checks them without a GPU. (1) The planar kernels (what the benchmarks time) and philox_normal's
    have no stack frame or local memory: libm's sincosf puts a 32-byte array (its huge-argument reduction) in a
    kernel that calls it, so the noise kernels use philox.h's sincos. (The general kernels may save a register
    around their assert's call; the libm kernel kept for tools/floor.py has sincosf's array.) (2) The planar
    kernels write each unit with whole vector stores of one width: no 16-bit stores, no mix of widths (a plain
    store of a bf16 unit compiles to six 2-byte and one 4-byte store: csrc/cuda_kernels.cu's store_vec)."""
    from diffaug_kernels.bench import sass
    from diffaug_kernels.ops import extension

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("torch without CUDA or no nvcc: the CUDA sources are not built here")
    if not extension.has_kernel("CUDA"):
        pytest.fail(f"csrc/*.cu were not compiled into the extension: {extension.ERROR}")
    kernels = sass.kernels(extension.C.__file__)
    assert len(kernels) > 70 and all(k.stack >= 0 for k in kernels), len(kernels)  # every one with its usage
    planar = [k for k in kernels if "_plane_kernel" in k.name]
    hot = planar + [k for k in kernels if "normal_kernelILb0E" in k.name]
    assert len(planar) >= 70  # 6 shapes x 4 same-dtype pairs + 12 mixed pairs, per op
    assert [k.name for k in hot if k.stack or k.local] == []
    for k in planar:
        widths = [re.search(r"\bSTG\.E(\.\d+|\.U16|\.S16|\.U8|\.S8)?\.", ins) for _, ins in k.sass]
        stores = {m.group(1) for m in widths if m}  # None: a 32-bit store
        assert len(stores) == 1 and not stores & {".U16", ".S16", ".U8", ".S8"}, (k.name, stores)


def test_sass_stats_script_counts_the_noise_kernels():
    """tools/sass_stats.py (the static instruction counts RESULTS.md cites) runs on the built extension and
    lists every same-dtype noise variant and both philox_normal kernels, the branch-free math's loop the shorter
    one; with --triton, the Triton planar noise kernel for every autotune config, none with a stack frame."""
    from diffaug_kernels.ops import extension

    if torch.version.cuda is None or shutil.which("nvcc") is None or not extension.has_kernel("CUDA"):
        pytest.skip("no CUDA kernels built here")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sass_stats.py"), "--triton"], capture_output=True,
                         text=True, timeout=600, check=True, env=env).stdout
    cuda, triton_part = out.split("\nTriton ")
    rows = {line[:54].strip(): line[54:].split() for line in cuda.splitlines()[2:]}
    assert sum(k.startswith("forward_noise_plane") for k in rows) == 24, out
    assert int(rows["philox_normal, philox.h math"][3]) < int(rows["philox_normal, libm math"][3]), out
    trows = [line.split() for line in triton_part.splitlines()[2:] if line.strip()]
    assert len(trows) == 12 and all(r[4] == "0" for r in trows), triton_part  # 6 configs x 2 dtypes, no stack


def test_gpu_check_script_parses_and_knows_its_default_steps():
    """tools/gpu_check.sh only runs on a lent GPU machine, where a typo costs device minutes: check here
    that bash parses it and that every default step has a branch (an unknown step is reported, not run)."""
    import re

    script = ROOT / "tools" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    default = re.search(r'STEPS="\$\{GPU_CHECK_STEPS:-([a-z0-9,-]+)\}"', text).group(1).split(",")
    branches = set(re.findall(r"^\s+([a-z0-9-]+)\)", text, re.M))
    assert default and set(default) <= branches, set(default) - branches


def test_cuda_kernels_emulated_under_address_sanitizer():
    """compute-sanitizer's workload (tools/sanitize_workload.py: every CUDA kernel and planar variant,
    whole, partial and narrow planes, general layouts, multi, learned sigma, mixed output dtype, philox_normal)
    on csrc/cuda_kernels.cu compiled for the CPU with AddressSanitizer (tests/cuda_emu.py): a read or write
    outside a tensor fails it, as memcheck would on a GPU. (Making one planar variant run a unit past its plane
    fails it with a heap-buffer-overflow: checked by hand.)"""
    from cuda_emu import asan_env

    env = asan_env()
    if env is None or extension.C is None:
        pytest.skip("needs g++ with libasan and the compiled extension")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "sanitize_workload.py"), "--emulated", "--asan"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and "sanitize workload done" in r.stdout, (r.stdout + r.stderr)[-4000:]
    assert "AddressSanitizer" not in r.stderr, r.stderr[-4000:]


TRITON_COMPILE = r"""
import os
import re
import subprocess

import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from diffaug_kernels.ops import triton_kernels as tk

CONST = dict(X_CONTIG=True, O_CONTIG=False, M_CONTIG=False, ALIGNED=False, CLIP=True, NORM=True, A_CONTIG=True,
             S_CONTIG=False, H_CONTIG=False, NOISE=2, SHIFT=True)
for fn in (tk.forward_noise_kernel, tk.forward_noise_plane_kernel, tk.tweedie_kernel, tk.tweedie_plane_kernel,
           tk.philox_normal_kernel, tk.reverse_step_kernel):
    for data, f64 in (("bf16", False), ("fp32", False), ("fp64", True)):
        names = fn.arg_names
        const_names = [names[i] for i in fn.constexprs]
        sig, const = {}, {}
        for n in names:
            if n in const_names:
                sig[n] = "constexpr"
                const[n] = f64 if n == "F64" else (128 if n == "BLOCK" else CONST[n])
            elif n in ("t_ptr", "seed_ptr", "off_ptr"):
                sig[n] = "*i64"
            elif n in ("ca_ptr", "cb_ptr", "sc_ptr", "sh_ptr", "c1_ptr", "c2_ptr"):
                sig[n] = "*fp64" if f64 else "*fp32"
            elif n.endswith("_ptr"):
                sig[n] = "*" + data
            else:
                sig[n] = "i32"  # sizes and strides below 2**31 arrive as int32
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        assert k.asm.get("cubin"), fn.__name__
        # no stack frame or local memory (libdevice's sin and cos would put a local array in the kernel)
        cubin = os.path.join(os.environ["TRITON_CACHE_DIR"], fn.__name__ + ".cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], check=True, capture_output=True, text=True).stdout
        assert re.search(r"STACK:0 SHARED:\d+ LOCAL:0 ", usage), (fn.__name__, data, usage)
        ttir = [l.split(" loc(")[0].strip() for l in k.asm["ttir"].splitlines()]
        # scalar size products (the counter of block k is k * N / 4) in 32 bits wrap past 2**31 elements; the
        # Philox rounds' 32-bit tensor products are meant to be
        narrow = [l for l in ttir if re.search(r"arith\.muli .*: i32$", l)]
        assert not narrow, (fn.__name__, narrow[:3])
        # and every pointer offset is 64-bit
        ptr32 = [l for l in ttir if "tt.addptr" in l and not re.search(r"(, i64|xi64>)$", l)]
        assert not ptr32, (fn.__name__, ptr32[:3])
print("TRITON-SM90-OK")
"""


def test_triton_kernels_compile_for_hopper(tmp_path):
    """The interpreter runs the Triton kernels' Python, not their compilation: compile each kernel here for
    sm_90 (TTIR to cubin, as on a GPU) for 16-bit, 32-bit and 64-bit data, and check that no size product is
    computed in 32 bits, every pointer offset is 64-bit (the kernels widen sizes to int64 first), and no kernel
    has a stack frame or local memory."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    from diffaug_kernels.bench import sass

    tool = sass.cuobjdump()
    assert tool, "no cuobjdump (Triton bundles one)"
    script = f"CUOBJDUMP = {tool!r}\n" + TRITON_COMPILE
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert "TRITON-SM90-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]



LAUNCHES = r"""
import torch
from sm90 import launch_configs

import diffaug_kernels as dk
from diffaug_kernels.ops import dispatch, fp8_conv, triton_kernels as tk

# the Triton backend for CPU tensors, kernels compiled rather than interpreted (tests/sm90.py records each launch)
dispatch.register_backend("triton", dispatch.Backend(
    ("cpu",), tk.forward_noise_out, tk.tweedie_out, tk.philox_normal_out, available=True,
    reverse_step_out=tk.reverse_step_out, group_norm_silu_out=tk.group_norm_silu_out))
sched = dk.NoiseSchedule.linear(1000)
T = "triton"
n = 0
for dtype in (torch.bfloat16, torch.float32, torch.float64):
    planes, small = torch.zeros(2, 4, 32, 32, dtype=dtype), torch.zeros(3, 5, 7, 3, dtype=dtype)
    t2, t3 = torch.tensor([10, 900]), torch.tensor([1, 500, 999])
    cases = [
        ("_forward_noise_plane", lambda: dk.forward_noise(planes, t2, sched, seed=1, backend=T)),
        ("_forward_noise", lambda: dk.forward_noise(small, t3, sched, seed=1, backend=T)),
        ("_forward_noise", lambda: dk.forward_noise_multi(small, [5, 50], sched, seed=1, backend=T)),
        ("_tweedie_plane", lambda: dk.tweedie(planes, planes, t2, sched, backend=T)),
        ("_tweedie", lambda: dk.tweedie(small, small, t3, sched, normalize=([0.5] * 5, [0.2] * 5), backend=T)),
        ("_reverse_step", lambda: dk.reverse_step(small, small, torch.rand(3), torch.rand(3), backend=T)),
        ("_reverse_step", lambda: dk.reverse_step(small, small, torch.rand(3), torch.rand(3), torch.rand(3),
                                                  shift=small, seed=2, backend=T)),
        ("_reverse_step", lambda: dk.reverse_step(small, small, torch.rand(3), torch.rand(3), torch.rand_like(small),
                                                  seed=2, backend=T)),
        ("_philox_normal", lambda: dk.philox_normal((5, 7), seed=3, dtype=dtype, backend=T)),
        ("_group_norm_silu", lambda: dk.group_norm_silu(planes, 2, torch.ones(4), torch.zeros(4), backend=T)),
        ("_group_norm_silu", lambda: dk.group_norm_silu(planes.contiguous(memory_format=torch.channels_last), 2,
                                                        torch.ones(4), torch.zeros(4), 1e-5, torch.zeros(2, 4),
                                                        torch.zeros(2, 4), backend=T)),
    ]
    for attr, call in cases:
        built = launch_configs(tk, attr, call)
        assert built and all(k.asm.get("cubin") for _, k in built), (attr, dtype)
        n += len(built)
for dtype in (torch.float8_e4m3fn, torch.bfloat16):
    x = torch.zeros(2, 64, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(32, 64, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    for stride in (1, 2):
        built = launch_configs(fp8_conv, "conv3x3_scaled_tuned", lambda: fp8_conv.conv3x3_scaled(
            x, w, torch.ones(1), torch.ones(32), torch.zeros(32), stride=stride))
        assert built and all(k.asm.get("cubin") for _, k in built), (dtype, stride)
        n += len(built)
print("LAUNCHES-SM90-OK", n)
"""


def test_every_triton_launch_compiles_for_hopper(tmp_path):
    """Every Triton launcher, called through the public ops with the arguments it gives a GPU launch (flat and
    planar kernels, the ensemble expansion, normalize, the three noise forms and the shift of reverse_step, both
    layouts of group_norm_silu, the FP8 convolution at strides 1 and 2), in bf16, fp32 and fp64: the real
    autotuner prunes its configs for those arguments and every kept config compiles for sm_90 (tests/sm90.py).
    The interpreter runs the kernels' Python with whatever arguments it is given; this catches a launcher that
    gives a compiled kernel arguments it does not take, or a pruning function that fails on them, before a GPU."""
    from sm90 import run_script

    r = run_script(LAUNCHES, tmp_path, timeout=900)
    assert "LAUNCHES-SM90-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
