"""diffaug_kernels: fused kernels for DiffAug (diffuse-and-denoise augmentation), checked against PyTorch."""
from . import certify, data, dda, metrics, models, ood, pag, sampling
from .augment import DiffAug
from .ensemble import diffaug_ensemble
from .models import score as pretrained
from .models.score import load_default_score_model
from .ops import (
    IMAGENET_NORM,
    available_backends,
    forward_noise,
    forward_noise_multi,
    group_norm_silu,
    philox_normal,
    reference,
    reverse_step,
    tweedie,
)
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = [
    "DiffAug",
    "IMAGENET_NORM",
    "NoiseSchedule",
    "available_backends",
    "certify",
    "data",
    "dda",
    "diffaug_ensemble",
    "forward_noise",
    "forward_noise_multi",
    "group_norm_silu",
    "load_default_score_model",
    "metrics",
    "models",
    "ood",
    "pag",
    "philox_normal",
    "pretrained",
    "reference",
    "reverse_step",
    "sampling",
    "tweedie",
]
