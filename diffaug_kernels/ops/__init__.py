"""The fused ops, one module each (forward_noise.py, tweedie.py, reverse_step.py, philox.py, group_norm_silu.py),
over a shared reference (reference.py), argument checks (checks.py), backend dispatch (dispatch.py), Triton kernels
and the compiled extension (csrc/)."""
from . import reference
from .dispatch import BACKENDS, auto_choice, available_backends, resolve_backend, usable
from .forward_noise import forward_noise, forward_noise_multi
from .group_norm_silu import group_norm_silu
from .philox import philox_normal, philox_uint32
from .reverse_step import reverse_step
from .tweedie import IMAGENET_NORM, tweedie

__all__ = [
    "BACKENDS",
    "IMAGENET_NORM",
    "auto_choice",
    "available_backends",
    "forward_noise",
    "forward_noise_multi",
    "group_norm_silu",
    "philox_normal",
    "philox_uint32",
    "reference",
    "resolve_backend",
    "reverse_step",
    "tweedie",
    "usable",
]
