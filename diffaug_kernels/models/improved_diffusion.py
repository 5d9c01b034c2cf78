"""openai/improved-diffusion's UNet ("Improved Denoising Diffusion Probabilistic Models"), state_dict-compatible,
with its diffusion's timestep convention inside.

improved-diffusion's UNetModel is guided-diffusion's ADM UNet (unet.py) with a subset of the flags:
- no resblock_updown (plain Upsample / Downsample blocks), no num_head_channels, no fp16 torso;
- attention heads split before q/k/v, guided-diffusion's QKVAttentionLegacy order (use_new_attention_order=False);
  its scaling of q and k by d ** -1/4 each is the softmax(q k^T / sqrt(d)) of scaled_dot_product_attention;
- create_model's defaults differ: num_heads=4, attention_resolutions "16,8", use_scale_shift_norm=True.
Its keys and numerics are those of ADMUNet built with these flags, so the network is an ADMUNet.

What the network does not hold, improved-diffusion's GaussianDiffusion does: with rescale_timesteps (its
default) the model sees t * 1000 / num_timesteps, not t. ImprovedDiffusionUNet does that rescaling itself, so
it takes the integer t of its own schedule (0 .. 3999 for the 4000-step models), like every score model here:
dk.DiffAug(model, config.schedule(), prediction="eps"). With learn_sigma the output has 2C channels, eps first
(dk.tweedie reads only those).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from .unet import (
    ADMConfig,
    ADMUNet,
    attention_rates,
    default_channel_mult,
    load_guided_diffusion,
    parse_channel_mult,
)

__all__ = ["IMPROVED_DIFFUSION_CONFIGS", "ImprovedDiffusionConfig", "ImprovedDiffusionUNet",
           "create_improved_diffusion", "load_improved_diffusion"]


@dataclasses.dataclass(frozen=True)
class ImprovedDiffusionConfig:
    """improved-diffusion's model and diffusion flags (script_util.model_and_diffusion_defaults' names and
    defaults) that decide the network and the timesteps it sees."""

    image_size: int
    num_channels: int
    num_res_blocks: int
    learn_sigma: bool = False
    class_cond: bool = False
    attention_resolutions: str = "16,8"
    num_heads: int = 4
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    dropout: float = 0.0
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    rescale_timesteps: bool = True
    use_checkpoint: bool = False

    def replace(self, **changes) -> "ImprovedDiffusionConfig":
        return dataclasses.replace(self, **changes)

    def adm_config(self) -> ADMConfig:
        """The ADMConfig (guided-diffusion flags) of the same network."""
        if self.image_size not in (32, 64, 256):  # improved-diffusion's create_model knows these three
            raise ValueError(f"improved-diffusion's UNet has image_size 32, 64 or 256, got {self.image_size}")
        return ADMConfig(image_size=self.image_size, num_channels=self.num_channels,
                         num_res_blocks=self.num_res_blocks, channel_mult=default_channel_mult(self.image_size),
                         learn_sigma=self.learn_sigma, class_cond=self.class_cond,
                         use_checkpoint=self.use_checkpoint, attention_resolutions=self.attention_resolutions,
                         num_heads=self.num_heads, num_heads_upsample=self.num_heads_upsample,
                         use_scale_shift_norm=self.use_scale_shift_norm, dropout=self.dropout)

    def schedule(self) -> NoiseSchedule:
        """The noise schedule the model was trained with (improved-diffusion's get_named_beta_schedule)."""
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"noise_schedule must be 'linear' or 'cosine', got {self.noise_schedule!r}")
        return getattr(NoiseSchedule, self.noise_schedule)(self.diffusion_steps)

    @property
    def timestep_scale(self) -> float:
        """What t is multiplied by before the network sees it."""
        return 1000.0 / self.diffusion_steps if self.rescale_timesteps else 1.0


IMPROVED_DIFFUSION_CONFIGS: dict[str, ImprovedDiffusionConfig] = {
    # README "Unconditional CIFAR-10 with our L_hybrid objective and cosine noise schedule"
    # (cifar10_uncond_50M_500K.pt; its L_vlb twin cifar10_uncond_vlb_50M_500K.pt has the same network).
    "cifar10_uncond": ImprovedDiffusionConfig(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True,
                                              dropout=0.3, diffusion_steps=4000, noise_schedule="cosine"),
    # "Unconditional ImageNet-64 with our L_hybrid objective and cosine noise schedule"
    # (imagenet64_uncond_100M_1500K.pt).
    "imagenet64_uncond": ImprovedDiffusionConfig(image_size=64, num_channels=128, num_res_blocks=3,
                                                 learn_sigma=True, diffusion_steps=4000, noise_schedule="cosine"),
}


class ImprovedDiffusionUNet(ADMUNet):
    """improved-diffusion's UNetModel (the ADM UNet with its flags) taking the integer t of its own schedule:
    forward(x, t, y=None) runs the network at t * timestep_scale (1000 / diffusion_steps with
    rescale_timesteps, in float32 as improved-diffusion computes it). state_dict: improved-diffusion's keys."""

    timestep_scale: float = 1.0
    prediction: str = "eps"

    def forward(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        if self.timestep_scale != 1.0:
            if not isinstance(t, Tensor):
                t = float(t) * self.timestep_scale
            elif t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"t must be an integer or floating tensor, got {t.dtype}")
            else:
                t = t.float() * self.timestep_scale
        return super().forward(x, t, y)


def create_improved_diffusion(config: Union[str, ImprovedDiffusionConfig], in_channels: int = 3,
                              **overrides) -> ImprovedDiffusionUNet:
    """improved-diffusion's script_util.create_model for a config (a name in IMPROVED_DIFFUSION_CONFIGS or an
    ImprovedDiffusionConfig; overrides replace its fields), randomly initialised as that code does. The model
    keeps its flags (model.improved_config, whose schedule() is its noise schedule) and predicts eps."""
    config = _config(config, overrides)
    adm = config.adm_config()
    model = ImprovedDiffusionUNet(
        image_size=adm.image_size, in_channels=in_channels, model_channels=adm.num_channels,
        out_channels=in_channels * (2 if adm.learn_sigma else 1), num_res_blocks=adm.num_res_blocks,
        attention_resolutions=attention_rates(config.attention_resolutions, config.image_size),
        dropout=adm.dropout, channel_mult=parse_channel_mult(adm.channel_mult, adm.image_size),
        num_classes=1000 if adm.class_cond else None, use_checkpoint=adm.use_checkpoint,
        num_heads=adm.num_heads, num_heads_upsample=adm.num_heads_upsample,
        use_scale_shift_norm=adm.use_scale_shift_norm)
    model.config = adm.replace(in_channels=in_channels)
    model.improved_config = config
    model.timestep_scale = config.timestep_scale
    return model


def load_improved_diffusion(path, config: Union[str, ImprovedDiffusionConfig] = "cifar10_uncond", *, device=None,
                            **overrides) -> ImprovedDiffusionUNet:
    """improved-diffusion's network with a released checkpoint's weights (a torch.save'd state_dict, read with
    weights_only=True, or .safetensors), loaded strictly into a model built on the meta device; in eval mode.
    model(x_t, t) takes t in [0, diffusion_steps); its schedule is model.improved_config.schedule() (cosine(4000)
    for cifar10_uncond) and it predicts eps (model.prediction)."""
    path = os.fspath(path)
    config = _config(config, overrides)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"improved-diffusion checkpoint not found: {path!r}")
    net = load_guided_diffusion(path, config.adm_config(), device=device)  # the same keys: read, checked, loaded
    with torch.device("meta"):
        model = create_improved_diffusion(config)
    model.load_state_dict(net.state_dict(), strict=True, assign=True)  # the loaded tensors themselves, no copy
    return model.eval()


def _config(config, overrides: dict) -> ImprovedDiffusionConfig:
    if isinstance(config, str):
        if config not in IMPROVED_DIFFUSION_CONFIGS:
            raise ValueError(f"unknown improved-diffusion config {config!r}; "
                             f"known: {sorted(IMPROVED_DIFFUSION_CONFIGS)}")
        config = IMPROVED_DIFFUSION_CONFIGS[config]
    if not isinstance(config, ImprovedDiffusionConfig):
        raise TypeError(f"config must be a name in IMPROVED_DIFFUSION_CONFIGS or an ImprovedDiffusionConfig, "
                        f"got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(ImprovedDiffusionConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown improved-diffusion flags {unknown}; known: {sorted(fields)}")
    return config.replace(**overrides) if overrides else config
