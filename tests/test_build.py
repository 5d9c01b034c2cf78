"""The Philox header builds on its own (CMake, no torch) and gives the reference's stream."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffaug_kernels import reference

ROOT = Path(__file__).resolve().parents[1]


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


def test_cuda_sources_compiled_where_nvcc_is():
    """The CUDA kernels build wherever torch has CUDA and nvcc is found (CI compiles them without a GPU)."""
    from diffaug_kernels import _ext

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("torch without CUDA or no nvcc: the CUDA sources are not built here")
    if _ext._C is None:
        pytest.fail(f"the extension did not load: {_ext.ERROR}")
    assert _ext.has_kernel("CUDA"), "csrc/*.cu were not compiled into the extension"


def test_gpu_check_script_parses_and_knows_its_default_steps():
    """benchmarks/gpu_check.sh only runs on a lent GPU machine, where a typo costs device minutes: check here
    that bash parses it and that every default step has a branch (an unknown step is reported, not run)."""
    import re

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    default = re.search(r'STEPS="\$\{GPU_CHECK_STEPS:-([a-z0-9,-]+)\}"', text).group(1).split(",")
    branches = set(re.findall(r"^\s+([a-z0-9-]+)\)", text, re.M))
    assert default and set(default) <= branches, set(default) - branches


TRITON_COMPILE = r"""
import re

import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from diffaug_kernels import triton_kernels as tk

CONST = dict(X_CONTIG=True, O_CONTIG=False, M_CONTIG=False, ALIGNED=False, CLIP=True, NORM=True)
for fn in (tk._noise_kernel, tk._noise_plane_kernel, tk._tweedie_kernel, tk._tweedie_plane_kernel, tk._normal_kernel):
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
            elif n in ("ca_ptr", "cb_ptr", "sc_ptr", "sh_ptr"):
                sig[n] = "*fp64" if f64 else "*fp32"
            elif n.endswith("_ptr"):
                sig[n] = "*" + data
            else:
                sig[n] = "i32"  # sizes and strides below 2**31 arrive as int32
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        assert k.asm.get("cubin"), fn.__name__
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
    computed in 32 bits and every pointer offset is 64-bit (the kernels widen sizes to int64 first)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", TRITON_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert "TRITON-SM90-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
