"""The Philox header builds on its own (CMake, no torch) and gives the reference's stream."""
import shutil
import subprocess
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
