"""diffaug_kernels: fused kernels for DiffAug (diffuse-and-denoise augmentation), checked against PyTorch."""
from . import data, dda, models, ood, pretrained, reference
from .augment import DiffAug
from .ensemble import diffaug_ensemble
from .pretrained import load_default_score_model
from .ops import (
    IMAGENET_NORM,
    available_backends,
    forward_noise,
    forward_noise_multi,
    philox_normal,
    tweedie,
)
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = [
    "DiffAug",
    "IMAGENET_NORM",
    "NoiseSchedule",
    "available_backends",
    "data",
    "dda",
    "diffaug_ensemble",
    "models",
    "ood",
    "forward_noise",
    "load_default_score_model",
    "pretrained",
    "forward_noise_multi",
    "philox_normal",
    "reference",
    "tweedie",
]
