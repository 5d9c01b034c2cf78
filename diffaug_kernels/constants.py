"""Small float tensors the ops read (schedule tables, normalisation constants): one cached copy per device
and dtype, never made inside a compiled graph.

device_constant is what makes that hold under torch.compile: _attr is a constant to Dynamo, so inside a
compiled region its first call runs eagerly at trace time and the graph then reads the stored tensor as an
input. A tensor made inside the graph would instead be a graph output, and under mode="reduce-overhead" it
would live in the CUDA-graph pool and be overwritten by the next replay while the cache still held it.
"""
from __future__ import annotations

from typing import Callable

import torch

_BUILDERS: dict = {}  # kind -> build(*args): the float64 values (numpy array or tensor)
_KEYS: dict = {}  # (kind, args, device, dtype) -> attribute of STORE


class Store:
    pass


STORE = Store()


def register(kind: str, build: Callable) -> None:
    _BUILDERS[kind] = build


@torch.compiler.assume_constant_result
def _attr(kind: str, args: tuple, device: torch.device, dtype: torch.dtype) -> str:
    key = (kind, args, device, dtype)
    attr = _KEYS.get(key)
    if attr is None:
        # a plain tensor whatever the caller's context: made under inference_mode it could never be saved for a
        # later backward, and inside a torch.func transform it would be cached as that transform's wrapper
        with torch.inference_mode(False), torch.no_grad(), torch._C._DisableFuncTorch():
            value = torch.as_tensor(_BUILDERS[kind](*args)).to(device=device, dtype=dtype)
        attr = _KEYS[key] = f"c{len(_KEYS)}"
        setattr(STORE, attr, value)
    return attr


def device_constant(kind: str, args: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The cached device copy of _BUILDERS[kind](*args); args must be hashable Python constants."""
    return getattr(STORE, _attr(kind, args, device, dtype))
