"""Score models from Hugging Face diffusers: a UNet2DModel (or any module whose output has .sample) and its
DDPMScheduler / DDIMScheduler become (model, schedule, prediction) for dk.DiffAug, DE and certify.

diffusers indexes time as this package does: the model at index t sees alphas_cumprod[t], t = 0 being one
diffusion step, so t passes through unchanged. The schedule is dk.NoiseSchedule.from_betas(scheduler.betas)
(diffusers' float32 betas, widened to float64), and the prediction type maps epsilon -> "eps",
v_prediction -> "v", sample -> "x0". diffusers is optional: it is imported only by load_diffusers (and only
needed to make the objects from_diffusers takes).
"""
from __future__ import annotations

import json
import os
from typing import Tuple

import torch
from torch import Tensor, nn

from ..schedule import NoiseSchedule

__all__ = ["DIFFUSERS_PREDICTIONS", "DiffusersScoreModel", "from_diffusers", "load_diffusers"]

DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("loading a diffusers model needs the diffusers package: pip install diffusers") from None
    return diffusers


class DiffusersScoreModel(nn.Module):
    """model(x_t, t, **kwargs) -> unet(x_t, t, **kwargs).sample: a diffusers UNet called as the package's score
    models are. t: an int, a 0-d tensor or [B] timesteps of the scheduler's training schedule. in_channels,
    num_classes (None for an unconditional UNet) and prediction are read by the recipes."""

    def __init__(self, unet: nn.Module, prediction: str = "eps"):
        super().__init__()
        self.unet = unet
        self.prediction = prediction
        config = getattr(unet, "config", None)
        self.in_channels = _config_get(config, "in_channels")
        self.image_size = _config_get(config, "sample_size")
        self.num_classes = _config_get(config, "num_class_embeds")

    def forward(self, x: Tensor, t, **kwargs) -> Tensor:
        if not isinstance(t, Tensor):
            t = torch.tensor(t, device=x.device)
        out = self.unet(x, t, **kwargs)
        if hasattr(out, "sample"):
            return out.sample
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def _config_get(config, key):
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def from_diffusers(unet: nn.Module, scheduler) -> Tuple[DiffusersScoreModel, NoiseSchedule, str]:
    """(model, schedule, prediction) of a diffusers UNet and its DDPMScheduler / DDIMScheduler (any scheduler
    with betas and a config holding prediction_type): model(x_t, t) returns the UNet's .sample, schedule is a
    dk.NoiseSchedule of scheduler.betas, prediction "eps", "v" or "x0". Use them as
    dk.DiffAug(model, schedule, prediction=prediction). The model keeps unet's device and mode."""
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a torch module (a diffusers UNet2DModel), got {type(unet).__name__}")
    betas = getattr(scheduler, "betas", None)
    config = getattr(scheduler, "config", None)
    if not isinstance(betas, Tensor) or config is None:
        raise TypeError(f"scheduler must be a diffusers scheduler with betas and a config (DDPMScheduler, "
                        f"DDIMScheduler), got {type(scheduler).__name__}")
    kind = _config_get(config, "prediction_type") or "epsilon"
    if kind not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"the scheduler's prediction_type {kind!r} has no counterpart here; "
                         f"supported: {sorted(DIFFUSERS_PREDICTIONS)}")
    try:
        schedule = NoiseSchedule.from_betas(betas.detach().double().cpu())
    except ValueError as e:
        raise ValueError(f"the scheduler's betas make no NoiseSchedule ({e}); a zero-terminal-SNR schedule "
                         f"(rescale_betas_zero_snr, a last beta of 1) cannot be denoised from t = T - 1") from None
    schedule.name = f"diffusers:{_config_get(config, 'beta_schedule') or 'custom'}"
    prediction = DIFFUSERS_PREDICTIONS[kind]
    return DiffusersScoreModel(unet, prediction), schedule, prediction


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a diffusers config (a JSON object)")
    return value


def diffusers_parts(folder) -> Tuple[str, str, str]:
    """(unet folder, scheduler folder, scheduler file) of a local diffusers folder: a pipeline folder (unet/ and
    scheduler/ inside, as save_pretrained writes them) or a model folder (config.json) with its
    scheduler_config.json beside it or in scheduler/. A folder that is neither is a ValueError naming it."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"diffusers folder not found: {folder!r}")
    unet_dir = os.path.join(folder, "unet")
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        unet_dir = folder
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise ValueError(f"{folder} is not a diffusers folder: no unet/config.json or config.json inside")
    for sched_dir in (os.path.join(folder, "scheduler"), folder):
        sched_file = os.path.join(sched_dir, "scheduler_config.json")
        if os.path.isfile(sched_file):
            return unet_dir, sched_dir, sched_file
    raise ValueError(f"{folder} has no scheduler: no scheduler/scheduler_config.json or scheduler_config.json")


def load_diffusers(folder, device=None) -> Tuple[DiffusersScoreModel, NoiseSchedule, str]:
    """from_diffusers of a local diffusers folder (see diffusers_parts): the UNet and the scheduler its
    configs name (_class_name), read with from_pretrained(local_files_only=True), so nothing is downloaded.
    The model is returned in eval mode, on `device` if given."""
    unet_dir, sched_dir, sched_file = diffusers_parts(folder)
    diffusers = _require_diffusers()
    unet_name = _read_json(os.path.join(unet_dir, "config.json")).get("_class_name", "UNet2DModel")
    sched_name = _read_json(sched_file).get("_class_name", "DDPMScheduler")
    unet_cls, sched_cls = getattr(diffusers, str(unet_name), None), getattr(diffusers, str(sched_name), None)
    if unet_cls is None or sched_cls is None:
        missing = unet_name if unet_cls is None else sched_name
        raise ValueError(f"{folder}: the installed diffusers has no class {missing!r} (its config's _class_name)")
    try:
        unet = unet_cls.from_pretrained(unet_dir, local_files_only=True)
        scheduler = sched_cls.from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} does not load as a diffusers {unet_name} + {sched_name} "
                         f"({str(e).splitlines()[0][:300]})") from None
    model, schedule, prediction = from_diffusers(unet, scheduler)
    if device is not None:
        model = model.to(device)
    return model.eval(), schedule, prediction
