"""The public ops: argument checks, backend choice, one torch custom op per kernel family, autograd.

Backends: "reference" (plain PyTorch in reference.py, always there) runs the specification directly, so it
traces and differentiates like any PyTorch code. Fused backends ("cpu", "cuda", "triton") go through the
custom ops below, each registered once with a fake kernel and an autograd formula, and dispatching to the
backend's kernel table. seed and offset travel as int64 tensors, so a compiled graph neither bakes a seed in
nor recompiles for a new one, and nothing syncs with the host on the way in.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _constants, _ext, reference
from .reference import _compute_dtype, _per_sample
from .schedule import PREDICTIONS, NoiseSchedule

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BACKENDS = ("reference", "cpu", "cuda", "triton")

# Tests set this to fill every fused output with NaN before the kernel runs, so unwritten elements show.
POISON_OUTPUTS = False


# ------------------------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """A fused backend: out-variant kernels with the schemas of csrc/ops.cpp, for some device types."""

    device_types: tuple
    noise_out: Callable
    tweedie_out: Callable
    philox_normal_out: Callable
    available: bool  # decided once at registration (nothing to probe while tracing)


_BACKENDS: dict[str, Backend] = {}
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def register_backend(name: str, backend: Backend) -> None:
    """Adds a fused backend (the GPU modules call this); "auto" tries names in _AUTO_ORDER."""
    if name not in BACKENDS or name == "reference":
        raise ValueError(f"unknown backend name {name!r}")
    _BACKENDS[name] = backend


def _register_compiled() -> None:
    if _ext._C is None:
        return
    ops = torch.ops.diffaug_kernels_C
    for name, dev, key in (("cpu", "cpu", "CPU"), ("cuda", "cuda", "CUDA")):
        register_backend(name, Backend((dev,), ops.noise_out, ops.tweedie_out, ops.philox_normal_out,
                                       available=_ext.has_kernel(key) and (dev == "cpu" or torch.cuda.is_available())))




def _register_triton() -> None:
    """Triton on CUDA tensors; on CPU tensors only in interpreter mode (TRITON_INTERPRET=1, for tests)."""
    import importlib.util
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if importlib.util.find_spec("triton") is None or not (interpret or torch.cuda.is_available()):
        return
    from . import triton_kernels as tk

    devices = ("cuda",) + (("cpu",) if interpret else ())
    register_backend("triton", Backend(devices, tk.noise_out, tk.tweedie_out, tk.philox_normal_out, available=True))


_register_compiled()
_register_triton()


def _usable(name: str, device: torch.device) -> bool:
    b = _BACKENDS.get(name)
    return b is not None and device.type in b.device_types and b.available


def available_backends() -> list[str]:
    """Backends that can run in this process (on some device), "reference" first."""
    return ["reference"] + [n for n in BACKENDS[1:] if n in _BACKENDS and _BACKENDS[n].available]


_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result  # traced code sees a constant: no guards, no graph break
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: "auto" is the fastest usable one; a missing one falls back with a warning."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    auto = next((n for n in _AUTO_ORDER.get(device.type, ()) if _usable(n, device)), "reference")
    if backend == "auto" or backend == "reference" or _usable(backend, device):
        return auto if backend == "auto" else backend
    why = ("the compiled extension is not loaded: " + str(_ext.ERROR)) if backend in ("cpu", "cuda") and \
        _ext._C is None else f"it does not run on {device.type} tensors here"
    _warn_once((backend, device.type), f"diffaug_kernels: backend {backend!r} is not available ({why}); "
                                      f"using {auto!r} instead")
    return auto


_MEASURED: dict = {}  # (op, device, dtype, size class) -> the fastest backend measured for it


def _time_backend(name: str, run: Callable[[str], object], device: torch.device, reps: int = 5) -> float:
    """Median seconds of run(name) after one warm-up (CUDA events on GPU)."""
    def fn():
        return run(name)

    with _on(device):  # events and launches on the tensors' device, not whichever is current
        return _median_seconds(fn, device, reps)


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
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
    """The backend backend="auto" runs for op ("forward_noise", "tweedie", "forward_noise_multi<K>") on x: the
    measured pick once there has been one, else the default order's first usable backend."""
    return _MEASURED.get(_auto_key(op, x)) or resolve_backend("auto", x.device)


def _auto_pick(op: str, x: Tensor, run: Callable[[str], object]) -> Optional[str]:
    """For backend="auto" where several fused backends can run on x's device: the one measured fastest for
    this op, dtype and size class (powers of two of numel), timed once per process on first use. None when
    there is nothing to choose, or while tracing or capturing (the default order applies)."""
    cands = [n for n in _AUTO_ORDER.get(x.device.type, ()) if _usable(n, x.device)]
    if len(cands) < 2 or torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    key = _auto_key(op, x)
    if key not in _MEASURED:
        _MEASURED[key] = min(cands, key=lambda n: _time_backend(n, run, x.device))
    return _MEASURED[key]


# ---------------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, x, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.dim() < min_dim:
        shape = "[B, C, ...]" if min_dim >= 2 else "[B, ...]"
        raise ValueError(f"{name} must have shape {shape} (at least {min_dim} dims), got {tuple(x.shape)}")


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in DTYPES:
        raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, float64 or None, got {out_dtype}")
    return out_dtype


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_t_values(name: str, t: Tensor, T: int) -> None:
    """Range check of t on the host; skipped while tracing. On CUDA, checking here would sync with the host (or
    cost four more kernel launches per call as an async assertion), so each backend checks on the device: the
    CUDA kernels assert; the Triton wrapper and the reference, whose gathers cannot, use
    reference.assert_t_on_device."""
    if not (torch.compiler.is_compiling() or t.is_cuda):
        reference.check_t_on_host(name, t, T)


def _as_times(name: str, t, batch: int, device: torch.device, T: int) -> Tensor:
    """t as an int64 tensor of shape [batch] on device (an int or 0-d tensor is broadcast)."""
    if _is_int(t):
        if not 0 <= int(t) < T:
            raise ValueError(f"{name} must lie in [0, {T}) for this schedule, got {int(t)}")
        return torch.full((batch,), int(t), dtype=torch.int64, device=device)
    if isinstance(t, (list, tuple)):
        if not all(_is_int(v) for v in t):
            raise TypeError(f"{name} must hold integers, got {t!r}")
        _no_host_copy_while_capturing(name, device)
        t = torch.tensor(t, dtype=torch.int64, device=device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; put them on one device")
    if t.dim() == 0:
        t = t.expand(batch)
    elif t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be an int, a 0-d tensor or a tensor of shape [{batch}], got {tuple(t.shape)}")
    t = t.to(torch.int64)
    _check_t_values(name, t, T)
    return t


def _as_seed(name: str, v, device: torch.device) -> Tensor:
    """seed / offset as a 0-d int64 tensor (uint64 bits); None draws a seed from torch's default generator."""
    if v is None:
        if name != "seed":
            raise TypeError(f"{name} must be an integer, got None")
        return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device)
    if _is_int(v):
        v = int(v)
        if name == "offset" and not 0 <= v < 2**63:
            raise ValueError(f"offset must lie in [0, 2**63), got {v}")
        if not 0 <= v < 2**64:
            raise ValueError(f"seed must lie in [0, 2**64), got {v}")
        if torch.compiler.is_compiling() and v >= 2**63:
            # torch.compile may turn an int argument into a symbol, and inductor holds symbols as int64: the
            # compiled graph would fail on this seed (or on its int64 form, v - 2**64) with an overflow
            raise ValueError(f"{name}={v} is 2**63 or more: inside torch.compile give such a seed as a tensor "
                             f"(torch.tensor({v - 2**64}), its int64 bits), or a Python int below 2**63")
        # a fill, not a host-to-device copy: nothing syncs and CUDA-graph capture works
        return torch.full((), v - 2**64 if v >= 2**63 else v, dtype=torch.int64, device=device)
    if isinstance(v, Tensor):
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool or v.numel() != 1:
            raise TypeError(f"{name} must be an integer or a one-element integer tensor, got a {v.dtype} tensor "
                            f"of shape {tuple(v.shape)}")
        if v.device.type != device.type:  # a host copy ("cuda" and "cuda:0" are one device: no copy)
            _no_host_copy_while_capturing(name, device)
        return v.reshape(()).to(device=device, dtype=torch.int64)
    raise TypeError(f"{name} must be an integer (or None for a fresh seed), got {type(v).__name__}: {v!r}")


def _no_host_copy_while_capturing(name: str, device: torch.device) -> None:
    """A host-to-device copy cannot be captured in a CUDA graph (and would replay stale values): say which
    argument to move, instead of CUDA's capture error."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{name} would be copied from the host inside a CUDA-graph capture; pass it as a tensor "
                           f"on {device} (made before the capture), or as a Python int where one is allowed")


def _empty_out(x: Tensor, rows, dtype: torch.dtype, device=None) -> Tensor:
    """The output of a fused op: x's shape with `rows` rows; channels_last when x is."""
    shape = (rows, *x.shape[1:])
    device = x.device if device is None else device
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype, device=device)


_POOL_MIN_BYTES = 16 << 20  # csrc/cpu_kernels.cpp's BufferPool::kMinBytes: smaller outputs skip the pool


def _pooled(nbytes: int, device: torch.device) -> bool:
    """Whether an output comes from the extension's CPU buffer pool: large CPU outputs reuse warm memory instead
    of fresh pages faulted in on every call (csrc/cpu_kernels.cpp)."""
    return device.type == "cpu" and _ext._C is not None and nbytes >= _POOL_MIN_BYTES


def _poisoned(out: Tensor) -> Tensor:
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _from_pool(meta: Tensor) -> Tensor:
    """A CPU tensor from the buffer pool with meta's shape, strides and dtype."""
    return torch.ops.diffaug_kernels_C.empty_cpu_output(meta.shape, meta.stride(), meta.dtype)


def _alloc(x: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """A fused op's real output: x's layout with `rows` rows (see _empty_out)."""
    if _pooled(x.numel() // max(x.shape[0], 1) * rows * dtype.itemsize, x.device):
        return _poisoned(_from_pool(_empty_out(x, rows, dtype, device="meta")))
    return _poisoned(_empty_out(x, rows, dtype))


def _direct(*tensors: Tensor) -> bool:
    """Whether a fused op may call its kernel without the custom-op dispatch, which costs about 10 us of host
    time per call (benchmarks/floor.py on the 2-core CPU, 2026-11-26). Only in plain
    eager use: not tracing, no input needing a gradient (the op carries the autograd formula), plain tensors,
    and no torch-function or dispatch mode that must see the op. (Under torch.func transforms and forward-mode
    AD the reference runs instead: _backend_for.)"""
    return not (torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                or any(type(t) is not Tensor for t in tensors)
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() > 0)


def _backend_for(name: str) -> str:
    """The resolved backend, or "reference" under forward-mode AD (torch.autograd.forward_ad) or a torch.func
    transform (grad, jvp, vmap, ...): the custom ops carry a backward formula only, and without a forward
    derivative a jvp through them would come back as zeros. The reference is plain differentiable PyTorch and
    gives the same numbers (the noise contract), so results stay right, only slower."""
    if name == "reference" or torch.compiler.is_compiling():
        return name
    if torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return "reference"
    return name


# ------------------------------------------------------------------------------------ custom op: noise
def _on(device: torch.device):
    """The tensors' CUDA device made current: Triton launches (and CUDA events record) on the current device,
    whatever the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(device: torch.device, backend: str, fn: Callable, *args) -> None:
    """fn(*args), under _on(device) where the backend needs it (Triton; the CUDA extension guards itself): the
    common path pays no context manager (about 0.6 us of host time per call)."""
    if backend == "triton":
        with _on(device):
            fn(*args)
    else:
        fn(*args)


def _noise_impl(x0: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, seed: Tensor, offset: Tensor,
                out_dtype: torch.dtype, backend: str) -> Tensor:
    out = _alloc(x0, t.shape[0] * x0.shape[0], out_dtype)
    if out.numel():  # an empty tensor has nothing to write (and may have no [B, C, S] view)
        _launch(x0.device, backend, _BACKENDS[backend].noise_out, x0, t, coef_a, coef_b, seed, offset, out)
    return out


@torch.library.custom_op("diffaug_kernels::forward_noise", mutates_args=())
def _noise_op(x0: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, seed: Tensor, offset: Tensor,
              out_dtype: torch.dtype, backend: str) -> Tensor:
    """out[k*B + b] = coef_a[t[k, b]] * x0[b] + coef_b[t[k, b]] * noise; t is [K, B] (K = 1: forward_noise)."""
    return _noise_impl(x0, t, coef_a, coef_b, seed, offset, out_dtype, backend)


@_noise_op.register_fake
def _(x0, t, coef_a, coef_b, seed, offset, out_dtype, backend):
    return _empty_out(x0, t.shape[0] * x0.shape[0], out_dtype)


def _noise_setup(ctx, inputs, output):
    x0, t, coef_a = inputs[:3]
    ctx.save_for_backward(t, coef_a)
    ctx.x_shape, ctx.x_dtype = x0.shape, x0.dtype


def _noise_backward(ctx, grad):
    t, coef_a = ctx.saved_tensors
    K, B = t.shape
    a = coef_a[t].to(_compute_dtype(ctx.x_dtype))  # d out[k*B + b] / d x0[b] = coef_a[t[k, b]]
    g = (grad.reshape(K, B, -1).to(a.dtype) * a.unsqueeze(-1)).sum(0)
    return g.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, None, None, None, None


_noise_op.register_autograd(_noise_backward, setup_context=_noise_setup)


# ---------------------------------------------------------------------------------- custom op: tweedie
def _tweedie_impl(x_t: Tensor, model_output: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, clip: bool,
                  scale: Optional[Tensor], shift: Optional[Tensor], out_dtype: torch.dtype, backend: str) -> Tensor:
    out = _alloc(x_t, x_t.shape[0], out_dtype)
    if out.numel():
        _launch(x_t.device, backend, _BACKENDS[backend].tweedie_out, x_t, model_output, t, coef_a, coef_b, clip,
                scale, shift, out)
    return out


@torch.library.custom_op("diffaug_kernels::tweedie", mutates_args=())
def _tweedie_op(x_t: Tensor, model_output: Tensor, t: Tensor, coef_a: Tensor, coef_b: Tensor, clip: bool,
                scale: Optional[Tensor], shift: Optional[Tensor], out_dtype: torch.dtype, backend: str) -> Tensor:
    """out = clip(coef_a[t] * x_t + coef_b[t] * model_output) * scale[c] + shift[c]; model_output has x_t's shape."""
    return _tweedie_impl(x_t, model_output, t, coef_a, coef_b, clip, scale, shift, out_dtype, backend)


@_tweedie_op.register_fake
def _(x_t, model_output, t, coef_a, coef_b, clip, scale, shift, out_dtype, backend):
    return _empty_out(x_t, x_t.shape[0], out_dtype)


def _tweedie_setup(ctx, inputs, output):
    x_t, m, t, coef_a, coef_b, clip, scale = inputs[:7]
    ctx.save_for_backward(x_t, m, t, coef_a, coef_b, scale)
    ctx.clip = clip


def _tweedie_backward(ctx, grad):
    x_t, m, t, coef_a, coef_b, scale = ctx.saved_tensors
    cd = coef_a.dtype
    a, b = _per_sample(coef_a, t, x_t.dim()), _per_sample(coef_b, t, x_t.dim())
    g = grad.to(cd)
    if scale is not None:
        g = g * scale.reshape(1, -1, *([1] * (x_t.dim() - 2)))
    if ctx.clip:  # zero where the clamp is active, bounds and NaN included (as the reference)
        ax = torch.where(a == 0, 0, a * x_t.to(cd))  # x0 prediction ignores x_t, as the kernels do
        y = ax + b * m.to(cd)
        g = g * ((y > -1) & (y < 1)).to(cd)
    return (a * g).to(x_t.dtype), (b * g).to(m.dtype), None, None, None, None, None, None, None, None


_tweedie_op.register_autograd(_tweedie_backward, setup_context=_tweedie_setup)


# ----------------------------------------------------------------------------------------- public API
def philox_normal(shape: Sequence[int], seed=None, offset=0, device=None, dtype=torch.float32,
                  backend: str = "auto") -> Tensor:
    """The exact standard normals the fused ops use for (seed, offset): element i is lane i % 4 of Philox
    counter offset + i // 4 (Triton's tl.randn4x convention). seed=None draws from torch's generator."""
    device = torch.device(device or "cpu")
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, float64, got {dtype}")
    if _is_int(shape):
        shape = (shape,)
    if not all(_is_int(s) for s in shape):
        raise TypeError(f"shape must be integers, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    seed_t, off_t = _as_seed("seed", seed, device), _as_seed("offset", offset, device)
    name = resolve_backend(backend, device)
    if name == "reference":
        return reference.philox_normal(shape, seed_t, off_t, device, dtype)
    if _pooled(4 * math.prod(shape), device):
        out = _poisoned(_from_pool(torch.empty(shape, dtype=torch.float32, device="meta")))
    else:
        out = _poisoned(torch.empty(shape, dtype=torch.float32, device=device))
    if out.numel():
        _launch(device, name, _BACKENDS[name].philox_normal_out, seed_t, off_t, out)
    return out.to(dtype)


def forward_noise(x0: Tensor, t, schedule: NoiseSchedule, seed=None, offset=0, out_dtype=None,
                  backend: str = "auto") -> Tensor:
    """x_t = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * philox_normal(x0.shape, seed, offset), per sample.

    x0: [B, ...] float16/bfloat16/float32/float64 (any strides; channels_last is kept). t: int, 0-d or [B]
    integer tensor in [0, T). seed: int in [0, 2**64), int tensor, or None (drawn from torch's generator).
    offset: Philox counter offset (one counter = 4 elements)."""
    _check_tensor("x0", x0)
    schedule = _check_schedule(schedule)
    out_dtype = _check_out_dtype(out_dtype, x0.dtype)
    t = _as_times("t", t, x0.shape[0], x0.device, schedule.num_timesteps)
    seed_t, off_t = _as_seed("seed", seed, x0.device), _as_seed("offset", offset, x0.device)
    name = _backend_for(resolve_backend(backend, x0.device))
    if name == "reference":
        return reference.forward_noise(x0, t, schedule, seed_t, off_t, out_dtype)
    cd = _compute_dtype(x0.dtype)
    a, b = schedule.table("sqrt_alphas_cumprod", x0.device, cd), schedule.table("sqrt_one_minus_alphas_cumprod", x0.device, cd)

    op = _noise_impl if _direct(x0) else _noise_op

    def run(n):
        return op(x0, t.reshape(1, -1), a, b, seed_t, off_t, out_dtype, n)

    return run((backend == "auto" and _auto_pick("forward_noise", x0, run)) or name)


def forward_noise_multi(x0: Tensor, times, schedule: NoiseSchedule, seed=None, offset=0, out_dtype=None,
                        backend: str = "auto") -> Tensor:
    """[K*B, ...]: rows k*B .. k*B + B - 1 are x0 noised to times[k], all from one read of x0. The noise is
    that of forward_noise on x0 repeated K times (the DiffAug-Ensemble expansion)."""
    _check_tensor("x0", x0)
    schedule = _check_schedule(schedule)
    out_dtype = _check_out_dtype(out_dtype, x0.dtype)
    if isinstance(times, range):
        times = list(times)
    if _is_int(times):
        times = [times]
    if isinstance(times, Tensor) and times.dim() != 1:
        raise ValueError(f"times must be a 1-D sequence of integers, got shape {tuple(times.shape)}")
    K = len(times)
    if K == 0:
        raise ValueError("times must not be empty")
    times = _as_times("times", times, K, x0.device, schedule.num_timesteps)
    seed_t, off_t = _as_seed("seed", seed, x0.device), _as_seed("offset", offset, x0.device)
    name = _backend_for(resolve_backend(backend, x0.device))
    if name == "reference":
        return reference.forward_noise_multi(x0, times, schedule, seed_t, off_t, out_dtype)
    cd = _compute_dtype(x0.dtype)
    t = times.reshape(K, 1).expand(K, x0.shape[0])
    a, b = schedule.table("sqrt_alphas_cumprod", x0.device, cd), schedule.table("sqrt_one_minus_alphas_cumprod", x0.device, cd)

    op = _noise_impl if _direct(x0) else _noise_op

    def run(n):
        return op(x0, t, a, b, seed_t, off_t, out_dtype, n)

    return run((backend == "auto" and _auto_pick(f"forward_noise_multi{K}", x0, run)) or name)


def _static_float(v) -> float:
    """float(v) as a Python constant even under torch.compile(dynamic=True), where Dynamo makes a float read
    from a global (dk.IMAGENET_NORM) symbolic, and math.isfinite or a cache key of it would not trace. The
    round trip through float.hex specialises it (Dynamo guards on the value); the value is unchanged."""
    return float.fromhex(float(v).hex())


def _norm_affine(normalize, C: int, device: torch.device, dtype: torch.dtype):
    """(x + 1) / 2 then (x - mean) / std, folded to x * scale + shift, per channel."""
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise TypeError(f"normalize must be (mean, std), two sequences of {C} numbers, got {normalize!r}") from None
    if torch.compiler.is_compiling() and (isinstance(mean, Tensor) or isinstance(std, Tensor)):
        # the values become per-channel constants, read on the host: a graph cannot read a tensor's values
        raise TypeError("inside torch.compile, give normalize's mean and std as sequences of Python floats, "
                        "not tensors (e.g. normalize=(mean.tolist(), std.tolist()) outside the compiled code)")
    try:
        mean = [_static_float(v) for v in (mean.tolist() if isinstance(mean, Tensor) else mean)]
        std = [_static_float(v) for v in (std.tolist() if isinstance(std, Tensor) else std)]
    except (TypeError, ValueError):
        raise TypeError(f"normalize must be (mean, std), two sequences of {C} numbers, got {normalize!r}") from None
    if len(mean) != C or len(std) != C:
        raise ValueError(f"normalize needs {C} means and stds (one per channel), got {len(mean)} and {len(std)}")
    if any(s == 0 or not math.isfinite(s) for s in std):
        raise ValueError(f"normalize std must be finite and non-zero, got {std}")
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"normalize mean must be finite, got {mean}")
    args, device = (tuple(mean), tuple(std)), torch.device(device)
    return (_constants.device_constant("norm_scale", args, device, dtype),
            _constants.device_constant("norm_shift", args, device, dtype))


def _norm_values(mean: tuple, std: tuple, shift: bool) -> Tensor:
    """(x + 1) / 2 then (x - mean) / std is x * scale + shift with scale = 0.5 / std, shift = (0.5 - mean) / std."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return (0.5 - m) / s if shift else 0.5 / s


_constants.register("norm_scale", lambda mean, std: _norm_values(mean, std, False))
_constants.register("norm_shift", lambda mean, std: _norm_values(mean, std, True))


def tweedie(x_t: Tensor, model_output: Tensor, t, schedule: NoiseSchedule, prediction: str = "eps",
            clip: bool = True, normalize=None, out_dtype=None, backend: str = "auto") -> Tensor:
    """x0_hat, the one-step (Tweedie) denoised estimate, from x_t [B, C, ...] and the model's output.

    prediction: "eps" | "v" | "x0" | "score". model_output may carry 2C channels (learned sigma): only the
    first C are read, without a copy. clip clamps x0_hat to [-1, 1]. normalize=(mean, std) also applies
    (x + 1) / 2 then (x - mean) / std per channel (dk.IMAGENET_NORM), ready for a classifier."""
    _check_tensor("x_t", x_t, min_dim=2)
    _check_tensor("model_output", model_output, min_dim=2)
    schedule = _check_schedule(schedule)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    B, C = x_t.shape[:2]
    if model_output.device != x_t.device:
        raise ValueError(f"model_output is on {model_output.device} but x_t is on {x_t.device}")
    if (model_output.dim() != x_t.dim() or model_output.shape[0] != B or model_output.shape[2:] != x_t.shape[2:]
            or model_output.shape[1] not in (C, 2 * C)):
        raise ValueError(f"model_output must have shape [B, C or 2C, ...] = [{B}, {C} or {2 * C}, "
                         f"{', '.join(map(str, x_t.shape[2:]))}] to match x_t, got {tuple(model_output.shape)}")
    out_dtype = _check_out_dtype(out_dtype, x_t.dtype)
    t = _as_times("t", t, B, x_t.device, schedule.num_timesteps)
    cd = _compute_dtype(x_t.dtype, model_output.dtype)
    norm = _norm_affine(normalize, C, x_t.device, cd) if normalize is not None else (None, None)
    name = _backend_for(resolve_backend(backend, x_t.device))
    if name == "reference":
        return reference.tweedie(x_t, model_output, t, schedule, prediction, clip, normalize, out_dtype)
    m = model_output[:, :C]  # a view: the learned-sigma half is never read
    io = torch.promote_types(x_t.dtype, m.dtype)  # mixed precision: widen the narrower input (exact)
    a, b = schedule.x0_coefficients(prediction, x_t.device, cd)
    x_io, m_io = x_t.to(io), m.to(io)

    op = _tweedie_impl if _direct(x_io, m_io) else _tweedie_op

    def run(n):
        return op(x_io, m_io, t, a, b, clip, norm[0], norm[1], out_dtype, n)

    return run((backend == "auto" and _auto_pick("tweedie", x_t, run)) or name)


def _philox_uint32(n_counters: int, seed: int, offset: int = 0, backend: str = "auto") -> Tensor:
    """[n, 4] int64 raw Philox words (for tests of the stream itself), from the reference or the CPU kernels (the
    only ones that expose them; the others' words show in their normals)."""
    device = torch.device("cpu")
    name = resolve_backend(backend, device)
    if name == "reference":
        return reference.philox_uint32(n_counters, _as_seed("seed", seed, device), _as_seed("offset", offset, device))
    if name != "cpu":
        raise ValueError(f"raw Philox words come from the 'reference' and 'cpu' backends, not {name!r}")
    out = torch.empty(n_counters, 4, dtype=torch.int32)
    torch.ops.diffaug_kernels_C.philox_uint32_out(_as_seed("seed", seed, device), _as_seed("offset", offset, device), out)
    return out.to(torch.int64) & 0xFFFFFFFF
