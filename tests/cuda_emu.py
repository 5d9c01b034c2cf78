"""The CUDA backend without a GPU: csrc/cuda_kernels.cu compiled for the CPU (tests/cpp/cuda_emu.h runs each
launch one thread at a time) and registered as the "cuda" backend on CPU tensors, the way TRITON_INTERPRET=1
runs the Triton kernels. conftest.py calls register() where there is no GPU, so every CPU test parametrised
over the fused backends runs the CUDA kernels too. Built once into build/diffaug_cuda_emu (about 15 s on 2 cores;
later runs reuse it unless a source changed)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build(asan: bool = False):
    """Compiles (or reuses) the emulation library and returns torch.ops.diffaug_kernels_cuda_emu. asan: the
    AddressSanitizer build (its own library and folder), for a process started with libasan preloaded
    (tools/sanitize_workload.py --emulated --asan)."""
    from torch.utils import cpp_extension

    name = "diffaug_cuda_emu" + ("_asan" if asan else "")
    out = ROOT / "build" / name
    out.mkdir(parents=True, exist_ok=True)
    # -O1: quick to build, fast enough for test tensors; no strict aliasing: the kernels read bf16 data
    # through int4 vectors as CUDA code does.
    flags = ["-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-class-memaccess"]
    san = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    cpp_extension.load(
        name=name, sources=[str(ROOT / "tests" / "cpp" / "cuda_emu.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "cpp")], extra_cflags=flags + san,
        extra_ldflags=san, build_directory=str(out), is_python_module=False,
        verbose=os.environ.get("DIFFAUG_CUDA_EMU_VERBOSE") == "1")
    return torch.ops.diffaug_kernels_cuda_emu


def register(asan: bool = False) -> None:
    """Registers the emulated kernels as the "cuda" backend for CPU tensors (never for "auto": AUTO_ORDER
    keeps "cpu" alone for CPU tensors)."""
    from diffaug_kernels.ops import dispatch

    emu = build(asan)
    dispatch.register_backend("cuda", dispatch.Backend(("cpu",), emu.forward_noise_out, emu.tweedie_out,
                                             emu.philox_normal_out, available=True,
                                             reverse_step_out=emu.reverse_step_out))


def asan_env():
    """The environment for a process that loads the AddressSanitizer build: libasan preloaded, with the C++ runtime
    (else libasan's exception interceptor finds no __cxa_throw and aborts at the first C++ throw, in Triton's
    import), leak reports off. None without g++ or its libasan."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    libs = [subprocess.run([cxx, f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
            for n in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(x) and os.path.exists(x) for x in libs):
        return None
    return dict(os.environ, LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0")
