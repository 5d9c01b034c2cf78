"""Loads the compiled extension (diffaug_kernels._C) once as `C`; the package works without it, on the reference."""
from __future__ import annotations

import os
import warnings

import torch

C = None
ERROR: str | None = None

if os.environ.get("DIFFAUG_DISABLE_EXT") == "1":
    ERROR = "disabled by DIFFAUG_DISABLE_EXT=1"
else:
    try:
        from .. import _C as C  # importing registers torch.ops.diffaug_kernels_C
    except ImportError as e:  # not built, or built against another torch
        ERROR = f"{type(e).__name__}: {e}"

if C is None:
    warnings.warn(
        f"diffaug_kernels: the compiled extension is not available ({ERROR}); the fused 'cpu'/'cuda' backends "
        "are off and every op runs on the 'reference' backend. Rebuild with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def stale_sources() -> bool:
    """Whether the loaded extension was built from other sources than the csrc/ beside the package (a source
    checkout; an installed wheel has none, and nothing is compared)."""
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    if C is None or not os.path.isdir(csrc):
        return False
    from .sources import sources_hash

    try:
        built = int(torch.ops.diffaug_kernels_C.sources_hash())
    except AttributeError:  # built before the fingerprint existed
        return True
    return built != sources_hash(csrc)


if stale_sources():
    warnings.warn(
        "diffaug_kernels: the compiled extension was built from other sources than csrc/ holds now (edited "
        "since, or the last rebuild failed and kept the old binary): the fused kernels may be out of date. "
        "Rebuild with `pip install --no-build-isolation -e .` (its output says why a build failed).",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(device_type: str) -> bool:
    """Whether the extension has compiled kernels for this dispatch key ('CPU' or 'CUDA')."""
    if C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("diffaug_kernels_C::forward_noise_out", device_type)
