"""Robustness evaluation: classifiers x test-time modes {Default, DE, DDA, DDA-SE} x datasets, as in the DiffAug
paper's tables (rows: classifiers; columns: dataset x mode top-1 accuracy), plus OOD detection.

    python -m diffaug_kernels evaluate --classifier runs/digits-plain/checkpoint.pt \\
        --classifier runs/digits-diffaug/checkpoint.pt --datasets digits,digits-c:gaussian_noise:5 --out eval_out

Modes, results and OOD: dk.robustness (the harness this command drives); dataset specs: dk.data.eval_sets.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .. import dda as dda_mod
from ..augment import DiffAug
from ..data.eval_sets import DatasetSpec, check_channels, parse_datasets
from ..models.classifier import load_classifier
from ..models.score import resolve_score_model
from ..robustness import (
    EvalConfig,
    Shard,
    check_times,
    file_identity,
    in_channels,
    parse_modes,
    parse_times,
    run,
    safe_name,
)
from ..schedule import NoiseSchedule
from ..utils import UsageError
from .distributed import Relayed, all_gather_object, close_distributed, init_distributed, together
from .options import check_device, dda_scale, positive, seed

NAME = "evaluate"
HELP = "classifiers x modes (Default, DE, DDA, DDA-SE) x datasets, the paper's table"
DESCRIPTION = ("Top-1 accuracy of train_classifier checkpoints under Default, DiffAug-Ensemble, DDA and DDA-SE on "
               "digits(-C), CIFAR-10(-C) and ImageFolder sets (ImageNet, -C, -R, -Sketch, -A, -D); OOD detection "
               "(MSP, energy, ReAct, ASH-S, SCALE) with --ood-datasets. JSON per classifier x dataset in --out, "
               "resumable.")


def add_arguments(p) -> None:
    p.add_argument("--classifier", action="append", required=True, metavar="[NAME=]PATH",
                   help="a train_classifier checkpoint (repeatable; the table's row name is NAME, or the "
                        "checkpoint's folder)")
    p.add_argument("--datasets", default="digits",
                   help="comma list: digits, digits-c:<corruption|all>[:<sev>[:cifar|imagenet]], cifar10:<root>, "
                        "cifar10-c:<root>[:<corruption|all>[:<sev>]], imagenet-c:<root>[:<sev>], or ImageFolder "
                        "paths (ImageNet val, ImageNet-C <corruption>/<sev>, -R, -Sketch, -A, -D); default digits")
    p.add_argument("--modes", default="Default,DE,DDA,DDA-SE",
                   help="comma list of Default, DE, DDA, DDA-SE (default: all)")
    p.add_argument("--score-model", default=None,
                   help="'default' (the shipped digits model; the default), a train-score .safetensors export, a "
                        "guided-diffusion checkpoint with --score-config/--score-flag, or 'random' (tests only)")
    p.add_argument("--score-config", default=None, help="ADM_CONFIGS name for a checkpoint (e.g. imagenet256_uncond)")
    p.add_argument("--score-flag", action="append", default=[], metavar="KEY=VALUE",
                   help="guided-diffusion create_model flag (repeatable)")
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine"),
                   help="noise schedule of a checkpoint without one (default linear, 1000 steps)")
    p.add_argument("--batch-size", type=positive, default=64, help="images per batch (default 64)")
    p.add_argument("--max-images", type=positive, default=None, help="evaluate a fixed random subset of N images")
    p.add_argument("--dda-max-images", type=positive, default=None,
                   help="DDA / DDA-SE on a fixed random N of those (DDA costs ~150 model passes per image)")
    p.add_argument("--de-times", default="0:451:50",
                   help="DE times in [0, T) of the score model's schedule: '0,50,100' or start:stop:step "
                        "(default 0:451:50)")
    p.add_argument("--dda-steps", type=positive, default=100, help="DDA respaced steps, 2..T (default 100)")
    p.add_argument("--dda-depth", type=positive, default=50,
                   help="DDA depth N, 1..(--dda-steps - 1) (default 50)")
    p.add_argument("--dda-down", type=positive, default=4,
                   help="DDA low-pass factor D, at most the image size (default 4)")
    p.add_argument("--dda-scale", type=dda_scale, default="auto",
                   help="DDA guidance scale >= 0; 'auto' (default) = 6 * sqrt(C*H*W / (3*256*256))")
    p.add_argument("--image-size", type=positive, default=None,
                   help="size the digits and ImageFolder sets are made at (CIFAR-10 stays 32); default: the "
                        "size the classifiers were trained at, else 32 for digits / CIFAR-10 sets and 224 otherwise")
    p.add_argument("--ood-datasets", default=None, help="comma list of OOD datasets (same syntax as --datasets)")
    p.add_argument("--id-dataset", default=None, help="the in-distribution set for OOD (default: first of --datasets)")
    p.add_argument("--react-percentile", type=float, default=90.0,
                   help="ReAct's clip threshold: this percentile of the ID set's penultimate activations (default 90)")
    p.add_argument("--ash-percentile", type=float, default=90.0, help="ASH-S pruning percentile (default 90)")
    p.add_argument("--scale-percentile", type=float, default=85.0, help="SCALE percentile (default 85)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the DE and DDA noise and of the image subsets")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto: cuda when available)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="results folder (JSON per classifier x dataset; resumable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")



@dataclass
class ClassifierSpec:
    name: str
    path: str


def parse_classifiers(items: Sequence[str]) -> List[ClassifierSpec]:
    """'PATH' or 'NAME=PATH'; the name defaults to the checkpoint's folder (for .../checkpoint.pt) or file stem."""
    out = []
    for it in items:
        name, path = it.split("=", 1) if "=" in it and not os.path.exists(it) else (None, it)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--classifier checkpoint not found: {path!r}")
        if name is None:
            stem = os.path.splitext(os.path.basename(path))[0]
            name = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "checkpoint" else stem
        out.append(ClassifierSpec(name, path))
    names = [c.name for c in out]
    if len(set(names)) != len(names) or len({safe_name(n) for n in names}) != len(names):
        raise UsageError(f"classifier names must differ (also as file names: {[safe_name(n) for n in names]}), got "
                        f"{names}: use NAME=PATH")
    return out


def score_augment(spec, config, flags, schedule_name, data_hint: str, channels: Optional[int]):
    """The dk.DiffAug of a --score-model spec (dk.models.score.resolve_score_model; None: the shipped default),
    with the schedule its file carries, else schedule_name's 1000 steps."""
    if spec is None:
        spec = "default"
    model, schedule = resolve_score_model(spec, data_hint, config, flags, channels)
    if schedule is None:
        schedule = getattr(NoiseSchedule, schedule_name)(1000)
    return DiffAug(model, schedule, prediction=getattr(model, "prediction", "eps"))


def _percentile(v: float, flag: str, allow_100: bool = False) -> float:
    if not (0.0 <= v <= 100.0 if allow_100 else 0.0 <= v < 100.0):
        raise UsageError(f"{flag} must be in [0, 100{']' if allow_100 else ')'}, got {v}")
    return float(v)


_SMALL_KINDS = {"digits", "digits-c", "cifar10", "cifar10-c"}  # 32x32 sets; ImageFolder trees default to 224


def pick_image_size(given: Optional[int], classifiers, id_sets: Sequence[DatasetSpec], log=print) -> int:
    """The size the digits and ImageFolder sets are made at (CIFAR-10 stays 32x32): --image-size if given, else
    the size the classifiers were trained at (their checkpoints say), else 32 when every in-distribution set is
    digits or CIFAR-10 and 224 otherwise. OOD sets are made at the same size; they do not choose it."""
    trained = {n: getattr(c, "trained_image_size", None) for n, c in classifiers}
    known = {v for v in trained.values() if v}
    if given:
        off = {n: v for n, v in trained.items() if v and v != given}
        if off:
            log(f"note: --image-size {given}, but {off} were trained at other sizes")
        return given
    if len(known) > 1:
        raise UsageError(f"the classifiers were trained at different image sizes {trained}: give --image-size")
    if known:
        return known.pop()
    return 32 if {d.kind for d in id_sets} <= _SMALL_KINDS else 224


def _image_size(ds: DatasetSpec, size: int) -> int:
    return 32 if ds.kind in ("cifar10", "cifar10-c") else size


def _check_dda(steps: int, depth: int, down: int, sizes, T: Optional[int] = None) -> None:
    """The DDA options, through dk.dda's own checks, before any model or image is touched (T: the score model's
    schedule length once known; with it the respacing itself is checked)."""

    if steps < 2:
        raise UsageError(f"--dda-steps must be at least 2 (DDA noises to a respaced step and denoises from one "
                        f"below it), got {steps}")
    S = steps
    if T is not None:
        try:
            S = len(dda_mod.space_timesteps(T, steps))
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise UsageError("--dda-" + msg if msg.startswith(f"steps {steps}") else f"--dda-steps {steps}: {msg}") \
                from None
    try:
        dda_mod.check_int("--dda-depth", depth, 1, S - 1)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{e} (DDA's depth must stay below --dda-steps {steps})") from None
    small = min(sizes) if sizes else None
    if small is not None and down > small:
        raise UsageError(f"--dda-down {down} is larger than the images ({small}x{small}): nothing would be left "
                        f"after the low-pass resize")


def main(args) -> int:
    info = None
    try:
        device = check_device("evaluate", args.device)
        info = init_distributed(str(device) if device.index is not None else device.type)
        job = together(info, lambda: _setup(args, str(info.device), info.is_main))
        res = run(*job, shard=Shard(info.rank, info.world_size, lambda obj: all_gather_object(obj, info)))
    except (FileNotFoundError, UsageError) as e:
        if info is not None and not info.is_main and isinstance(e, Relayed):
            raise SystemExit(1) from None  # rank 0 says it
        raise SystemExit(f"diffaug evaluate: error: {e}") from None
    except KeyboardInterrupt:  # each result file is whole (written atomically), each finished batch is kept
        if info is None or info.is_main:
            print("\ndiffaug evaluate: interrupted; " + (
                f"the finished results are in {args.out}/ and the same command continues from them" if args.out
                else "nothing saved (no --out)"), file=sys.stderr)
        return 130
    finally:
        if info is not None:
            close_distributed(info)
    if not info.is_main:
        return 0
    print(res["table"])
    if args.out:
        print(f"results in {args.out}/ (summary.json, table.txt, one JSON per classifier x dataset)")
    return 0


def _setup(args, device: str, main: bool) -> tuple:
    """run()'s arguments: every option checked before a model is loaded or an image read (a bad one is one line,
    no traceback), then the classifiers and the score model loaded; the same on every rank."""
    if args.out:  # made now: a file in its place (or above it) is one line before any model loads
        try:
            os.makedirs(args.out, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"--out {args.out} is a file (or lies under one); give a folder for the results") \
                from None
    if args.threads:  # counts and sizes arrive checked by the parser (options.positive, options.dda_scale)
        torch.set_num_threads(args.threads)
    modes = parse_modes(args.modes)
    cspecs = parse_classifiers(args.classifier)
    dsets = parse_datasets(args.datasets.split(","))
    if not dsets:
        raise UsageError("--datasets is empty")
    oods = parse_datasets(args.ood_datasets.split(",")) if args.ood_datasets else []
    id_ds = None
    if args.id_dataset:
        ids = parse_datasets([args.id_dataset])
        if len(ids) != 1:  # "digits-c:all:3" and the like name several sets
            raise UsageError(f"--id-dataset {args.id_dataset!r} names {len(ids)} data sets "
                            f"({', '.join(d.name for d in ids[:4])}{', ...' if len(ids) > 4 else ''}); "
                            f"give exactly one")
        id_ds = ids[0]
    try:
        de_times = parse_times(args.de_times)
    except UsageError as e:
        raise UsageError(f"--de-times: {e}") from None
    batch_size, max_images, dda_max_images = args.batch_size, args.max_images, args.dda_max_images
    dda_steps, dda_depth, dda_down, image_size = args.dda_steps, args.dda_depth, args.dda_down, args.image_size
    dda_scale = None if args.dda_scale == "auto" else float(args.dda_scale)
    kinds = {d.kind for d in dsets + oods}
    small = kinds <= _SMALL_KINDS
    hint = "digits" if kinds <= {"digits", "digits-c"} else ("cifar10:" if small else "folder")
    need_dda = any(m in ("DDA", "DDA-SE") for m in modes)
    need_de = "DE" in modes or bool(oods)
    if need_dda:  # the sizes are known now only when given; else once the classifiers say theirs
        _check_dda(dda_steps, dda_depth, dda_down,
                   [_image_size(d, image_size) for d in dsets] if image_size else [])
    cfg = EvalConfig(modes=modes, batch_size=batch_size, max_images=max_images,
                     dda_max_images=dda_max_images, de_times=de_times,
                     dda_steps=dda_steps, dda_depth=dda_depth, dda_down=dda_down,
                     dda_scale=dda_scale, image_size=None, seed=args.seed,
                     device=device, progress=not args.no_progress,
                     react_percentile=_percentile(args.react_percentile, "--react-percentile", True),
                     ash_percentile=_percentile(args.ash_percentile, "--ash-percentile"),
                     scale_percentile=_percentile(args.scale_percentile, "--scale-percentile"))
    classifiers = []
    for c in cspecs:
        classifiers.append((c.name, load_classifier(c.path, device)))
    channels = in_channels(classifiers[0][1])
    check_channels(dsets[0], channels)  # depends on the classifier only: once, before the score model
    size = cfg.image_size = pick_image_size(image_size, classifiers, dsets + ([id_ds] if id_ds else []))
    if need_dda and not image_size:  # a given size was checked above
        _check_dda(dda_steps, dda_depth, dda_down, [_image_size(d, size) for d in dsets])
    need_score = any(m != "Default" for m in modes) or bool(oods)
    aug = None
    if need_score:
        aug = score_augment(args.score_model, args.score_config, args.score_flag, args.schedule, hint, channels)
        T = aug.schedule.num_timesteps
        factor = getattr(aug.model, "size_multiple", 1)
        odd = sorted({v for v in (_image_size(d, size) for d in dsets + oods) if v % factor})
        if odd:
            raise UsageError(f"the score model halves the image {factor.bit_length() - 1} times, so the image "
                            f"size must be a multiple of {factor}, got {odd} (--image-size)")
        if need_de:
            check_times(de_times, T)
        if need_dda:
            _check_dda(dda_steps, dda_depth, dda_down, [_image_size(d, size) for d in dsets], T)
        aug = aug.to(device)
    elif args.score_model and main:
        print("note: --score-model is unused with --modes Default and no OOD sets")
    if aug is not None:
        spec = args.score_model or "default"
        cfg.extra["score_model"] = {
            "spec": file_identity(spec) if os.path.isfile(spec) else spec, "config": args.score_config,
            "flags": list(args.score_flag or ()), "schedule": args.schedule}
    cfg.identities = {c.name: file_identity(c.path) for c in cspecs}
    return classifiers, aug, dsets, cfg, args.out, oods, id_ds
