"""Score models: the ADM UNet of openai/guided-diffusion, state_dict-compatible with its checkpoints."""
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
    "create_adm_unet",
    "default_channel_mult",
    "load_guided_diffusion",
    "timestep_embedding",
]
