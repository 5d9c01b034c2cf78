"""pytest-benchmark suites (run with `pytest benchmarks/`; the plain `pytest` run only collects tests/).

--bench-device picks the device (default: cuda when available, else cpu); the implementations benchmarked
are the published eager code, its torch.compile'd twin and every fused backend for that device. Caches are
flushed before every round (as `diffaug bench` does) unless --bench-no-flush.
"""
import time

import pytest
import torch

from diffaug_kernels.bench import harness as bench


def pytest_addoption(parser):
    g = parser.getgroup("diffaug benchmarks")
    g.addoption("--bench-device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    g.addoption("--bench-rounds", type=int, default=20, help="timed rounds per benchmark (default 20)")
    g.addoption("--bench-no-flush", action="store_true", help="keep caches warm between rounds")


def _device(config) -> torch.device:
    d = config.getoption("--bench-device")
    return torch.device(d or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:  # the fused rows depend on what this machine has built
        dev = _device(metafunc.config)
        impls = [bench.SAME_COPY, bench.EAGER, bench.COMPILED] + [f"fused ({n})" for n in bench.fused_backends(dev)]
        metafunc.parametrize("impl", impls)


@pytest.fixture(scope="session")
def device(pytestconfig):
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def run_timed(pytestconfig, device):
    """run_timed(benchmark, fn): rounds of fn, each after an untimed cache flush; CUDA calls are synchronised
    so the round times the kernels, not the launch."""
    rounds = pytestconfig.getoption("--bench-rounds")
    flush = not pytestconfig.getoption("--bench-no-flush")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def setup():
        if flush:
            bench.flush_cache(device)
        sync()

    def run(benchmark, fn):
        def timed():
            fn()
            sync()

        return benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1)

    return run


def pytest_sessionstart(session):
    session.config._bench_cpu0 = (bench.cpu_seconds(), time.perf_counter())


def pytest_terminal_summary(terminalreporter, config):
    """On a shared CPU machine other processes take cores from the timed code: say so when they did."""
    c0, w0 = getattr(config, "_bench_cpu0", (None, None))
    if c0 is None:
        return
    other = bench.other_cpu_fraction(c0, bench.cpu_seconds(), time.perf_counter() - w0)
    if other is not None and other > 0.05:
        terminalreporter.write_line(f"warning: other processes used {100 * other:.0f}% of the CPUs during the "
                                    "benchmarks; the timings are noisy", yellow=True)
