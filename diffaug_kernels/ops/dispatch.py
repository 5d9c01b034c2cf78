"""Backend dispatch shared by the ops: the registry of fused backends, the "auto" pick, output allocation, launch.

Backends: "reference" (plain PyTorch in reference.py, always there) runs the specification directly, so it
traces and differentiates like any PyTorch code. Fused backends ("cpu", "cuda", "triton") run through each op's
custom op (forward_noise.py, tweedie.py, reverse_step.py, group_norm_silu.py), registered once with a fake kernel
and an autograd formula, which calls the backend's kernel from the table here.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import extension

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Tests set this to fill every fused output with NaN before the kernel runs, so unwritten elements show.
POISON_OUTPUTS = False


@dataclass
class Backend:
    """A fused backend: out-variant kernels with the schemas of csrc/ops.cpp, for some device types."""

    device_types: tuple
    forward_noise_out: Callable
    tweedie_out: Callable
    philox_normal_out: Callable
    available: bool  # decided once at registration (nothing to probe while tracing)
    reverse_step_out: Optional[Callable] = None  # None: a backend built without it (reverse_step runs the reference)
    group_norm_silu_out: Optional[Callable] = None  # None: no kernel here, the reference runs (the "cuda" backend)
    group_norm_silu_backward_out: Optional[Callable] = None  # None: its gradient is the closed form in PyTorch


TABLE: dict[str, Backend] = {}
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def register_backend(name: str, backend: Backend) -> None:
    """Adds a fused backend (the GPU modules call this); "auto" tries names in AUTO_ORDER."""
    if name not in BACKENDS or name == "reference":
        raise ValueError(f"unknown backend name {name!r}")
    TABLE[name] = backend


def _register_compiled() -> None:
    if extension.C is None:
        return
    ops = torch.ops.diffaug_kernels_C
    for name, dev, key in (("cpu", "cpu", "CPU"), ("cuda", "cuda", "CUDA")):
        available = extension.has_kernel(key) and (dev == "cpu" or torch.cuda.is_available())
        register_backend(name, Backend((dev,), ops.forward_noise_out, ops.tweedie_out, ops.philox_normal_out,
                                       available=available,
                                       reverse_step_out=getattr(ops, "reverse_step_out", None),
                                       # csrc/cuda_kernels.cu has no group_norm_silu: the "cuda" backend runs Triton's
                                       group_norm_silu_out=getattr(ops, "group_norm_silu_out", None)
                                       if dev == "cpu" else None,
                                       group_norm_silu_backward_out=getattr(ops, "group_norm_silu_backward_out", None)
                                       if dev == "cpu" else None))


def _register_triton() -> None:
    """Triton on CUDA tensors; on CPU tensors only in interpreter mode (TRITON_INTERPRET=1, for tests)."""
    import importlib.util
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if importlib.util.find_spec("triton") is None or not (interpret or torch.cuda.is_available()):
        return
    from . import triton_kernels as tk

    devices = ("cuda",) + (("cpu",) if interpret else ())
    register_backend("triton", Backend(devices, tk.forward_noise_out, tk.tweedie_out, tk.philox_normal_out,
                                       available=True, reverse_step_out=tk.reverse_step_out,
                                       group_norm_silu_out=tk.group_norm_silu_out))


_register_compiled()
_register_triton()


def usable(name: str, device: torch.device) -> bool:
    b = TABLE.get(name)
    return b is not None and device.type in b.device_types and b.available


def kernels(name: str) -> Backend:
    """The kernel table of a registered fused backend."""
    return TABLE[name]


def available_backends() -> list[str]:
    """Backends that can run in this process (on some device), "reference" first."""
    return ["reference"] + [n for n in BACKENDS[1:] if n in TABLE and TABLE[n].available]


WARNED: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result  # traced code sees a constant: no guards, no graph break
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: "auto" is the fastest usable one; a missing one falls back with a warning."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    auto = next((n for n in AUTO_ORDER.get(device.type, ()) if usable(n, device)), "reference")
    if backend == "auto" or backend == "reference" or usable(backend, device):
        return auto if backend == "auto" else backend
    why = ("the compiled extension is not loaded: " + str(extension.ERROR)) if backend in ("cpu", "cuda") and \
        extension.C is None else f"it does not run on {device.type} tensors here"
    _warn_once((backend, device.type), f"diffaug_kernels: backend {backend!r} is not available ({why}); "
                                      f"using {auto!r} instead")
    return auto


MEASURED: dict = {}  # (op, device, dtype, size class) -> the fastest backend measured for it


def _time_backend(name: str, run: Callable[[str], object], device: torch.device, reps: int = 5) -> float:
    """Median seconds of run(name) after one warm-up (CUDA events on GPU)."""
    def fn():
        return run(name)

    with on_device(device):  # events and launches on the tensors' device, not whichever is current
        return median_seconds(fn, device, reps)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps calls after one warm-up: CUDA events on a GPU, the wall clock on CPU."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _auto_key(op: str, x: Tensor) -> tuple:
    return (op, x.device, x.dtype, max(x.numel(), 1).bit_length())


def auto_choice(op: str, x: Tensor) -> str:
    """The backend backend="auto" runs for op ("forward_noise", "tweedie", "reverse_step", "forward_noise_multi<K>")
    on x: the measured pick once there has been one, else the default order's first usable backend."""
    return MEASURED.get(_auto_key(op, x)) or resolve_backend("auto", x.device)


def auto_pick(op: str, x: Tensor, run: Callable[[str], object]) -> Optional[str]:
    """For backend="auto" where several fused backends can run on x's device: the one measured fastest for
    this op, dtype and size class (powers of two of numel), timed once per process on first use. None when
    there is nothing to choose, or while tracing or capturing (the default order applies)."""
    cands = [n for n in AUTO_ORDER.get(x.device.type, ()) if usable(n, x.device)]
    if len(cands) < 2 or torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    key = _auto_key(op, x)
    if key not in MEASURED:
        MEASURED[key] = min(cands, key=lambda n: _time_backend(n, run, x.device))
    return MEASURED[key]


# --------------------------------------------------------------------------------------------- outputs
def empty_out(x: Tensor, rows, dtype: torch.dtype, device=None) -> Tensor:
    """The output of a fused op: x's shape with `rows` rows; channels_last when x is."""
    shape = (rows, *x.shape[1:])
    device = x.device if device is None else device
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype, device=device)


_POOL_MIN_BYTES = 16 << 20  # csrc/cpu_kernels.cpp's BufferPool::kMinBytes: smaller outputs skip the pool


def pooled(nbytes: int, device: torch.device) -> bool:
    """Whether an output comes from the extension's CPU buffer pool: large CPU outputs reuse warm memory instead
    of fresh pages faulted in on every call (csrc/cpu_kernels.cpp)."""
    return device.type == "cpu" and extension.C is not None and nbytes >= _POOL_MIN_BYTES


def poisoned(out: Tensor) -> Tensor:
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def from_pool(meta: Tensor) -> Tensor:
    """A CPU tensor from the buffer pool with meta's shape, strides and dtype."""
    return torch.ops.diffaug_kernels_C.empty_cpu_output(meta.shape, meta.stride(), meta.dtype)


def alloc(x: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """A fused op's real output: x's layout with `rows` rows (see empty_out)."""
    if pooled(x.numel() // max(x.shape[0], 1) * rows * dtype.itemsize, x.device):
        return poisoned(from_pool(empty_out(x, rows, dtype, device="meta")))
    return poisoned(empty_out(x, rows, dtype))


def direct_call(*tensors: Tensor) -> bool:
    """Whether a fused op may call its kernel without the custom-op dispatch, which costs about 10 us of host
    time per call on a 2-core CPU (tools/floor.py measures it). Only in plain eager use: not tracing, no input
    needing a gradient (the op carries the autograd formula), plain tensors, and no torch-function or dispatch
    mode that must see the op. (Under torch.func transforms and forward-mode
    AD the reference runs instead: backend_for.)"""
    return not (torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                or any(type(t) is not Tensor for t in tensors)
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() > 0)


def backend_for(name: str) -> str:
    """The resolved backend, or "reference" under forward-mode AD (torch.autograd.forward_ad) or a torch.func
    transform (grad, jvp, vmap, ...): the custom ops carry a backward formula only, and without a forward
    derivative a jvp through them would come back as zeros. The reference is plain differentiable PyTorch and
    gives the same numbers (the noise contract), so results stay right, only slower."""
    if name == "reference" or torch.compiler.is_compiling():
        return name
    if torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return "reference"
    return name


# ---------------------------------------------------------------------------------------------- launch
def on_device(device: torch.device):
    """The tensors' CUDA device made current: Triton launches (and CUDA events record) on the current device,
    whatever the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(device: torch.device, backend: str, fn: Callable, *args) -> None:
    """fn(*args), under on_device(device) where the backend needs it (Triton; the CUDA extension guards itself): the
    common path pays no context manager (about 0.6 us of host time per call)."""
    if backend == "triton":
        with on_device(device):
            fn(*args)
    else:
        fn(*args)


