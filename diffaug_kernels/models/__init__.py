"""Models: the ADM UNet of openai/guided-diffusion (unet.py, state_dict-compatible with its checkpoints),
openai/improved-diffusion's UNet (improved_diffusion.py), diffusers UNets and schedulers as score models
(diffusers.py), the classifier of the recipes (classifier.py), guidance classifiers (guidance.py) and the
score-model files and their loaders (score.py); FP8 3x3 convolutions for a frozen score model (fp8.py)."""
from . import classifier, fp8, score
from .diffusers import DiffusersScoreModel, from_diffusers, load_diffusers
from .fp8 import FP8Conv2d, to_fp8
from .guidance import (
    CLASSIFIER_CONFIGS,
    ClassifierConfig,
    DAClassifier,
    EncoderUNet,
    create_classifier,
    export_guidance_classifier,
    load_default_guidance_classifier,
    load_guidance_classifier,
    load_guided_classifier,
)
from .improved_diffusion import (
    IMPROVED_DIFFUSION_CONFIGS,
    ImprovedDiffusionConfig,
    ImprovedDiffusionUNet,
    create_improved_diffusion,
    load_improved_diffusion,
)
from .unet import (
    ADM_CONFIGS,
    ATTENTION_BACKENDS,
    ADMConfig,
    ADMUNet,
    create_adm_unet,
    default_channel_mult,
    load_guided_diffusion,
    timestep_embedding,
)

__all__ = [
    "ADM_CONFIGS",
    "ATTENTION_BACKENDS",
    "ADMConfig",
    "ADMUNet",
    "CLASSIFIER_CONFIGS",
    "ClassifierConfig",
    "DAClassifier",
    "DiffusersScoreModel",
    "EncoderUNet",
    "FP8Conv2d",
    "IMPROVED_DIFFUSION_CONFIGS",
    "ImprovedDiffusionConfig",
    "ImprovedDiffusionUNet",
    "classifier",
    "create_adm_unet",
    "create_classifier",
    "export_guidance_classifier",
    "create_improved_diffusion",
    "default_channel_mult",
    "fp8",
    "from_diffusers",
    "load_diffusers",
    "load_default_guidance_classifier",
    "load_guidance_classifier",
    "load_guided_classifier",
    "load_guided_diffusion",
    "load_improved_diffusion",
    "score",
    "timestep_embedding",
    "to_fp8",
]
