"""Score models shipped with (or exported by) the package, loaded from safetensors with their metadata.

A train-score export holds the EMA weights (float16 by default) and, in the safetensors metadata, the ADM
UNet config, the noise schedule ({"name", "T"}) and the prediction type as JSON; load_score_model rebuilds
the matching UNet, loads the weights as float32 with strict=True, and returns it in eval mode with its
NoiseSchedule. The embedded default (DEFAULT_WEIGHTS) is a digits32 eps-prediction model trained on
scikit-learn's digits by dk.train_score (the command is train_score.DEFAULT_COMMAND and the file's
"command" metadata).
"""
from __future__ import annotations

import json
import os
from typing import Tuple

import torch
from torch import nn

from .models import create_adm_unet
from .schedule import NoiseSchedule

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "digits32_eps.safetensors")


def read_metadata(path) -> dict:
    """The safetensors metadata of a score-model file, JSON fields decoded (config, schedule, train_args...)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"score-model weights not found: {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a file of another format
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {e}); for a guided-diffusion "
                         f".pt checkpoint use dk.models.load_guided_diffusion") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v) if k in ("config", "schedule", "train_args") else v
        except json.JSONDecodeError:
            raise ValueError(f"{path}: metadata field {k!r} is not valid JSON: {v[:200]!r}") from None
    return meta


def load_score_model(path, device=None, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, NoiseSchedule]:
    """(model, schedule) from a safetensors file written by `diffaug train-score --export` (or
    dk.train_score.export_safetensors): the ADM UNet its metadata describes, weights cast to `dtype`
    (float32 by default, whatever the stored dtype), on `device`, in eval mode; the schedule it was trained
    with. The model predicts eps (model.prediction says so)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    missing = [k for k in ("config", "schedule") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the metadata {missing} of a train-score export (config and schedule "
                         f"as JSON); for a guided-diffusion checkpoint use dk.models.load_guided_diffusion")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    sched_meta = meta["schedule"]
    name, T = sched_meta.get("name"), sched_meta.get("T")
    if name not in ("linear", "cosine") or isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{path}: the metadata's schedule must be {{'name': 'linear' or 'cosine', 'T': a positive "
                         f"integer}}, got {sched_meta!r}")
    schedule = getattr(NoiseSchedule, name)(int(T))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(os.fspath(path)).items()}
    with torch.device("meta"):
        model = create_adm_unet(**cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: the weights do not match the UNet its metadata describes ({cfg}).\n{e}") from None
    model.prediction = meta.get("prediction", "eps")
    if device is not None:
        model = model.to(device)
    return model.eval(), schedule


def load_default_score_model(device=None, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, NoiseSchedule]:
    """The embedded default score model: (digits32 ADM UNet predicting eps, its NoiseSchedule), trained on
    scikit-learn's digits (1 channel, 32x32, images in [-1, 1]). Use it as dk.DiffAug(model, schedule)."""
    if not os.path.isfile(DEFAULT_WEIGHTS):
        from .train_score import DEFAULT_COMMAND

        raise FileNotFoundError(f"the embedded score model {DEFAULT_WEIGHTS!r} is missing (a package installed "
                                f"without its package data?); re-make it with:\n  {DEFAULT_COMMAND}")
    return load_score_model(DEFAULT_WEIGHTS, device=device, dtype=dtype)
