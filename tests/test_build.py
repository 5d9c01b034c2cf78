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
