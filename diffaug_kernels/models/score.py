"""Score-model files, one loader per kind: the package's safetensors export (written by export_safetensors,
read by load_score_model), the embedded default digits model (load_default_score_model), guided-diffusion
checkpoints (dk.models.load_guided_diffusion), improved-diffusion checkpoints (dk.models.load_improved_diffusion),
local diffusers folders (dk.models.load_diffusers), and resolve_score_model, which turns a recipe's --score-model
spec (default | random | an export | a guided-diffusion or improved-diffusion checkpoint | a diffusers folder)
into one of them.

A train-score export holds the EMA weights (float16 by default) and, in the safetensors metadata, the ADM
UNet config, the noise schedule ({"name", "T"}) and the prediction type as JSON; load_score_model rebuilds
the matching UNet, loads the weights as float32 with strict=True, and returns it in eval mode with its
NoiseSchedule. The embedded default (DEFAULT_WEIGHTS) is a digits32 eps-prediction model trained on
scikit-learn's digits by `diffaug train-score` (DEFAULT_COMMAND, also in the file's "command" metadata).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..schedule import PREDICTIONS, NoiseSchedule
from ..utils import UsageError, is_torch_save_file, unreadable
from .diffusers import load_diffusers
from .improved_diffusion import (
    IMPROVED_DIFFUSION_CONFIGS,
    ImprovedDiffusionConfig,
    create_improved_diffusion,
    load_improved_diffusion,
)
from .unet import ADM_CONFIGS, ADMConfig, create_adm_unet, load_guided_diffusion, state_mismatch

# The command that made the shipped weights/digits32_eps.safetensors (2-core CPU: 990 s measured on a shared
# machine, ~0.8 s/step when quiet; final loss 0.0112, 3.9 MB in float16).
DEFAULT_COMMAND = ("python -m diffaug_kernels train-score --data digits --config digits32 --schedule linear --T 1000 "
                   "--steps 800 --batch-size 64 --lr 0.001 --lr-warmup 100 --ema 0.999 --grad-clip 1.0 --seed 0 "
                   "--out runs/digits32 --export diffaug_kernels/weights/digits32_eps.safetensors --bf16")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
METADATA_FORMAT = "diffaug_kernels.score_model.v1"
MAX_T = 100_000  # the longest schedule a score-model file may ask for (improved-diffusion's longest: 4000)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WEIGHTS = os.path.join(PACKAGE_DIR, "weights", "digits32_eps.safetensors")


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
    export_safetensors): the ADM UNet its metadata describes, weights cast to `dtype`
    (float32 by default, whatever the stored dtype), on `device`, in eval mode; the schedule it was trained
    with. The model predicts eps (model.prediction says so)."""
    meta = read_metadata(path)
    raw = check_sha256(path, meta)
    missing = [k for k in ("config", "schedule") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the metadata {missing} of a train-score export (config and schedule "
                         f"as JSON); for a guided-diffusion checkpoint use dk.models.load_guided_diffusion")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{path}: the metadata's config must be a JSON object of ADM UNet flags, got "
                         f"{str(meta['config'])[:200]}")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    sched_meta = meta["schedule"]
    name, T = (sched_meta.get("name"), sched_meta.get("T")) if isinstance(sched_meta, dict) else (None, None)
    if name not in ("linear", "cosine") or isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        raise ValueError(f"{path}: the metadata's schedule must be {{'name': 'linear' or 'cosine', 'T': an integer "
                         f"in [1, {MAX_T}]}}, got {str(sched_meta)[:200]}")
    try:  # on the meta device: flags asking for a huge network allocate nothing; the weights decide below
        with torch.device("meta"):
            model = create_adm_unet(**cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the metadata's config builds no ADM UNet ({str(e).splitlines()[0][:200]})") from None
    schedule = getattr(NoiseSchedule, name)(int(T))
    try:
        tensors = load_tensors(path, raw)
        del raw
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a header that lies about the data
        raise ValueError(f"{path} is damaged ({unreadable(e)})") from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        raise ValueError(f"{path}: the weights do not match the UNet its metadata describes ({cfg}): "
                         f"{state_mismatch(model, state)}") from None
    model.prediction = meta.get("prediction", "eps")
    if model.prediction not in PREDICTIONS:
        raise ValueError(f"{path}: the metadata's prediction must be one of {PREDICTIONS}, got "
                         f"{str(model.prediction)[:100]!r}")
    if device is not None:
        model = model.to(device)
    return model.eval(), schedule


def load_default_score_model(device=None, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, NoiseSchedule]:
    """The embedded default score model: (digits32 ADM UNet predicting eps, its NoiseSchedule), trained on
    scikit-learn's digits (1 channel, 32x32, images in [-1, 1]). Use it as dk.DiffAug(model, schedule)."""
    if not os.path.isfile(DEFAULT_WEIGHTS):
        raise FileNotFoundError(f"the embedded score model {DEFAULT_WEIGHTS!r} is missing (a package installed "
                                f"without its package data?); re-make it with:\n  {DEFAULT_COMMAND}")
    return load_score_model(DEFAULT_WEIGHTS, device=device, dtype=dtype)


def config_to_dict(config: ADMConfig) -> dict:
    """An ADMConfig as JSON-ready values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def export_safetensors(model_or_state, path: str, config: ADMConfig, schedule_name: str, T: int,
                       dtype: str = "float16", extra: Optional[dict] = None) -> str:
    """Writes a state_dict (or a model's) as safetensors in `dtype`, with metadata (all strings, JSON where
    structured): format, config (the ADMConfig fields), schedule ({"name", "T"}), prediction ("eps"), dtype,
    plus `extra` (e.g. the training step and command). load_score_model reads it back."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().to("cpu", EXPORT_DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    meta = {"format": METADATA_FORMAT, "config": json.dumps(config_to_dict(config)),
            "schedule": json.dumps({"name": schedule_name, "T": int(T)}), "prediction": "eps", "dtype": dtype}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save_checked(tensors, path, meta)


def check_sha256(path, meta: dict) -> Optional[bytes]:
    """Raises a one-line ValueError when a file written by save_checked no longer matches the checksum of its
    tensor data that its metadata holds (files without one pass). Returns the file's bytes it read (None when
    there is no checksum), for load_tensors to parse rather than read the file again."""
    if "sha256" not in meta:
        return None
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path} is damaged: its tensor data do not match the checksum in its metadata "
                         f"(truncated or altered since it was exported)")
    return raw


def load_tensors(path, raw: Optional[bytes]) -> dict:
    """A safetensors file's tensors: parsed from raw, its bytes already read (check_sha256), else read from path."""
    from safetensors.torch import load, load_file

    return load(raw) if raw is not None else load_file(os.fspath(path))


def save_checked(tensors: dict, path: str, meta: dict) -> str:
    """Writes tensors as safetensors with string metadata plus "sha256", the checksum of the tensor data
    (check_sha256 verifies it), atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    meta = {**meta, "sha256": "0" * 64}  # room for the checksum of the tensor data, filled in below
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "r+b") as f:
        raw = f.read()
        n = int.from_bytes(raw[:8], "little")  # the JSON header's length; the tensor data follows it
        at = raw.index(b"0" * 64, 8, 8 + n)
        f.seek(at)
        f.write(hashlib.sha256(raw[8 + n:]).hexdigest().encode())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file, not the 0600 of a temporary one
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ a recipe's --score-model spec
def _coerce_flag(key: str, value: str, flags_of=ADMConfig):
    fields = {f.name: f for f in dataclasses.fields(flags_of)}
    if key not in fields:
        what = "a guided-diffusion create_model" if flags_of is ADMConfig else "an improved-diffusion"
        raise UsageError(f"--score-flag {key}: not {what} flag; known: {sorted(fields)}")
    default = fields[key].default
    if key in ("image_size", "num_channels", "num_res_blocks"):
        default = 0
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--score-flag {key}={value}: expected true or false")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _score_flags(items: Sequence[str], flags_of=ADMConfig) -> dict:
    flags = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--score-flag must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        flags[k.strip()] = _coerce_flag(k.strip(), v.strip(), flags_of)
    return flags


def _ecosystem_score_model(spec: str, config: Optional[str], flags: Sequence[str], channels: Optional[int]):
    """(model, schedule) of an improved-diffusion config (a checkpoint, or 'random') or a local diffusers folder;
    the model's `prediction` says what it predicts."""
    if config in IMPROVED_DIFFUSION_CONFIGS:
        overrides = _score_flags(flags, ImprovedDiffusionConfig)
        try:
            if spec == "random":
                model = create_improved_diffusion(config, in_channels=channels or 3, **overrides)
            else:
                model = load_improved_diffusion(spec, config, **overrides)
            return model, model.improved_config.schedule()
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"score model ({spec}, improved-diffusion {config}): {str(e).splitlines()[0]}") from None
    if config is not None or flags:
        raise UsageError(f"--score-model {spec} is a diffusers folder, which carries its own architecture and "
                         f"scheduler: leave out --score-config and --score-flag")
    try:
        model, schedule, _ = load_diffusers(spec)
    except (ValueError, ImportError) as e:
        raise UsageError(f"score model: {e}") from None
    return model, schedule


def _default_score_config(data: str) -> Optional[str]:
    if data == "digits":
        return "digits32"
    if data.startswith("cifar10:"):
        return None
    return "imagenet256_uncond"


def _train_score_export(path: str):
    """(model, schedule) when `path` is a dk train-score export (safetensors whose metadata holds the config and
    the schedule), else None."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        meta = read_metadata(path)
    except Exception as e:  # not a safetensors file at all (SafetensorError: header too small, ...)
        raise UsageError(f"{path} is not a score-model checkpoint ({unreadable(e)})") from None
    if not ("config" in meta and "schedule" in meta):
        return None
    try:
        return load_score_model(path)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"{path} is not a usable train-score export ({str(e).splitlines()[0][:300]})") from None


def _check_score_file(path: str) -> None:
    """UsageError "PATH is not a score-model checkpoint (why)" for a file that cannot be one, from its header only
    (the weights are read once, by the loader): a .safetensors file must have a safetensors header, anything
    else must be a torch.save zip archive or a pickle (guided-diffusion's checkpoints)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a score-model checkpoint file")
    if str(path).endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError: header too small, invalid JSON...
            raise UsageError(f"{path} is not a score-model checkpoint ({unreadable(e)})") from None
        return
    if not is_torch_save_file(path):
        raise UsageError(f"{path} is not a score-model checkpoint (neither a torch.save archive nor a pickle, "
                         f"nor .safetensors)")


def resolve_score_model(spec: str, data: str, config: Optional[str] = None, flags: Sequence[str] = (),
                        channels: Optional[int] = None):
    """-> (score model in eval mode with requires_grad False, NoiseSchedule or None when the caller picks it).

    spec: 'default' -> load_default_score_model() (the package's digits model);
    'random' -> a randomly initialised ADM UNet from config/flags (tests and smoke runs only); a folder -> a
    local diffusers folder (dk.models.load_diffusers); otherwise a file: a dk train-score export (.safetensors
    with its config and schedule in the metadata) loads with load_score_model when no config or flag is given;
    with a config of IMPROVED_DIFFUSION_CONFIGS (e.g. cifar10_uncond; flags override its fields) an
    improved-diffusion checkpoint (dk.models.load_improved_diffusion, its own schedule); anything else (a
    guided-diffusion .pt state_dict or .safetensors) with dk.models.load_guided_diffusion(path, config, **flags)."""
    schedule = None
    ecosystem = config in IMPROVED_DIFFUSION_CONFIGS or (spec not in ("default", "random") and os.path.isdir(spec))
    overrides = {} if ecosystem else _score_flags(flags)
    if ecosystem:
        model, schedule = _ecosystem_score_model(spec, config, flags, channels)
    elif spec == "default":
        if config is not None or overrides:
            raise UsageError("--score-config / --score-flag describe a checkpoint given with --score-model PATH "
                             "(or 'random'); the default score model carries its own architecture")
        model, schedule = load_default_score_model()  # a missing weights file: FileNotFoundError naming it
    elif spec != "random" and config is None and not overrides and (export := _train_score_export(spec)):
        model, schedule = export
    else:
        if config is None:
            config = _default_score_config(data)
        if config is None and not overrides:
            raise UsageError(f"no score-model architecture is known for --data {data!r}: give --score-config "
                             f"(one of {sorted(ADM_CONFIGS)}) and/or --score-flag KEY=VALUE flags")
        if config is not None and config not in ADM_CONFIGS:
            raise UsageError(f"--score-config {config!r} is unknown; known: {sorted(ADM_CONFIGS)} (guided-diffusion), "
                             f"{sorted(IMPROVED_DIFFUSION_CONFIGS)} (improved-diffusion)")
        base = dataclasses.asdict(ADM_CONFIGS[config]) if config is not None else {}
        kwargs = {**base, **overrides}
        if spec == "random" and channels is not None and "in_channels" not in overrides:
            kwargs["in_channels"] = channels  # a random model follows the data (a checkpoint is what it is)
        missing = [k for k in ("image_size", "num_channels", "num_res_blocks") if k not in kwargs]
        if missing:
            raise UsageError(f"--score-model {spec} needs --score-config or the flags {missing}")
        if spec != "random" and os.path.exists(spec):  # (a missing file: load_guided_diffusion's FileNotFoundError)
            _check_score_file(spec)
        try:
            model = create_adm_unet(**kwargs) if spec == "random" else load_guided_diffusion(spec, **kwargs)
        except (ValueError, RuntimeError) as e:  # flags that build no UNet, a file that is none or does not fit
            raise UsageError(f"score model: {e}" if spec in str(e) else f"score model ({spec}): {e}") from None
    if getattr(model, "num_classes", None) is not None:
        raise UsageError("the score model is class-conditional; DiffAug training uses an unconditional one "
                         "(class_cond=False)")
    model.eval().requires_grad_(False)
    return model, schedule
