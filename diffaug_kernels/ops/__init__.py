"""The fused ops, one module each (forward_noise.py, tweedie.py, reverse_step.py, philox.py), over a shared reference
(reference.py), argument checks (checks.py), backend dispatch (dispatch.py), Triton kernels and the compiled
extension (csrc/)."""
from . import reference
from .dispatch import BACKENDS, auto_choice, available_backends, resolve_backend, usable
from .forward_noise import forward_noise, forward_noise_multi
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
    "philox_normal",
    "philox_uint32",
    "reference",
    "resolve_backend",
    "reverse_step",
    "tweedie",
    "usable",
]
