"""philox_normal: the exact standard normals the fused ops draw in-kernel, and the raw Philox4x32-10 words."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .checks import DTYPES, as_seed, is_int
from .dispatch import from_pool, kernels, launch, poisoned, pooled, resolve_backend


def philox_normal(shape: Sequence[int], seed=None, offset=0, device=None, dtype=torch.float32,
                  backend: str = "auto") -> Tensor:
    """The exact standard normals the fused ops use for (seed, offset): element i is lane i % 4 of Philox
    counter offset + i // 4 (Triton's tl.randn4x convention). seed=None draws from torch's generator."""
    device = torch.device(device or "cpu")
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, float64, got {dtype}")
    if is_int(shape):
        shape = (shape,)
    if not all(is_int(s) for s in shape):
        raise TypeError(f"shape must be integers, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    seed_t, off_t = as_seed("seed", seed, device), as_seed("offset", offset, device)
    name = resolve_backend(backend, device)
    if name == "reference":
        return reference.philox_normal(shape, seed_t, off_t, device, dtype)
    if pooled(4 * math.prod(shape), device):
        out = poisoned(from_pool(torch.empty(shape, dtype=torch.float32, device="meta")))
    else:
        out = poisoned(torch.empty(shape, dtype=torch.float32, device=device))
    if out.numel():
        launch(device, name, kernels(name).philox_normal_out, seed_t, off_t, out)
    return out.to(dtype)


def philox_uint32(n_counters: int, seed: int, offset: int = 0, backend: str = "auto") -> Tensor:
    """[n, 4] int64 raw Philox words (for tests of the stream itself), from the reference or the CPU kernels (the
    only ones that expose them; the others' words show in their normals)."""
    device = torch.device("cpu")
    name = resolve_backend(backend, device)
    if name == "reference":
        return reference.philox_uint32(n_counters, as_seed("seed", seed, device), as_seed("offset", offset, device))
    if name != "cpu":
        raise ValueError(f"raw Philox words come from the 'reference' and 'cpu' backends, not {name!r}")
    out = torch.empty(n_counters, 4, dtype=torch.int32)
    torch.ops.diffaug_kernels_C.philox_uint32_out(as_seed("seed", seed, device), as_seed("offset", offset, device), out)
    return out.to(torch.int64) & 0xFFFFFFFF
