"""DDPM training of an eps-prediction ADM UNet: the score model behind DiffAug (`diffaug train-score`).

The simple loss of Ho et al. (2020): ||eps - eps_theta(x_t, t)||^2 with t ~ U{0..T-1} and
x_t = dk.forward_noise(x0, t, schedule, seed) (the fused op, so the noise is the Philox noise the augmentation
itself uses). AdamW with a linear learning-rate warm-up, gradient-norm clipping, an EMA of the weights (with
warm-up), optional bf16 autocast, a fixed seed, periodic and final checkpoints with exact resume (model, EMA,
optimizer, step, RNG state, data position), and an export of the EMA weights to safetensors with the UNet
config and schedule in the file's metadata (dk.models.score: export_safetensors, read back by load_score_model).

The embedded default model (diffaug_kernels/weights/digits32_eps.safetensors) is made by DEFAULT_COMMAND.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..models import ADM_CONFIGS, ADMConfig, create_adm_unet
from ..models.score import config_to_dict, export_safetensors
from ..schedule import NoiseSchedule
from ..utils import Progress, StopRequest, atomic_save, checksum_ok, ignore_interrupt, torch_load, trim_log
from .options import check_device, fraction, non_negative, non_negative_float, positive, positive_float, seed

NAME = "train-score"
HELP = "train an eps-prediction ADM UNet (the DiffAug score model) with DDPM"
DESCRIPTION = ("DDPM training (simple eps loss, t ~ U{0..T-1}, x_t from dk.forward_noise) of an ADM UNet: AdamW, "
               "EMA, gradient clipping, bf16 autocast, checkpoints with resume, export of the EMA weights to "
               "safetensors. Options left out take the defaults shown, or the checkpoint's values with --resume.")
SCHEDULES = ("linear", "cosine")
# Training hyper-parameters: a fresh run takes these unless given; a resumed run takes the checkpoint's.
DEFAULTS = dict(data="digits", config="digits32", model_overrides={}, schedule="linear", T=1000, steps=2000,
                batch_size=64, lr=2e-4, lr_warmup=100, weight_decay=0.0, ema=0.999, grad_clip=1.0, bf16=False,
                seed=0, save_every=500, log_every=50, num_workers=0)


# ------------------------------------------------------------------------------------------ pieces
def make_schedule(name: str, T: int) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return getattr(NoiseSchedule, name)(T)


def resolve_config(config, overrides: Optional[dict] = None) -> ADMConfig:
    """An ADMConfig from a name in ADM_CONFIGS (or an ADMConfig / dict of its fields), with overrides."""
    if isinstance(config, str):
        if config not in ADM_CONFIGS:
            raise ValueError(f"unknown config {config!r}; known: {sorted(ADM_CONFIGS)}")
        config = ADM_CONFIGS[config]
    elif isinstance(config, dict):
        config = _config_from_dict(config)
    elif not isinstance(config, ADMConfig):
        raise TypeError(f"config must be a name in ADM_CONFIGS, an ADMConfig or a dict, got {type(config).__name__}")
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(ADMConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown model flags {bad}; known: {sorted(known)}")
    return config.replace(**overrides) if overrides else config


def _config_from_dict(d: dict) -> ADMConfig:
    known = {f.name for f in dataclasses.fields(ADMConfig)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown ADMConfig fields {bad}")
    return ADMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def parse_model_flag(s: str) -> tuple:
    """'num_channels=16' -> ('num_channels', 16), typed by ADMConfig's field (int, float, bool or str)."""
    key, sep, value = s.partition("=")
    key = key.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(ADMConfig)}
    if not sep or key not in fields:
        raise ValueError(f"model flags look like NAME=VALUE with NAME one of {sorted(fields)}, got {s!r}")
    kind = fields[key].type if isinstance(fields[key].type, str) else getattr(fields[key].type, "__name__", "")
    value = value.strip()
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return key, value.lower() in ("true", "1", "yes")
        if kind == "int":
            return key, int(value)
        if kind == "float":
            return key, float(value)
    except ValueError:
        raise ValueError(f"model flag {key} must be a {kind}, got {value!r}") from None
    return key, value  # channel_mult, attention_resolutions: comma strings


class EMA:
    """An exponential moving average of a model's parameters (and a copy of its buffers).

    decay at update n (1-based) is min(decay, (1 + n) / (10 + n)): the average forgets its random start
    quickly early in training and settles to `decay` (warm-up as in TensorFlow's ExponentialMovingAverage
    with num_updates). The averaged model is `self.model` (eval mode, no grads)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = self.current_decay()
        ema_p = list(self.model.parameters())
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.warmup = bool(state.get("warmup", True))  # the decay is the run's current setting


def ddpm_loss(model: nn.Module, x0: Tensor, schedule: NoiseSchedule, t: Optional[Tensor] = None, seed=None,
              bf16: bool = False, backend: str = "auto") -> Tensor:
    """The simple DDPM loss mean((eps - model(x_t, t))^2), t ~ U{0..T-1} per sample unless given.

    The noise is the fused forward_noise's own: seed=None draws the Philox seed from torch's default generator
    (exactly what forward_noise(seed=None) does), and eps = dk.philox_normal(x0.shape, seed) is the same noise
    it added. The model runs under bf16 autocast when bf16=True; the loss is computed in float32."""
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (B,), device=x0.device)
    if seed is None:
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=x0.device)
    x_t = ops.forward_noise(x0, t, schedule, seed=seed, backend=backend)
    eps = ops.philox_normal(x0.shape, seed, device=x0.device, dtype=torch.float32, backend=backend)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x_t, t)
    return F.mse_loss(out.float(), eps)


class ScoreTrainer:
    """One optimisation step at a time: loss, backward, clip, AdamW, EMA. Holds everything a checkpoint needs."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, lr: float = 2e-4, weight_decay: float = 0.0,
                 ema: float = 0.999, grad_clip: float = 1.0, lr_warmup: int = 100, bf16: bool = False):
        self.model, self.schedule = model, schedule
        self.lr, self.lr_warmup, self.grad_clip, self.bf16 = float(lr), int(lr_warmup), grad_clip, bool(bf16)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema = EMA(model, ema)
        self.step_count = 0

    def current_lr(self) -> float:
        if self.lr_warmup <= 0:
            return self.lr
        return self.lr * min(1.0, (self.step_count + 1) / self.lr_warmup)

    def step(self, x0: Tensor, t: Optional[Tensor] = None, seed=None) -> float:
        """One training step on the batch x0 (in [-1, 1]); returns the loss (a float)."""
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.current_lr()
        loss = ddpm_loss(self.model, x0, self.schedule, t=t, seed=seed, bf16=self.bf16)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {self.step_count}: lower --lr, "
                                     f"or check the data (expected in [-1, 1])")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip and self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step_count += 1
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])


# -------------------------------------------------------------------------------------------- data
def load_data(spec: str, config: ADMConfig, split: str = "train"):
    """The training set for a UNet config: 'digits' (scikit-learn's, embedded), 'cifar10:<root>' or a local
    ImageFolder path, through dk.data.make_dataset. Checks the images match the UNet's size and channels."""
    from .. import data as dkdata

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data must be 'digits', 'cifar10:<root>' or an ImageFolder path, got {spec!r}")
    if spec != "digits":
        root = spec.split(":", 1)[1] if spec.startswith("cifar10:") else spec
        if not os.path.isdir(root):
            raise FileNotFoundError(f"training data not found at {root!r} (--data {spec}): give 'digits', "
                                    f"'cifar10:<root of cifar-10-batches-py>' or an existing ImageFolder directory; "
                                    f"nothing is downloaded")
    channels = config.in_channels if spec == "digits" else 3
    ds = dkdata.make_dataset(spec, split, size=config.image_size, channels=channels)
    if len(ds) == 0:
        raise ValueError(f"the data set {spec!r} ({split}) is empty")
    x = ds[0][0] if isinstance(ds[0], (tuple, list)) else ds[0]
    if tuple(x.shape) != (config.in_channels, config.image_size, config.image_size):
        raise ValueError(f"the images of {spec!r} have shape {tuple(x.shape)} but the UNet expects "
                         f"({config.in_channels}, {config.image_size}, {config.image_size}): pick a matching "
                         f"--config or set --model in_channels=... --model image_size=...")
    return ds


class EpochBatchSampler(torch.utils.data.Sampler):
    """Index batches over shuffled epochs: epoch e is the permutation drawn with seed (seed, e), so the data
    order is a function of the step alone and a resumed run sees the batches an unbroken run would have.
    Batches never cross epochs; the last partial batch of an epoch is dropped when n >= batch_size."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.per_epoch = max(1, n // batch_size)

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while True:
            epoch, i = divmod(step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            if self.n < self.batch_size:  # tiny data set: draw with repetition
                perm = perm.repeat(math.ceil(self.batch_size / self.n))
            for j in range(i, self.per_epoch):
                yield perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()
                step += 1

    def __len__(self):
        return sys.maxsize


def _batches(ds, batch_size: int, seed: int, start_step: int, num_workers: int):
    # its own generator: the loader's worker seed must not draw from torch's default generator, whose state
    # (t and noise) a checkpoint restores
    loader = torch.utils.data.DataLoader(ds, batch_sampler=EpochBatchSampler(len(ds), batch_size, seed, start_step),
                                         num_workers=num_workers, persistent_workers=num_workers > 0,
                                         worker_init_fn=ignore_interrupt if num_workers > 0 else None,
                                         generator=torch.Generator().manual_seed(seed + start_step))
    for batch in loader:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


# ------------------------------------------------------------------------------------ checkpoints
def checkpoints(path: str) -> list:
    """[path] for a file; for a directory, its ckpt_*.pt, newest first."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "ckpt_*.pt")), reverse=True)
        if found:
            return found
        raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path!r}")
    raise FileNotFoundError(f"checkpoint not found: {path!r}")


def load_checkpoint(path: str, log=print) -> dict:
    """A train-score checkpoint: the file, or a directory's newest one that verifies (each one skipped is logged
    with why); a file that does not verify is a ValueError."""
    return newest_checkpoint(path, _read_checkpoint, "train-score", log)


def newest_checkpoint(path: str, read, what: str, log=print):
    """read(file) of the checkpoint file at path, or of a directory's newest checkpoint that read accepts; each
    one it refuses (a ValueError) is logged with why, and the oldest's error is raised."""
    *newer, oldest = checkpoints(path)
    for p in newer:
        try:
            return read(p)
        except ValueError as e:
            log(f"{what}: skipping {p}: {e}")
    return read(oldest)


def _read_checkpoint(path: str) -> dict:
    ckpt = torch_load(path, "train-score", error=ValueError)  # a file that is no checkpoint: one clear line
    if not isinstance(ckpt, dict) or ckpt.get("format") != "diffaug_kernels.train_score.v1":
        raise ValueError(f"{path} is not a train-score checkpoint (" + (
            f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else f"it holds a {type(ckpt).__name__}")
            + ")")
    ckpt["path"] = path
    return ckpt


# ------------------------------------------------------------------------------------------- train
def train(data: Optional[str] = None, config=None, steps: Optional[int] = None, batch_size: Optional[int] = None,
          lr: Optional[float] = None, ema: Optional[float] = None, schedule: Optional[str] = None,
          T: Optional[int] = None, out: Optional[str] = None, export: Optional[str] = None,
          resume: Optional[str] = None, device=None, seed: Optional[int] = None, log_every: Optional[int] = None,
          save_every: Optional[int] = None, grad_clip: Optional[float] = None, weight_decay: Optional[float] = None,
          lr_warmup: Optional[int] = None, bf16: Optional[bool] = None, model_overrides: Optional[dict] = None,
          export_dtype: str = "float16", num_workers: Optional[int] = None, keep: int = 2,
          progress: Optional[bool] = None, command: Optional[str] = None) -> dict:
    """Trains (or resumes training of) an eps-prediction ADM UNet with the DDPM loss; returns a summary dict
    (step, loss, wall_s, checkpoint, export, ...).

    Arguments left None take DEFAULTS for a fresh run and the checkpoint's values for a resumed one (config,
    model_overrides, schedule and T must match the checkpoint's when given). steps is the total step count to
    reach (a resumed run continues from the checkpoint's step). Checkpoints go to out/ckpt_<step>.pt (out: default
    runs/train-score, or the resumed checkpoint's folder) every
    save_every steps and at the end (the newest `keep` are kept); export writes the EMA weights as safetensors
    (export_dtype, default float16) with the config and schedule in its metadata.
    """
    if isinstance(config, ADMConfig):
        config = config_to_dict(config)
    given = dict(data=data, config=config, model_overrides=model_overrides, schedule=schedule, T=T, steps=steps,
                 batch_size=batch_size, lr=lr, lr_warmup=lr_warmup, weight_decay=weight_decay, ema=ema,
                 grad_clip=grad_clip, bf16=bf16, seed=seed, save_every=save_every, log_every=log_every,
                 num_workers=num_workers)
    ckpt = load_checkpoint(resume) if resume is not None else None
    base = {**DEFAULTS, **(ckpt["args"] if ckpt else {})}
    args = {k: (v if v is not None else base[k]) for k, v in given.items()}
    if ckpt:
        for k in ("config", "model_overrides", "schedule", "T"):
            if given[k] is not None and args[k] != ckpt["args"][k]:
                raise ValueError(f"{k}={given[k]!r} differs from the checkpoint's {ckpt['args'][k]!r} "
                                 f"({ckpt['path']}); leave it out to resume")
    for k in ("steps", "batch_size", "log_every", "save_every", "T"):
        if not isinstance(args[k], int) or isinstance(args[k], bool) or args[k] < (0 if k == "steps" else 1):
            raise ValueError(f"{k} must be a {'non-negative' if k == 'steps' else 'positive'} integer, got {args[k]!r}")
    if not args["lr"] > 0:
        raise ValueError(f"lr must be positive, got {args['lr']}")
    if export is not None and not str(export).endswith(".safetensors"):
        raise ValueError(f"export must be a .safetensors path, got {export!r}")

    cfg = resolve_config(args["config"], args["model_overrides"])
    sched = make_schedule(args["schedule"], args["T"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds = load_data(args["data"], cfg)  # before the model: a bad path fails at once

    torch.manual_seed(args["seed"])
    model = create_adm_unet(**dataclasses.asdict(cfg)).to(dev)
    trainer = ScoreTrainer(model, sched, lr=args["lr"], weight_decay=args["weight_decay"], ema=args["ema"],
                           grad_clip=args["grad_clip"], lr_warmup=args["lr_warmup"], bf16=args["bf16"])
    history = []
    if ckpt:
        trainer.load_state_dict(ckpt)
        history = list(ckpt.get("history", []))
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if dev.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
    start = trainer.step_count
    n_params = sum(p.numel() for p in model.parameters())
    if out is None:  # a resumed run goes on writing where its checkpoints are
        out = os.path.dirname(os.path.abspath(ckpt["path"])) if ckpt else "runs/train-score"
    if ckpt:  # the steps after the checkpoint are trained again: their old records go
        trim_log(os.path.join(out, "log.jsonl"), start)

    os.makedirs(out, exist_ok=True)
    bar = Progress(args["steps"], start, desc="train-score", unit="step", bar=progress)
    bar.write(f"train-score: {n_params:,} parameters, {len(ds)} images from {args['data']!r}, schedule "
            f"{args['schedule']} T={args['T']}, device {dev}{' (bf16 autocast)' if args['bf16'] else ''}, "
            f"steps {start} -> {args['steps']}, batch {args['batch_size']}, out {out}")
    if start >= args["steps"]:
        bar.write(f"note: the checkpoint is at step {start}, so steps={args['steps']} leaves nothing to train "
                f"(give a larger --steps to continue)")

    good, damaged = set(), set()  # checkpoints in out known to verify, and found not to

    def save(step: int) -> str:
        path = os.path.join(out, f"ckpt_{step:07d}.pt")
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        atomic_save({"format": "diffaug_kernels.train_score.v1", **trainer.state_dict(), "args": args,
                      "config": config_to_dict(cfg), "schedule": {"name": args["schedule"], "T": args["T"]},
                      "rng": rng, "history": history}, path)
        good.add(path)
        _prune(out, keep, good, damaged, bar.write)
        return path

    t0, window, ckpt_path = time.perf_counter(), [], ckpt["path"] if ckpt else None
    batches = (_batches(ds, args["batch_size"], args["seed"], start, args["num_workers"])
               if start < args["steps"] else iter(()))
    with StopRequest("saving a checkpoint after this step") as stop:
        for step in range(start + 1, args["steps"] + 1):
            if stop.requested:
                break
            x0 = next(batches).to(dev, non_blocking=True)
            loss = trainer.step(x0)
            window.append(loss)
            bar.update(loss=f"{loss:.4f}")
            if step % args["log_every"] == 0 or step == args["steps"]:
                mean = sum(window) / len(window)
                history.append({"step": step, "loss": mean, "lr": trainer.current_lr(),
                                "wall_s": round(time.perf_counter() - t0, 2)})
                bar.write(f"step {step}/{args['steps']}  loss {mean:.5f}  lr {trainer.current_lr():.2e}  "
                          f"ema decay {trainer.ema.current_decay():.4f}  {time.perf_counter() - t0:.0f}s")
                with open(os.path.join(out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(history[-1]) + "\n")
                window = []
            if step % args["save_every"] == 0 and step != args["steps"]:
                ckpt_path = save(step)
        bar.close()
        wall = time.perf_counter() - t0
        if trainer.step_count > start or ckpt_path is None:
            ckpt_path = save(trainer.step_count)  # a second Ctrl-C during this save keeps the previous file
    summary = {"step": trainer.step_count, "loss": history[-1]["loss"] if history else None,
               "wall_s": round(wall, 1), "checkpoint": ckpt_path, "export": None, "parameters": n_params,
               "config": config_to_dict(cfg), "schedule": args["schedule"], "T": args["T"],
               "interrupted": stop.requested}
    if stop.requested:  # a partial model is not exported under the name of the finished one
        bar.write(f"train-score: interrupted at step {summary['step']} of {args['steps']}; checkpoint {ckpt_path}"
                  + (" (not exported)" if export is not None else ""))
        return summary
    if export is not None:
        summary["export"] = export_safetensors(
            trainer.ema.model, export, cfg, args["schedule"], args["T"], dtype=export_dtype,
            extra={"step": str(trainer.step_count), "ema_decay": str(args["ema"]), "data": str(args["data"]),
                   "final_loss": str(summary["loss"]), "train_args": args,
                   **({"command": command} if command else {})})
    bar.write(f"train-score: step {summary['step']}, loss {summary['loss']}, {wall:.0f}s, checkpoint "
              f"{ckpt_path}" + (f", exported {summary['export']}" if summary["export"] else ""))
    return summary


def _prune(out: str, keep: int, good: set, damaged: set, log) -> None:
    """Keeps the newest `keep` checkpoints in out that verify and removes all older ones, so a damaged file never
    takes the place of a good one. good: the paths known to verify (this run's saves, and those checked once);
    damaged: those found not to (each logged once; one newer than the kept ones stays, never counted)."""
    if keep <= 0:
        return
    kept = 0
    for path in sorted(glob.glob(os.path.join(out, "ckpt_*.pt")), reverse=True):
        if kept >= keep:
            os.remove(path)
            continue
        if path not in good and path not in damaged:
            (good if checksum_ok(path) is not False else damaged).add(path)
            if path in damaged:
                log(f"train-score: {path} is damaged (it does not match its checksum); not counted among the "
                    f"{keep} kept")
        kept += path in good


# --------------------------------------------------------------------------------------------- CLI
_CLI_OPTIONS = (("data", "--data"), ("config", "--config"), ("schedule", "--schedule"), ("T", "--T"),
                ("steps", "--steps"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("lr_warmup", "--lr-warmup"),
                ("weight_decay", "--weight-decay"), ("ema", "--ema"), ("grad_clip", "--grad-clip"),
                ("seed", "--seed"), ("out", "--out"), ("save_every", "--save-every"), ("log_every", "--log-every"),
                ("resume", "--resume"), ("device", "--device"), ("export", "--export"),
                ("export_dtype", "--export-dtype"))


def _command_line(args) -> str:
    """The train-score command line equivalent to parsed CLI args (recorded in the export's metadata)."""
    import shlex

    parts = ["python", "-m", "diffaug_kernels", "train-score"]
    for name, flag in _CLI_OPTIONS:
        v = getattr(args, name, None)
        if v is not None and not (name == "export_dtype" and v == "float16"):
            parts += [flag, str(v)]
    for m in args.model or ():
        parts += ["--model", m]
    if args.bf16 is not None:
        parts.append("--bf16" if args.bf16 else "--no-bf16")
    return shlex.join(parts)


def add_arguments(p) -> None:
    p.add_argument("--data", default=None, help="'digits' (embedded scikit-learn digits; default), "
                   "'cifar10:<root>' or a local ImageFolder directory")
    p.add_argument("--config", default=None, help="a key of dk.models.ADM_CONFIGS (default digits32)")
    p.add_argument("--model", action="append", default=None, metavar="NAME=VALUE",
                   help="override an ADM config flag, e.g. --model num_channels=16 (repeatable)")
    p.add_argument("--steps", type=non_negative, default=None, help="total optimisation steps to reach (default 2000)")
    p.add_argument("--batch-size", type=positive, default=None, help="default 64")
    p.add_argument("--lr", type=positive_float, default=None, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--lr-warmup", type=non_negative, default=None,
                   help="linear learning-rate warm-up steps (default 100)")
    p.add_argument("--weight-decay", type=non_negative_float, default=None, help="AdamW weight decay (default 0)")
    p.add_argument("--ema", type=fraction, default=None, help="EMA decay, with warm-up (default 0.999)")
    p.add_argument("--grad-clip", type=non_negative_float, default=None,
                   help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--schedule", choices=("linear", "cosine"), default=None, help="noise schedule (default linear)")
    p.add_argument("--T", type=positive, default=None, help="diffusion steps (default 1000)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the UNet (default off)")
    p.add_argument("--seed", type=seed, default=None, help="seed of init, data order, t and noise (default 0)")
    p.add_argument("--out", default=None,
                   help="checkpoint directory (default runs/train-score; with --resume, the checkpoint's folder)")
    p.add_argument("--save-every", type=positive, default=None, help="checkpoint period in steps (default 500)")
    p.add_argument("--keep", type=non_negative, default=2,
                   help="newest checkpoints that verify kept (default 2; 0 keeps all)")
    p.add_argument("--log-every", type=positive, default=None, help="log period in steps (default 50)")
    p.add_argument("--export", metavar="PATH.safetensors", default=None,
                   help="write the EMA weights here, with the config and schedule in the metadata")
    p.add_argument("--export-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="dtype of the exported weights (default float16; loaded back as float32)")
    p.add_argument("--resume", metavar="PATH", default=None, help="a checkpoint file, or a directory (its newest)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=non_negative, default=None, help="DataLoader workers (default 0)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")



def main(args) -> int:
    """`diffaug train-score`: the parsed options -> train()."""
    args.device = str(check_device("train-score", args.device))  # before the data and the model
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = dict(parse_model_flag(f) for f in args.model) if args.model else None
        summary = train(
            data=args.data, config=args.config, model_overrides=overrides, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, lr_warmup=args.lr_warmup, weight_decay=args.weight_decay,
            ema=args.ema, grad_clip=args.grad_clip, schedule=args.schedule, T=args.T, bf16=args.bf16, seed=args.seed,
            out=args.out, save_every=args.save_every, keep=args.keep, log_every=args.log_every, export=args.export,
            export_dtype=args.export_dtype, resume=args.resume, device=args.device, num_workers=args.workers,
            progress=False if args.no_progress else None, command=_command_line(args))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"diffaug train-score: {e}")
    return 130 if summary["interrupted"] else 0
