import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in the interpreter (set before import;
    os.environ["TRITON_INTERPRET"] = "1"  # forced: a stray TRITON_INTERPRET=0 would drop every Triton test)

import diffaug_kernels as dk  # noqa: E402
from diffaug_kernels import ops  # noqa: E402
from diffaug_kernels.ops import dispatch, extension  # noqa: E402

# Likewise the CUDA kernels: without a GPU, csrc/cuda_kernels.cu compiled for the CPU (tests/cuda_emu.py) is the
# "cuda" backend on CPU tensors. Wherever the extension built (a compiler is there) it must build too: a failure
# stops the run rather than quietly dropping the CUDA code's tests (DIFFAUG_CUDA_EMU=0 opts out).
if not torch.cuda.is_available() and extension.C is not None and os.environ.get("DIFFAUG_CUDA_EMU", "1") != "0":
    import cuda_emu  # noqa: E402

    cuda_emu.register()

# Derandomized, no deadline: the suite never flakes and never depends on the machine's speed.
# No shrinking in CI: a failure is reported at once (shrinking Triton-interpreter cases can take minutes).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Fused backends that run on CPU tensors in this process (the reference is what they are compared with).
CPU_FUSED = [b for b in dk.available_backends() if b != "reference" and ops.usable(b, torch.device("cpu"))]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (run with -m cuda on a GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # (not item.keywords: an id such as [cuda] is one too)
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every fused output starts as NaN, so an element a kernel forgot to write fails the comparison."""
    dispatch.POISON_OUTPUTS = True
    yield
    dispatch.POISON_OUTPUTS = False


@pytest.fixture(scope="session")
def linear():
    return dk.NoiseSchedule.linear(1000)


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    """Each GPU backend in turn; on a GPU machine both must be there (a missing one fails, never skips)."""
    if not ops.usable(request.param, torch.device("cuda")):
        pytest.fail(f"backend {request.param!r} is not available on this GPU machine: {extension.ERROR}")
    return request.param


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.cuda), "emulated"])
def cuda_kernels(request):
    """The device for a test of the CUDA backend's own kernels: the GPU (-m cuda), or, on a machine without one,
    CPU tensors through the emulation (tests/cuda_emu.py). Each machine runs the one it has."""
    if request.param == "gpu":
        return torch.device("cuda")
    if torch.cuda.is_available():
        pytest.skip("this machine runs the CUDA kernels on its GPU (the gpu case)")
    if not ops.usable("cuda", torch.device("cpu")):
        pytest.skip(f"no CUDA emulation without the compiled extension ({extension.ERROR}) or with DIFFAUG_CUDA_EMU=0")
    return torch.device("cpu")
