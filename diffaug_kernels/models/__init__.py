"""Models: the ADM UNet of openai/guided-diffusion (unet.py, state_dict-compatible with its checkpoints), the
classifier of the recipes (classifier.py) and the score-model files and their loaders (score.py)."""
from . import classifier, score
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
    "classifier",
    "create_adm_unet",
    "default_channel_mult",
    "load_guided_diffusion",
    "score",
    "timestep_embedding",
]
