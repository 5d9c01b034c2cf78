"""`diffaug train-guidance`: a guidance classifier for classifier-guided sampling, by guided-diffusion's
classifier_train recipe.

Each step draws t ~ U{0..T-1} per image (upstream's "uniform" schedule sampler), noises the batch to
x_t = dk.forward_noise(x0, t, schedule, seed) (the seed drawn from torch's generator), and minimises the
cross-entropy of classifier(x_t, t) with AdamW, the learning rate optionally annealed linearly to zero
(upstream's --anneal_lr). Two kinds (--kind):

- noisy: guided-diffusion's noisy classifier, an EncoderUNet (dk.models.create_classifier) of the image's C
  channels;
- da: the DA-classifier, dk.models.DAClassifier: the same EncoderUNet with 2C input channels classifying
  [x_t, x0_hat(x_t)], x0_hat the frozen score model's one-step Tweedie estimate (run without autograd while
  training: the classifier's gradient does not pass through it).

The score model (--score-model, as the other commands take it; default the shipped digits model) gives the
noise schedule for both kinds and the denoiser of kind da. The architecture flags are create_classifier's, with
guided-diffusion's names (--classifier_width or --classifier-width, ...). Upstream trains its released
classifiers with lr 3e-4, weight decay 0.05 and annealing on 8 GPUs for 150k-300k steps of batch 256
(classifier_train.py's own defaults: lr 3e-4, weight decay 0, no annealing, 150k iterations). The defaults here
are sized for the 32x32 digits on two CPU cores (DEFAULTS): a 0.56M-parameter EncoderUNet (width 32, depth 1,
channel_mult 1,2,2, attention at 8x8, attention pooling), batch 16, 500 steps, weight decay 0.05 and lr 3e-3, ten
times upstream's: at 3e-4 (and at 1e-3) the loss of this small run stays at ln 10 for the first hundred steps,
where the ResBlocks' zero-initialised output layers learn slowly.

Checkpoints (GUIDANCE_FORMAT, written atomically with a checksum) hold what load_guidance_classifier needs to
rebuild the classifier (kind, flags, the trained schedule's betas, the score-model spec, image channels, class
names) and what an exact resume needs (optimizer, step, torch's RNG state, the data order being a function of
(seed, step)). At the end the classifier's accuracy on noisy held-out images at a few t is printed and logged.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import make_dataset
from ..models.guidance import (
    GUIDANCE_FORMAT,
    GUIDANCE_KINDS,
    POOLS,
    DAClassifier,
    create_classifier,
    export_guidance_classifier,
)
from ..models.score import resolve_score_model
from ..ops import forward_noise
from ..robustness import stream_seed
from ..schedule import NoiseSchedule
from ..utils import (
    Progress,
    StopRequest,
    UsageError,
    atomic_save,
    checksum_ok,
    eval_mode,
    torch_load,
    trim_log,
    write_json,
)
from .options import (
    boolean,
    check_device,
    int_list,
    non_negative,
    non_negative_float,
    positive,
    positive_float,
    seed,
)
from .train_score import EpochBatchSampler, newest_checkpoint

NAME = "train-guidance"
HELP = "train a guidance classifier (noisy EncoderUNet or DA-classifier) by guided-diffusion's classifier_train"
DESCRIPTION = ("Train a classifier for classifier guidance as guided-diffusion's classifier_train.py does: "
               "t ~ U{0..T-1}, x_t from dk.forward_noise, cross-entropy, AdamW (optionally annealed lr). "
               "--kind noisy classifies x_t; --kind da classifies [x_t, x0_hat(x_t)] through the frozen score "
               "model. Checkpoints with exact resume; accuracy on noisy held-out images at the end. Options left "
               "out take the defaults shown, or the checkpoint's values with --resume.")

# create_classifier's flags as the command sets them (guided-diffusion's names), sized for 32x32 digits on 2 cores
ARCH_DEFAULTS = dict(classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
                     classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                     classifier_pool="attention", classifier_use_fp16=False, channel_mult="1,2,2",
                     num_head_channels=32)
DEFAULTS = dict(kind="noisy", data="digits", image_size=None, channels=None, score_model="default",
                score_config=None, score_flag=(), steps=500, batch_size=16, lr=3e-3, weight_decay=0.05,
                anneal_lr=False, seed=0, save_every=100, log_every=25, num_workers=0,
                eval_times=(0, 250, 500, 750), eval_images=None, **ARCH_DEFAULTS)
# what a resumed run may change: the rest defines what is trained
_RESUMABLE = ("steps", "save_every", "log_every", "num_workers", "eval_times", "eval_images")
LOG_NAME = "log.jsonl"


# ------------------------------------------------------------------------------------------ pieces
class GuidanceTrainer:
    """One step of classifier_train at a time: t uniform, x_t by forward_noise, cross-entropy, AdamW."""

    def __init__(self, net: nn.Module, params, schedule: NoiseSchedule, lr: float, weight_decay: float,
                 total_steps: int, anneal_lr: bool = False):
        self.net, self.schedule = net, schedule
        self.lr, self.anneal_lr, self.total_steps = float(lr), bool(anneal_lr), int(total_steps)
        self.optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
        self.step_count = 0

    def current_lr(self) -> float:
        """upstream's set_annealed_lr: lr * (1 - steps done / total steps) when annealing, else lr."""
        if not self.anneal_lr:
            return self.lr
        return self.lr * max(0.0, 1.0 - self.step_count / max(1, self.total_steps))

    def step(self, x0: Tensor, y: Tensor) -> tuple:
        """One optimisation step on images x0 in [-1, 1] with labels y: (loss, accuracy) as floats."""
        self.net.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.current_lr()
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        noise_seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=x0.device)
        x_t = forward_noise(x0, t, self.schedule, seed=noise_seed)
        logits = self.net(x_t, t)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {self.step_count}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return float(loss.detach()), float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def noisy_accuracy(net: nn.Module, ds, schedule: NoiseSchedule, times, seed_value: int, batch_size: int,
                   limit: Optional[int] = None, device=None) -> dict:
    """{t: top-1 accuracy of net(x_t, t)} over the first `limit` images of ds, x_t = forward_noise(x, t) with
    the Philox seed stream_seed(seed_value, "eval", t, batch index): the same noise at every evaluation."""
    n = len(ds) if limit is None else min(limit, len(ds))
    acc = {}
    with eval_mode(net):
        for t in times:
            right = 0
            for b, start in enumerate(range(0, n, batch_size)):
                items = [ds[i] for i in range(start, min(n, start + batch_size))]
                x = torch.stack([it[0] for it in items]).to(device)
                y = torch.tensor([int(it[1]) for it in items], device=x.device)
                x_t = forward_noise(x, int(t), schedule, seed=stream_seed(seed_value, "eval", int(t), b))
                tt = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
                right += int((net(x_t, tt).argmax(1) == y).sum())
            acc[int(t)] = right / n
    return acc


def _num_classes(ds, spec: str) -> tuple:
    """(number of classes, class names) of a data set made by make_dataset."""
    classes = getattr(ds, "classes", None)
    if classes:
        return len(classes), list(classes)
    return 10, [str(k) for k in range(10)]  # digits and CIFAR-10


def _check_data(data: str) -> None:
    if not isinstance(data, str) or not data:
        raise UsageError(f"data must be 'digits', 'cifar10:<root>' or an ImageFolder path, got {data!r}")
    if data != "digits":
        root = data.split(":", 1)[1] if data.startswith("cifar10:") else data
        if not os.path.isdir(root):
            raise FileNotFoundError(f"training data not found at {root!r} (--data {data}): give 'digits', "
                                    f"'cifar10:<root>' or an existing ImageFolder directory; nothing is downloaded")


def _datasets(data: str, image_size: int, channels: int):
    train_ds = make_dataset(data, "train", size=image_size, channels=channels)
    test_ds = make_dataset(data, "test", size=image_size, channels=channels)
    if len(train_ds) == 0:
        raise UsageError(f"the data set {data!r} is empty")
    return train_ds, test_ds


def _batches(ds, batch_size: int, seed_value: int, start_step: int, num_workers: int):
    loader = torch.utils.data.DataLoader(ds, batch_sampler=EpochBatchSampler(len(ds), batch_size, seed_value,
                                                                             start_step),
                                         num_workers=num_workers, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed_value + start_step))
    for x, y in loader:
        yield x, y


def arch_flags(args: dict, image_size: int, in_channels: int, num_classes: int) -> dict:
    """create_classifier's keyword arguments for the run's options."""
    return dict(image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                **{k: args[k] for k in ARCH_DEFAULTS})


def load_checkpoint(path: str, log=print) -> dict:
    """A train-guidance checkpoint: the file, or a directory's newest one that verifies (skipped ones logged)."""
    return newest_checkpoint(path, _read_checkpoint, "train-guidance", log)


def _read_checkpoint(path: str) -> dict:
    ckpt = torch_load(path, "train-guidance", error=ValueError)
    if not isinstance(ckpt, dict) or ckpt.get("format") != GUIDANCE_FORMAT:
        got = f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else f"it holds a {type(ckpt).__name__}"
        raise ValueError(f"{path} is not a train-guidance checkpoint ({got})")
    ckpt["path"] = path
    return ckpt


def _prune(out: str, keep: int, good: set, log) -> None:
    """Keeps the newest `keep` checkpoints of out that verify; older ones go (a damaged one is not counted)."""
    if keep <= 0:
        return
    kept = 0
    for path in sorted(glob.glob(os.path.join(out, "ckpt_*.pt")), reverse=True):
        if kept >= keep:
            os.remove(path)
        elif path in good or checksum_ok(path) is not False:
            good.add(path)
            kept += 1
        else:
            log(f"train-guidance: {path} is damaged (it does not match its checksum); not counted among the "
                f"{keep} kept")


def _check_args(args: dict) -> None:
    if args["kind"] not in GUIDANCE_KINDS:
        raise UsageError(f"kind must be one of {GUIDANCE_KINDS}, got {args['kind']!r}")
    if args["classifier_pool"] not in POOLS:
        raise UsageError(f"classifier_pool must be one of {POOLS}, got {args['classifier_pool']!r}")
    for k in ("steps", "batch_size", "log_every", "save_every", "num_workers"):
        v = args[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k in ("batch_size", "log_every",
                                                                              "save_every") else 0):
            raise UsageError(f"{k} must be a {'non-negative' if k in ('steps', 'num_workers') else 'positive'} "
                             f"integer, got {v!r}")
    if not (isinstance(args["lr"], (int, float)) and args["lr"] > 0):
        raise UsageError(f"lr must be a positive number, got {args['lr']!r}")


# ------------------------------------------------------------------------------------------- train
def train(resume: Optional[str] = None, out: Optional[str] = None, device=None, keep: int = 2,
          progress: Optional[bool] = None, export: Optional[str] = None, **given) -> dict:
    """Trains (or resumes) a guidance classifier; returns a summary (step, loss, accuracy by t, checkpoint, ...).

    given: options of DEFAULTS; those left out (or None) take DEFAULTS for a fresh run, the checkpoint's values
    for a resumed one (where only steps, save_every, log_every, num_workers, eval_times and eval_images may
    change). steps is the total to reach. Checkpoints go to out/ckpt_<step>.pt (default runs/train-guidance, or
    the resumed checkpoint's folder) every save_every steps and at the end; the newest `keep` stay (0: all).
    export: a .safetensors path that receives the final classifier (export_guidance_classifier) when the run
    finishes."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"train() got unknown options {unknown}")
    ckpt = load_checkpoint(resume) if resume is not None else None
    base = {**DEFAULTS, **(ckpt["args"] if ckpt else {})}
    spec = given.get("score_model")
    if spec not in (None, "default", "random") and os.path.exists(spec):
        given["score_model"] = os.path.abspath(spec)  # the checkpoint must find it from anywhere
    args = {k: (given[k] if given.get(k) is not None else base[k]) for k in DEFAULTS}
    args["score_flag"] = list(args["score_flag"] or ())
    args["eval_times"] = [int(t) for t in args["eval_times"]]
    if ckpt:
        for k in DEFAULTS:
            if k not in _RESUMABLE and given.get(k) is not None and args[k] != ckpt["args"][k]:
                raise UsageError(f"{k}={given[k]!r} differs from the checkpoint's {ckpt['args'][k]!r} "
                                 f"({ckpt['path']}); leave it out to resume")
    _check_args(args)
    _check_data(args["data"])
    if export is not None and not str(export).endswith(".safetensors"):
        raise UsageError(f"--export must name a .safetensors file, got {export!r}")
    if args["kind"] == "da" and args["score_model"] == "random":
        raise UsageError("kind da needs a score model its checkpoint can name again ('default' or a file); "
                         "'random' is for tests of kind noisy")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.manual_seed(args["seed"])
    if args["data"] == "digits":
        channels = args["channels"] or 1
    elif args["channels"] not in (None, 3):
        raise UsageError("--channels is for the digits (1 or 3); other data sets are RGB")
    else:
        channels = 3
    spec = args["score_model"]
    score, schedule = resolve_score_model(spec, args["data"], args["score_config"], args["score_flag"], channels)
    schedule = schedule or NoiseSchedule.linear(1000)
    image_size = args["image_size"] or getattr(score, "image_size", None) or 32
    score_channels = getattr(score, "in_channels", None)
    if args["kind"] == "da" and score_channels not in (None, channels):
        raise UsageError(f"the score model takes {score_channels}-channel images but the data have {channels}: "
                         f"kind da denoises the data's images")
    train_ds, test_ds = _datasets(args["data"], image_size, channels)
    num_classes, classes = _num_classes(train_ds, args["data"])
    flags = arch_flags(args, image_size, channels * (2 if args["kind"] == "da" else 1), num_classes)
    try:
        clf = create_classifier(**flags).to(dev)
    except ValueError as e:
        raise UsageError(f"the classifier flags build no classifier: {e}") from None
    score.to(dev)
    prediction = getattr(score, "prediction", "eps")
    net = (DAClassifier(clf, score, schedule, prediction=prediction, detach_denoiser=True)
           if args["kind"] == "da" else clf)
    trainer = GuidanceTrainer(net, clf.parameters(), schedule, args["lr"], args["weight_decay"], args["steps"],
                              args["anneal_lr"])
    history = []
    if ckpt:
        clf.load_state_dict(ckpt["model"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.step_count = int(ckpt["step"])
        history = list(ckpt.get("history", []))
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if dev.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
    start = trainer.step_count
    if out is None:
        out = os.path.dirname(os.path.abspath(ckpt["path"])) if ckpt else "runs/train-guidance"
    bad_t = [t for t in args["eval_times"] if not 0 <= t < schedule.num_timesteps]
    if bad_t:
        raise UsageError(f"eval times {bad_t} lie outside the schedule's [0, {schedule.num_timesteps})")
    if ckpt:
        trim_log(os.path.join(out, LOG_NAME), start)
    os.makedirs(out, exist_ok=True)

    n_params = sum(p.numel() for p in clf.parameters())
    bar = Progress(args["steps"], start, desc="train-guidance", unit="step", bar=progress)
    bar.write(f"train-guidance: kind {args['kind']}, {n_params:,} parameters, {len(train_ds)} images of "
              f"{image_size}x{image_size}x{channels} from {args['data']!r} ({num_classes} classes), schedule "
              f"{schedule.name} T={schedule.num_timesteps}, device {dev}, steps {start} -> {args['steps']}, "
              f"batch {args['batch_size']}, out {out}")
    if start >= args["steps"]:
        bar.write(f"note: the checkpoint is at step {start}, so steps={args['steps']} leaves nothing to train "
                  f"(give a larger --steps to continue)")
    score_spec = {"spec": spec, "config": args["score_config"], "flags": args["score_flag"], "data": args["data"],
                  "prediction": prediction}
    good: set = set()

    def save(step: int) -> str:
        path = os.path.join(out, f"ckpt_{step:07d}.pt")
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        atomic_save({"format": GUIDANCE_FORMAT, "kind": args["kind"],
                     "classifier": {k: list(v) if isinstance(v, tuple) else v for k, v in flags.items()},
                     "model": clf.state_dict(), "optimizer": trainer.optimizer.state_dict(), "step": step,
                     "schedule_betas": schedule.betas.clone(), "score_model": score_spec,
                     "image_channels": channels, "classes": classes, "args": args, "rng": rng,
                     "history": history}, path)
        good.add(path)
        _prune(out, keep, good, bar.write)
        return path

    t0, window, ckpt_path = time.perf_counter(), [], ckpt["path"] if ckpt else None
    batches = (_batches(train_ds, args["batch_size"], args["seed"], start, args["num_workers"])
               if start < args["steps"] else iter(()))
    with StopRequest("saving a checkpoint after this step") as stop:
        for step in range(start + 1, args["steps"] + 1):
            if stop.requested:
                break
            x0, y = next(batches)
            lr = trainer.current_lr()
            loss, acc = trainer.step(x0.to(dev), y.to(dev))
            window.append((loss, acc))
            bar.update(loss=f"{loss:.4f}")
            if step % args["log_every"] == 0 or step == args["steps"]:
                record = {"step": step, "loss": sum(v[0] for v in window) / len(window),
                          "acc": sum(v[1] for v in window) / len(window), "lr": lr,
                          "wall_s": round(time.perf_counter() - t0, 2)}
                history.append(record)
                bar.write(f"step {step}/{args['steps']}  loss {record['loss']:.4f}  train acc {record['acc']:.3f}  "
                          f"lr {lr:.2e}  {record['wall_s']:.0f}s")
                with open(os.path.join(out, LOG_NAME), "a") as f:
                    f.write(json.dumps(record) + "\n")
                window = []
            if step % args["save_every"] == 0 and step != args["steps"]:
                ckpt_path = save(step)
        bar.close()
        train_s = time.perf_counter() - t0
        if trainer.step_count > start or ckpt_path is None:
            ckpt_path = save(trainer.step_count)
    summary = {"kind": args["kind"], "step": trainer.step_count, "loss": history[-1]["loss"] if history else None,
               "train_s": round(train_s, 1), "checkpoint": ckpt_path, "parameters": n_params,
               "interrupted": stop.requested, "accuracy": None}
    if stop.requested:
        bar.write(f"train-guidance: interrupted at step {summary['step']} of {args['steps']}; checkpoint "
                  f"{ckpt_path} (no evaluation)")
        return summary
    if export is not None:
        summary["export"] = export_guidance_classifier(_read_checkpoint(ckpt_path), export)
        bar.write(f"train-guidance: exported the classifier to {export}")
    if args["eval_times"]:
        t1 = time.perf_counter()
        acc = noisy_accuracy(net, test_ds, schedule, args["eval_times"], args["seed"], args["batch_size"] * 2,
                             args["eval_images"], dev)
        summary["accuracy"] = {str(t): a for t, a in acc.items()}
        summary["eval_images"] = len(test_ds) if args["eval_images"] is None else min(args["eval_images"],
                                                                                       len(test_ds))
        summary["eval_s"] = round(time.perf_counter() - t1, 1)
        with open(os.path.join(out, LOG_NAME), "a") as f:
            f.write(json.dumps({"step": trainer.step_count, "eval": summary["accuracy"],
                                "eval_images": summary["eval_images"]}) + "\n")
        write_json({**summary, "args": args}, os.path.join(out, "eval.json"))
        bar.write(f"held-out accuracy on x_t ({summary['eval_images']} images): "
                  + ", ".join(f"t={t} {100 * a:.1f}%" for t, a in acc.items()))
    bar.write(f"train-guidance: step {summary['step']}, loss {summary['loss']}, {train_s:.0f}s, checkpoint "
              f"{ckpt_path}")
    return summary


# --------------------------------------------------------------------------------------------- CLI
def _flag(g, name: str, **kw):
    """An option spelt both ways: --classifier-width and guided-diffusion's --classifier_width."""
    g.add_argument("--" + name.replace("_", "-"), "--" + name, dest=name, default=None, **kw)


def add_arguments(p) -> None:
    d = DEFAULTS
    p.add_argument("--kind", choices=GUIDANCE_KINDS, default=None,
                   help="noisy: classify x_t (guided-diffusion's classifier); da: classify [x_t, x0_hat(x_t)] "
                        "through the frozen score model (default noisy)")
    p.add_argument("--data", default=None, help="'digits' (scikit-learn's, shipped; default), 'cifar10:<root>' or an "
                   "ImageFolder path (train/ and val/ inside, or one tree for both)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="digits only: 1 (default) or 3")
    _flag(p, "image_size", type=positive, help="default: the score model's image size, else 32")
    p.add_argument("--score-model", default=None,
                   help="'default' (the shipped digits model; default), a train-score export, a guided-diffusion "
                        "checkpoint with --score-config/--score-flag, or a diffusers folder: the noise schedule, "
                        "and the denoiser of kind da")
    p.add_argument("--score-config", default=None, help="ADM_CONFIGS name of a checkpoint")
    p.add_argument("--score-flag", action="append", default=None, metavar="KEY=VALUE",
                   help="create_model flag of a checkpoint (repeatable)")
    g = p.add_argument_group("classifier (create_classifier's flags, guided-diffusion's names)")
    _flag(g, "classifier_width", type=positive, help=f"default {d['classifier_width']} (upstream 128)")
    _flag(g, "classifier_depth", type=positive, help=f"res blocks per level, default {d['classifier_depth']} "
          f"(upstream 2)")
    _flag(g, "classifier_attention_resolutions", metavar="R,R",
          help=f"feature-map resolutions with attention, default {d['classifier_attention_resolutions']} "
               f"(upstream 32,16,8)")
    _flag(g, "classifier_use_scale_shift_norm", type=boolean, metavar="BOOL", help="default true")
    _flag(g, "classifier_resblock_updown", type=boolean, metavar="BOOL", help="default true")
    _flag(g, "classifier_pool", choices=POOLS, help=f"default {d['classifier_pool']}")
    _flag(g, "classifier_use_fp16", type=boolean, metavar="BOOL", help="float16 autocast of the torso (default false)")
    _flag(g, "channel_mult", metavar="M,M", help=f"default {d['channel_mult']} (32 -> 8; '' picks upstream's for "
          f"the size)")
    _flag(g, "num_head_channels", type=positive, help=f"default {d['num_head_channels']} (upstream 64)")
    g = p.add_argument_group("training (classifier_train's recipe)")
    g.add_argument("--iterations", "--steps", dest="iterations", type=non_negative, default=None,
                   help=f"total steps to reach (default {d['steps']}; upstream 150000)")
    _flag(g, "batch_size", type=positive, help=f"default {d['batch_size']} (upstream 256 over 8 GPUs)")
    _flag(g, "lr", type=positive_float, help=f"AdamW learning rate, default {d['lr']:g} (upstream 3e-4, too slow "
          f"for a few hundred steps of this small model)")
    _flag(g, "weight_decay", type=non_negative_float,
          help=f"AdamW weight decay, default {d['weight_decay']:g} (upstream's for its released classifiers)")
    _flag(g, "anneal_lr", type=boolean, metavar="BOOL", help="lr decays linearly to 0 at the last step "
          "(default false)")
    p.add_argument("--seed", type=seed, default=None, help="seed of the init, data order, t and noise (default 0)")
    p.add_argument("--out", default=None, help="checkpoint folder (default runs/train-guidance; with --resume, the "
                   "checkpoint's folder)")
    _flag(p, "save_interval", type=positive, help=f"checkpoint period in steps (default {d['save_every']})")
    _flag(p, "log_interval", type=positive, help=f"log period in steps (default {d['log_every']})")
    p.add_argument("--keep", type=non_negative, default=2, help="newest checkpoints that verify kept (0 keeps all)")
    p.add_argument("--resume", metavar="PATH", default=None, help="a checkpoint file, or a folder (its newest)")
    p.add_argument("--export", metavar="FILE.safetensors", default=None,
                   help="also write the final classifier as safetensors (weights, flags, schedule; no optimizer), "
                        "which sample, pag and dk.models.load_guidance_classifier read")
    p.add_argument("--eval-times", type=int_list, default=None,
                   help="t of the final held-out accuracy (default 0,250,500,750; '' skips it)")
    p.add_argument("--eval-images", type=positive, default=None, help="held-out images evaluated (default all)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--workers", type=non_negative, default=None, help="DataLoader workers (default 0)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")


def main(args) -> int:
    device = str(check_device(NAME, args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {k: getattr(args, k) for k in ARCH_DEFAULTS}
    options.update(kind=args.kind, data=args.data, image_size=args.image_size, channels=args.channels,
                   score_model=args.score_model, score_config=args.score_config, score_flag=args.score_flag,
                   steps=args.iterations, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                   anneal_lr=args.anneal_lr, seed=args.seed, save_every=args.save_interval,
                   log_every=args.log_interval, num_workers=args.workers, eval_times=args.eval_times,
                   eval_images=args.eval_images)
    try:
        summary = train(resume=args.resume, out=args.out, device=device, keep=args.keep,
                        progress=False if args.no_progress else None, export=args.export, **options)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"diffaug {NAME}: {e}")
    return 130 if summary["interrupted"] else 0
