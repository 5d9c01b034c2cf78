"""Argument checks shared by the ops: tensors, dtypes, schedules, times, seeds. Errors name the argument."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from . import reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:  # sparse, mkldnn: the kernels read strided memory
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; convert it with "
                        f".to_dense() first")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.dim() < min_dim:
        shape = "[B, C, ...]" if min_dim >= 2 else "[B, ...]"
        raise ValueError(f"{name} must have shape {shape} (at least {min_dim} dims), got {tuple(x.shape)}")


def check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in DTYPES:
        raise TypeError(f"out_dtype must be one of float16, bfloat16, float32, float64 or None, got {out_dtype}")
    return out_dtype


def check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_t_values(name: str, t: Tensor, T: int) -> None:
    """Range check of t on the host; skipped while tracing. On CUDA, checking here would sync with the host (or
    cost four more kernel launches per call as an async assertion), so each backend checks on the device: the
    CUDA kernels assert; the Triton wrapper and the reference, whose gathers cannot, use
    reference.assert_t_on_device."""
    if not (torch.compiler.is_compiling() or t.is_cuda or t.is_meta):  # a meta tensor has no values to check
        reference.check_t_on_host(name, t, T)


def as_times(name: str, t, batch: int, device: torch.device, T: int) -> Tensor:
    """t as an int64 tensor of shape [batch] on device (an int or 0-d tensor is broadcast)."""
    if is_int(t):
        if not 0 <= int(t) < T:
            raise ValueError(f"{name} must lie in [0, {T}) for this schedule, got {int(t)}")
        return torch.full((batch,), int(t), dtype=torch.int64, device=device)
    if isinstance(t, (list, tuple)):
        if not all(is_int(v) for v in t):
            raise TypeError(f"{name} must hold integers, got {t!r}")
        if t and not 0 <= min(t) <= max(t) < T:  # checked here, where the values are (not on a meta device)
            raise ValueError(f"{name} must lie in [0, {T}) for this schedule, got values in [{min(t)}, {max(t)}]")
        no_host_copy_while_capturing(name, device)
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
    check_t_values(name, t, T)
    return t


def as_seed(name: str, v, device: torch.device) -> Tensor:
    """seed / offset as a 0-d int64 tensor (its 64 bits); None draws a seed from torch's default generator."""
    if v is None:
        if name != "seed":
            raise TypeError(f"{name} must be an integer, got None")
        return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device)
    if is_int(v):
        # one rule for ints and tensors: a seed or offset is 64 bits, and an integer names v mod 2**64, so the int
        # -1, the tensor -1 (its int64 bits) and 2**64 - 1 are one value
        v = int(v)
        if not -2**63 <= v < 2**64:
            raise ValueError(f"{name} must lie in [-2**63, 2**64) (64 bits; a negative value is its two's complement, "
                             f"as in an int64 tensor), got {v}")
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
            no_host_copy_while_capturing(name, device)
        return v.reshape(()).to(device=device, dtype=torch.int64)
    raise TypeError(f"{name} must be an integer (or None for a fresh seed), got {type(v).__name__}: {v!r}")


def no_host_copy_while_capturing(name: str, device: torch.device) -> None:
    """A host-to-device copy cannot be captured in a CUDA graph (and would replay stale values): say which
    argument to move, instead of CUDA's capture error."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{name} would be copied from the host inside a CUDA-graph capture; pass it as a tensor "
                           f"on {device} (made before the capture), or as a Python int where one is allowed")


