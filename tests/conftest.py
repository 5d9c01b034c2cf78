import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in the interpreter (set before import;
    os.environ["TRITON_INTERPRET"] = "1"  # forced: a stray TRITON_INTERPRET=0 would drop every Triton test)

import diffaug_kernels as dk  # noqa: E402
from diffaug_kernels import ops  # noqa: E402

# Derandomized, no deadline: the suite never flakes and never depends on the machine's speed.
# No shrinking in CI: a failure is reported at once (shrinking Triton-interpreter cases can take minutes).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Fused backends that run on CPU tensors in this process (the reference is what they are compared with).
CPU_FUSED = [b for b in dk.available_backends() if b != "reference" and ops._usable(b, torch.device("cpu"))]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (run with -m cuda on a GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every fused output starts as NaN, so an element a kernel forgot to write fails the comparison."""
    ops.POISON_OUTPUTS = True
    yield
    ops.POISON_OUTPUTS = False


@pytest.fixture(scope="session")
def linear():
    return dk.NoiseSchedule.linear(1000)


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    """Each GPU backend in turn; on a GPU machine both must be there (a missing one fails, never skips)."""
    if not ops._usable(request.param, torch.device("cuda")):
        pytest.fail(f"backend {request.param!r} is not available on this GPU machine: {ops._ext.ERROR}")
    return request.param
