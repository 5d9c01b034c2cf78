"""Certified L2 robustness by diffusion denoised smoothing (DDS; Carlini et al., "(Certified!!) Adversarial
Robustness for Free!", ICLR 2023): train_classifier checkpoints behind one Tweedie step of the score model,
certified by Cohen et al.'s CERTIFY (dk.certify.DenoisedSmoothing), the paper's table at the end.

    python -m diffaug_kernels certify --classifier runs/digits/checkpoint.pt --sigma 0.25,0.5,1.0 \\
        --N0 100 --N 10000 --skip 10 --dataset digits --out certify_out

Files in --out:

* ``<classifier>__sigma_<sigma>.tsv``, one log per classifier x sigma, in the columns of locuslab/smoothing's and
  ethz-spylab/diffusion_denoised_smoothing's certify.py: tab-separated under the header line
  ``idx label predict radius correct time``. idx is the dataset index; label the true class as the classifier's
  index; predict the smoothed prediction (-1: abstain); radius the certified L2 radius in [0, 1] pixel units as
  the float's repr (full precision); correct 1 or 0 (an abstention is 0); time the image's wall time as
  str(datetime.timedelta), h:mm:ss.ffffff, as locuslab writes it. Their analysis scripts read the file as is.
* ``<classifier>__sigma_<sigma>.json``, the log's sidecar: {"format", "settings", "t"}; settings are what the
  rows depend on (classifier and score-model identity, dataset, image size, sigma, N0, N, alpha, seed, skip,
  batch, dtype); t is the diffusion time the sigma runs at (information only).
* ``table.txt`` and ``summary.json``: certified accuracy at radii 0.0, 0.5, ..., 3.0 per classifier, per sigma
  and the best over sigmas at each radius (as the paper reports it), always computed from the logs, so a rerun
  of a finished command recomputes them without certifying anything; ``certified_accuracy.png``: accuracy
  against radius as step curves, per classifier x sigma and each classifier's best-over-sigma envelope.

Images: dataset indices 0, skip, 2 * skip, ..., at most --max of them. Each image's noise comes from one Philox
key derived from (--seed, dataset index, sigma) only (image_seed), so a resumed run writes exactly the rows an
uninterrupted one would, and every classifier sees the same noise at a sigma.

Resume: a row is appended and fsync'ed per image, to the rank file ``<log>.rank<r>`` of the process that certified
it (rank 0 for a lone process), and merged into the log when the run ends or stops
(diffaug_kernels/commands/certify_log.py says why a kill at any point loses no row and doubles none). A rerun
reads each log with any rank files an earlier, killed run left (whatever its number of processes), drops partial
last lines (a kill mid-write), merges them into the log, skips the indices already there and certifies the rest; a
log with rows whose sidecar holds other settings (or is missing) is refused in one line before anything runs, and
the score model loads before any file is written (a log without rows starts afresh). --device, --backend,
--compile and --threads change how the rows are computed (up to float rounding), not what they estimate, and are
not settings. Ctrl-C finishes the image at hand and stops (exit 130); rerunning the same command continues.

Several processes (GPUs): torchrun runs the command as ``python -m`` does (torchrun's ``-m``)::

    torchrun --nproc_per_node=8 -m diffaug_kernels certify --classifier runs/in1k/checkpoint.pt \\
        --dataset /data/imagenet/val --score-model 256x256_diffusion_uncond.pt --score-config imagenet256_uncond \\
        --sigma 0.25,0.5,1.0 --skip 100 --max-images 500 --dtype bfloat16 --out certify_in1k

(--max-images is --max: torchrun reads every ``--max`` on its command line as an abbreviation of its own
--max-restarts, and refuses it.)

Every rank loads the classifiers, the data and the score model, rank r on cuda:LOCAL_RANK (gloo on CPU, nccl on
CUDA: diffaug_kernels/commands/distributed.py). Rank 0 alone reads and checks the logs and sidecars and merges
rank files left by an earlier run; an error on any rank stops every rank (a collective after each phase), said
once by rank 0. Of the indices a log still lacks, rank r certifies the r-th of every world_size
(todo[r::world_size]), so a resumed log is shared evenly too. The ranks go in steps of one image each and exchange
their new rows after each step: rank 0's progress counts every rank's rows (with --no-progress it prints each with
its rank), and a Ctrl-C (torchrun passes it to every rank) stops all ranks after the same step. At the end rank 0
merges the rank files into the log, sorted by index, and writes the table, summary.json and the plot: the same
rows, one per index, and the same numbers as one process writes (only the time column differs), since each image's
noise depends on (--seed, index, sigma) alone.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from types import SimpleNamespace
from typing import Dict, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..certify import ABSTAIN, DENOISERS, DenoisedSmoothing, certified_accuracy, dds_timestep
from ..data.eval_sets import DatasetSpec, build_dataset, check_channels, label_map, parse_datasets
from ..models.classifier import load_classifier
from ..models.score import DEFAULT_WEIGHTS, MAX_T, read_metadata, resolve_score_model
from ..robustness import dataset_identity, file_identity, in_channels, restrict_logits
from ..schedule import NoiseSchedule
from ..utils import Progress, StopRequest, UsageError, write_json
from .certify_log import (
    COLUMNS,
    append_row,
    check_log,
    format_row,
    jsonable,
    log_paths,
    merge_log,
    open_rank_log,
    prepare_log,
    summary_rows,
)
from .distributed import DistInfo, Relayed, all_gather_object, close_distributed, init_distributed, together
from .evaluate import parse_classifiers, pick_image_size
from .options import check_device, positive, positive_float, probability, seed

NAME = "certify"
HELP = "certified L2 robustness by diffusion denoised smoothing (DDS), resumable logs and the paper's table"
DESCRIPTION = ("Certified accuracy at L2 radii of train_classifier checkpoints smoothed through the score model "
               "(Carlini et al. 2023, on Cohen et al.'s CERTIFY): one resumable log per classifier x sigma in "
               "locuslab/smoothing's columns, then the table (per sigma and best over sigmas), summary.json and "
               "a plot, all computed from the logs.")

RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # the paper's table columns
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ options
def sigma_list(s: str) -> tuple:
    """A comma list of distinct finite sigmas > 0, in the order given."""
    out = []
    for part in s.split(","):
        if not part.strip():
            continue
        v = positive_float(part)  # its ArgumentTypeError names the value
        if v in out:
            raise argparse.ArgumentTypeError(f"sigma {part.strip()} is listed twice in {s!r}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"no sigma in {s!r}: give e.g. 0.25,0.5,1.0")
    return tuple(out)


def add_arguments(p) -> None:
    p.add_argument("--classifier", action="append", required=True, metavar="[NAME=]PATH",
                   help="a train_classifier checkpoint (repeatable; its logs and table rows are named NAME, or the "
                        "checkpoint's folder)")
    p.add_argument("--dataset", default="digits",
                   help="one data set, as evaluate's --datasets names it: digits, digits-c:<corruption>:<sev>, "
                        "cifar10:<root>, cifar10-c:<root>:<corruption>:<sev>, or an ImageFolder path")
    p.add_argument("--sigma", type=sigma_list, default="0.25,0.5,1.0",
                   help="comma list of smoothing noise levels in [0, 1] pixel units; one log per classifier x sigma")
    p.add_argument("--N0", dest="N0", type=positive, default=100,
                   help="noise draws that select the top class (CERTIFY's n0)")
    p.add_argument("--N", dest="N", type=positive, default=10000,
                   help="noise draws that bound the top class's probability (CERTIFY's n)")
    p.add_argument("--alpha", type=probability, default=0.001,
                   help="failure probability: each radius holds with probability at least 1 - alpha")
    p.add_argument("--batch", type=positive, default=200, help="noise draws per model call")
    p.add_argument("--skip", type=positive, default=1,
                   help="certify every skip-th image of the data set (indices 0, skip, 2 * skip, ...)")
    p.add_argument("--max", "--max-images", dest="max", type=positive, default=None,
                   help="certify at most this many images (default: all); under torchrun write --max-images, since "
                        "torchrun's own parser takes --max for an abbreviation of its --max-restarts")
    p.add_argument("--score-model", default="default",
                   help="'default' (the shipped digits model; the default), a train-score .safetensors export, a "
                        "guided-diffusion checkpoint with --score-config/--score-flag, or 'random' (tests only; "
                        "its weights follow --seed)")
    p.add_argument("--score-config", default=None, help="ADM_CONFIGS name for a checkpoint (e.g. imagenet256_uncond)")
    p.add_argument("--score-flag", action="append", default=[], metavar="KEY=VALUE",
                   help="guided-diffusion create_model flag (repeatable)")
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine"),
                   help="noise schedule (1000 steps) of a checkpoint without one")
    p.add_argument("--image-size", type=positive, default=None,
                   help="size the digits and ImageFolder sets are made at (CIFAR-10 stays 32); default: the size "
                        "the classifiers were trained at, else 32 for digits / CIFAR-10 sets and 224 otherwise")
    p.add_argument("--out", required=True, help="folder of the logs, table.txt, summary.json and the plot")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the noise; each image's derives from it, its index and sigma (default 0)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda[:i] (default auto: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="the score model's autocast dtype (bfloat16 is the fast one on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the score model (CUDA graphs on CUDA)")
    p.add_argument("--backend", default="auto", choices=("auto",) + tuple(ops.BACKENDS),
                   help="backend of the fused noise and Tweedie ops")
    p.add_argument("--denoiser", default="one-step", choices=DENOISERS,
                   help="one-step: one Tweedie step (DDS's default); multistep: DDS's ancestral chain from t* "
                        "(t* model calls per noise sample)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per image instead)")


# ------------------------------------------------------------------------------------------------ seeds
def image_seed(seed: int, idx: int, sigma: float) -> int:
    """The Philox key of one image's certification: a hash of (seed, dataset index, sigma's float64 bits) only,
    so it is the same in a resumed run, for every classifier, and whatever else the run certifies."""
    bits = struct.unpack("<Q", struct.pack("<d", float(sigma)))[0]
    return int(np.random.SeedSequence([int(seed), int(idx), bits]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------------------------------ summary
def summarize(logs: Dict[str, Dict[float, str]], indices: Sequence[int], radii: Sequence[float] = RADII) -> dict:
    """Certified accuracy at each radius from the logs: logs {classifier: {sigma: path}}; only the rows of the
    given dataset indices count, each once, an abstention as wrong. Per classifier: per sigma the accuracies,
    images, correct (at radius 0), abstentions and missing (indices without a row); 'best': the max over sigmas
    at each radius and the sigma that gives it (the first listed on a tie)."""
    want = set(int(i) for i in indices)
    res = {"radii": [float(r) for r in radii], "images": len(want), "classifiers": {}}
    for name, by_sigma in logs.items():
        per = {}
        for sigma, path in by_sigma.items():
            got = summary_rows(path, want)
            rad = [r[3] for r in got.values()]
            ok = [bool(r[4]) and r[2] != ABSTAIN for r in got.values()]
            per[repr(float(sigma))] = {
                "log": path, "images": len(got), "missing": len(want) - len(got), "correct": int(sum(ok)),
                "abstentions": sum(r[2] == ABSTAIN for r in got.values()),
                "certified_accuracy": certified_accuracy(rad, ok, radii) if got else [None] * len(radii)}
        best, best_sigma = [], []
        for k in range(len(radii)):
            cands = [(v["certified_accuracy"][k], s) for s, v in per.items() if v["certified_accuracy"][k] is not None]
            top = max(cands, key=lambda c: c[0], default=(None, None))
            best.append(top[0])
            best_sigma.append(None if top[1] is None else float(top[1]))
        res["classifiers"][name] = {"sigmas": per, "best": {"certified_accuracy": best, "sigma": best_sigma}}
    return res


def format_table(summary: dict, title: str = "") -> str:
    """The paper's table: certified accuracy (%) per classifier x sigma and the best over sigmas, one column per
    radius."""
    radii = summary["radii"]
    rows = []
    for name, c in summary["classifiers"].items():
        for s, v in c["sigmas"].items():
            rows.append((name, s, v["certified_accuracy"]))
        if len(c["sigmas"]) > 1:
            rows.append((name, "best", c["best"]["certified_accuracy"]))
    w = max([len("classifier")] + [len(r[0]) for r in rows])
    ws = max([len("sigma")] + [len(r[1]) for r in rows])
    head = f"{'classifier':<{w}}  {'sigma':<{ws}}" + "".join(f"{r:>7.1f}" for r in radii)
    lines = [title] if title else []
    lines += ["certified accuracy (%) at L2 radius (an abstention counts as wrong)", head, "-" * len(head)]
    for name, s, acc in rows:
        lines.append(f"{name:<{w}}  {s:<{ws}}" + "".join("      -" if a is None else f"{100 * a:>7.1f}" for a in acc))
    return "\n".join(lines)


def plot_curves(logs: Dict[str, Dict[float, str]], indices: Sequence[int], path: str, title: str = "") -> str:
    """Certified accuracy against radius from the logs as step curves (evaluated just before and at every radius
    a correct row reaches, and on a fine grid): one line per classifier x sigma, plus each classifier's best over
    sigmas (the pointwise max) when it has several."""
    from ..bench import plots

    want = set(int(i) for i in indices)
    data = {}
    for name, by_sigma in logs.items():
        for sigma, p in by_sigma.items():
            rows = summary_rows(p, want)
            if rows:
                data[(name, sigma)] = (np.array([r[3] for r in rows.values()]),
                                       np.array([bool(r[4]) and r[2] != ABSTAIN for r in rows.values()]))
    if not data:
        raise UsageError("no rows to plot")
    top = max([float(rad[ok].max()) for rad, ok in data.values() if ok.any()], default=0.0)
    hi = max(top, 0.5) * 1.05
    edges = np.array(sorted({float(r) for rad, ok in data.values() for r in rad[ok]}))
    grid = np.unique(np.concatenate([np.linspace(0.0, hi, 401), edges, np.nextafter(edges, np.inf)]))
    grid = grid[grid <= hi]
    curves = {k: np.array(certified_accuracy(rad, ok, grid)) * 100 for k, (rad, ok) in data.items()}
    series = {}
    for name in logs:
        mine = [(s, c) for (n, s), c in curves.items() if n == name]
        for s, c in mine:
            series[f"{name} s={s:g}" if len(logs) > 1 else f"sigma {s:g}"] = (grid, c)
        if len(mine) > 1:
            series[f"{name} best" if len(logs) > 1 else "best sigma"] = (grid, np.max([c for _, c in mine], 0))
    return plots.plot_lines(series, path, title=title or "certified accuracy", xlabel="L2 radius",
                            ylabel="certified accuracy (%)", marker=None)


# ------------------------------------------------------------------------------------------------ the run
class _Restricted(nn.Module):
    """A classifier whose logits outside `allowed` are -inf (a data set with a subset of ImageNet's classes)."""

    def __init__(self, clf: nn.Module, allowed: Tensor):
        super().__init__()
        self.clf, self.allowed = clf, allowed

    def forward(self, x: Tensor) -> Tensor:
        return restrict_logits(self.clf(x), self.allowed)


def early_schedule(spec: str, config, flags, name: str) -> NoiseSchedule:
    """The schedule the score model will run on, from its file's metadata alone (nothing else is read): the
    shipped default's and an export's; otherwise --schedule's 1000 steps, which resolve_score_model's callers
    use. A file that cannot tell falls back to --schedule; its loader reports what is wrong with it later."""
    path = DEFAULT_WEIGHTS if spec == "default" else spec
    if spec == "default" or (str(spec).endswith(".safetensors") and os.path.isfile(spec) and config is None
                             and not flags):
        try:
            meta = read_metadata(path)
        except (ValueError, OSError):
            meta = {}
        s = meta.get("schedule") if "config" in meta else None  # without a config it loads as a checkpoint
        T = s.get("T") if isinstance(s, dict) else None
        if (isinstance(s, dict) and s.get("name") in ("linear", "cosine") and isinstance(T, int)
                and not isinstance(T, bool) and 1 <= T <= MAX_T):  # as load_score_model reads it
            return getattr(NoiseSchedule, s["name"])(T)
    return getattr(NoiseSchedule, name)(1000)


def score_identity(args, schedule: NoiseSchedule) -> dict:
    spec = args.score_model
    return {"spec": file_identity(spec) if os.path.isfile(spec) else spec, "config": args.score_config,
            "flags": list(args.score_flag or ()), "schedule": repr(schedule),
            "seed": args.seed if spec == "random" else None}


def _check_paths(ds: DatasetSpec) -> None:
    """A data set's root must exist now, before any model loads (parse_datasets checks only some kinds)."""
    if ds.kind in ("cifar10", "cifar10-c", "folder") and ds.args and not os.path.exists(ds.args[0]):
        what = {"cifar10": "CIFAR-10 folder", "cifar10-c": "CIFAR-10-C folder", "folder": "ImageFolder tree"}
        raise FileNotFoundError(f"{what[ds.kind]} not found at {ds.args[0]!r} (--dataset; nothing is downloaded)")


class _Tally:
    """Rows on disk, for the message of an interrupted run."""

    def __init__(self):
        self.saved = self.total = 0


def main(args) -> int:
    tally, info = _Tally(), None
    try:
        device = check_device("certify", args.device)
        info = init_distributed(str(device) if device.index is not None else device.type)
        return _main(args, info, tally)
    except (FileNotFoundError, UsageError) as e:
        if info is not None and not info.is_main and isinstance(e, Relayed):
            raise SystemExit(1) from None  # rank 0 prints it once
        raise SystemExit(f"diffaug certify: error: {e}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: the rows written so far are whole (each one is fsync'ed)
        if info is None or info.is_main:
            print(f"\ndiffaug certify: interrupted; {_saved(tally, args.out)}", file=sys.stderr)
        return 130
    finally:
        if info is not None:
            close_distributed(info)


def _saved(tally: _Tally, out: str) -> str:
    if not tally.total:
        return "nothing certified yet"
    return (f"{tally.saved} of {tally.total} rows are saved in {out}/; rerunning the same command continues from "
            f"them")


def _setup(args, device) -> SimpleNamespace:
    """Every option checked, the classifiers loaded and the images and logs decided; the same on every rank.
    Nothing is written but the --out folder."""
    # every option is checked before a model loads: a bad one is one line, no traceback
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder for the logs")
    cspecs = parse_classifiers(args.classifier)
    dsets = parse_datasets([args.dataset])
    if len(dsets) != 1:
        raise UsageError(f"--dataset {args.dataset!r} names {len(dsets)} data sets "
                         f"({', '.join(d.name for d in dsets[:3])}{', ...' if len(dsets) > 3 else ''}); give one")
    (dspec,) = dsets
    _check_paths(dspec)
    schedule = early_schedule(args.score_model, args.score_config, args.score_flag, args.schedule)
    times = {}
    for s in args.sigma:
        try:
            times[s] = dds_timestep(schedule, s)
        except ValueError as e:
            raise UsageError(f"--sigma {s:g}: {e}") from None
    try:
        os.makedirs(args.out, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--out {args.out} lies under a file; give a folder for the logs") from None
    if args.threads:
        torch.set_num_threads(args.threads)

    # the classifiers (small) and the data decide the images and the logs; the score model loads only for work
    classifiers = [(c.name, load_classifier(c.path, device)) for c in cspecs]
    chans = {in_channels(c) for _, c in classifiers}
    if len(chans) != 1:
        raise UsageError(f"the classifiers take different numbers of input channels {sorted(chans)}; one score "
                         f"model serves them all")
    channels = chans.pop()
    check_channels(dspec, channels)
    size = 32 if dspec.kind in ("cifar10", "cifar10-c") else pick_image_size(args.image_size, classifiers, [dspec])
    dataset = build_dataset(dspec, size, channels, args.seed)
    every = list(range(0, len(dataset), args.skip))
    indices = every[:args.max] if args.max else every
    if not indices:
        raise UsageError(f"--dataset {args.dataset!r} has no images")
    maps = {}
    for name, clf in classifiers:
        nc = int(getattr(getattr(clf, "net", clf), "num_classes", 0) or 0)
        maps[name] = (nc, *label_map(dataset, nc))
        labels = getattr(dataset, "tensors", None)
        if maps[name][1] is None and labels is not None and int(labels[1].max()) >= nc:
            raise UsageError(f"classifier {name!r} has {nc} classes, but the labels of {dspec.name} reach "
                             f"{int(labels[1].max())}")
    common = {"score_model": score_identity(args, schedule),
              "dataset": [*dataset_identity(dspec), size, channels], "N0": args.N0, "N": args.N,
              "alpha": args.alpha, "seed": args.seed, "skip": args.skip, "batch": args.batch, "dtype": args.dtype,
              # only when not the default, so logs written before the option existed still continue
              **({"denoiser": args.denoiser} if args.denoiser != "one-step" else {})}
    jobs = []  # (classifier, sigma, log, sidecar, settings)
    for (cname, _), cspec in zip(classifiers, cspecs):
        for s in args.sigma:
            path, sidecar = log_paths(args.out, cname, s)
            jobs.append((cname, s, path, sidecar, {"classifier": file_identity(cspec.path), "sigma": s, **common}))
    return SimpleNamespace(dspec=dspec, schedule=schedule, times=times, classifiers=classifiers, channels=channels,
                           size=size, dataset=dataset, every=every, indices=indices, maps=maps, common=common,
                           jobs=jobs)


def _plan(run: SimpleNamespace) -> dict:
    """Rank 0's reading of the logs (rank files of an earlier run included): the indices each job still lacks and
    the rows already there. Nothing is written."""
    todo, saved, want = [], 0, set(run.indices)
    for _, _, path, sidecar, settings in run.jobs:
        done = {r[0] for r in check_log(path, sidecar, settings, run.every)}
        todo.append([i for i in run.indices if i not in done])
        saved += len(done & want)
    return {"todo": todo, "saved": saved}


def _main(args, info: DistInfo, tally: _Tally) -> int:
    run = together(info, lambda: _setup(args, info.device))
    plan = together(info, lambda: _plan(run), main_only=True, share=True)
    jobs = [(*job, todo) for job, todo in zip(run.jobs, plan["todo"])]
    tally.saved, tally.total = plan["saved"], len(jobs) * len(run.indices)
    # the score model, when there is work, before any file is written: a flag it refuses leaves no log behind
    score = None
    if any(j[5] for j in jobs):
        score = together(info, lambda: load_score(args, run.dspec, run.channels, run.size, run.schedule,
                                                   info.device))

    def prepare():  # all logs checked first: a refusal leaves every file as is
        for _, s, path, sidecar, settings, _ in jobs:
            prepare_log(path, sidecar, settings, run.times[s], run.every)

    together(info, prepare, main_only=True)
    stopped = score is not None and _certify(args, info, run, jobs, score, tally)
    together(info, lambda: [merge_log(j[2], run.every) for j in jobs], main_only=True)  # every rank's rows
    if stopped:
        if info.is_main:
            print(f"diffaug certify: stopped; {_saved(tally, args.out)}", file=sys.stderr)
        return 130
    if not info.is_main:
        return 0

    logs = {}
    for cname, s, path, *_ in jobs:
        logs.setdefault(cname, {})[s] = path
    indices, dspec = run.indices, run.dspec
    what = f"{len(indices)} images of {dspec.name}" + (
        f" (indices 0, {args.skip}, {2 * args.skip}, ...)" if args.skip > 1 and len(indices) > 1 else "")
    title = f"DDS certification: N0={args.N0}, N={args.N}, alpha={args.alpha:g}, {what}"
    summary = summarize(logs, indices)
    table = format_table(summary, title)
    summary.update(title=title, settings=jsonable(run.common), t={repr(s): t for s, t in run.times.items()},
                   table=table)
    write_json(summary, os.path.join(args.out, "summary.json"))
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    png = plot_curves(logs, indices, os.path.join(args.out, "certified_accuracy.png"), title=f"{dspec.name}, DDS")
    print(table)
    print(f"logs, table.txt, summary.json and {os.path.basename(png)} in {args.out}/")
    return 0


def load_score(args, dspec: DatasetSpec, channels: int, size: int, early: NoiseSchedule, device):
    """(score model on device, its schedule), checked against the images and the schedule the options were
    checked with."""
    torch.manual_seed(args.seed)  # the 'random' test model's weights follow --seed
    hint = {"digits": "digits", "digits-c": "digits", "cifar10": "cifar10:", "cifar10-c": "cifar10:"}
    model, schedule = resolve_score_model(args.score_model, hint.get(dspec.kind, "folder"), args.score_config,
                                          args.score_flag, channels)
    if schedule is None:
        schedule = getattr(NoiseSchedule, args.schedule)(1000)
    want = getattr(model, "in_channels", channels)
    if want != channels:
        raise UsageError(f"the classifiers take {channels}-channel images but the score model {want}")
    factor = getattr(model, "size_multiple", 1)
    if size % factor:
        raise UsageError(f"the score model halves the image {factor.bit_length() - 1} times, so the image size must "
                         f"be a multiple of {factor}, got {size} (--image-size)")
    if repr(schedule) != repr(early):  # early_schedule reads what the loaders read: a mismatch is a bug
        raise UsageError(f"the score model runs on {schedule!r}, but the options were checked against {early!r}")
    return model.to(device), schedule


def _certify(args, info: DistInfo, run: SimpleNamespace, jobs, score, tally: _Tally) -> bool:
    """Certifies every image each job still lacks, rank r the r-th of every world_size of them, one fsync'ed row
    each in its rank file; True when Ctrl-C stopped it. The ranks go in steps of one image each and share their
    rows after every step (rank 0 shows them all), so a Ctrl-C on any rank stops every rank after that step."""
    model, schedule = score
    clfs, W = dict(run.classifiers), info.world_size
    bar = Progress(tally.total, initial=tally.saved, desc="certify", unit="img",
                   bar=False if args.no_progress else None, quiet=not info.is_main)
    try:
        with StopRequest("finishing this image, then stopping") as stop:
            for cname, sigma, path, _, _, todo in jobs:
                if not todo:
                    continue
                nc, lmap, allowed = run.maps[cname]
                clf = clfs[cname] if allowed is None else _Restricted(clfs[cname], allowed)
                try:
                    smooth = DenoisedSmoothing(clf, model, schedule, sigma, nc, prediction=getattr(
                        model, "prediction", "eps"), dtype=DTYPES[args.dtype], compile=args.compile,
                        backend=args.backend, denoiser=args.denoiser)
                except ValueError as e:
                    raise UsageError(f"--sigma {sigma:g}: {e}") from None
                by = f" by {W} processes" if W > 1 else ""
                bar.write(f"[{cname} | sigma {sigma:g}, t = {smooth.t}] {len(todo)} images to certify{by} -> {path}")
                mine = todo[info.rank::W]
                log = open_rank_log(path, info.rank) if mine else None
                try:
                    for n in range(-(-len(todo) // W)):  # every rank takes as many steps, with or without an image
                        row = None
                        if n < len(mine):
                            idx = mine[n]
                            x, y = run.dataset[idx]
                            label = int(y) if lmap is None else int(lmap[int(y)])
                            t0 = time.time()
                            predict, radius = smooth.certify(x.to(info.device), args.N0, args.N, args.alpha,
                                                             args.batch, seed=image_seed(args.seed, idx, sigma))
                            row = format_row(idx, label, predict, radius, time.time() - t0)
                            append_row(log, row)
                        step = all_gather_object((row, stop.requested), info)
                        for r, (got, _) in enumerate(step):
                            if got is None:
                                continue
                            tally.saved += 1
                            bar.update(1, clf=cname, sigma=f"{sigma:g}")
                            if bar.bar is None:
                                who = f" | rank {r}" if W > 1 else ""
                                bar.write(f"[{cname} | sigma {sigma:g}{who}] " + "  ".join(
                                    f"{k} {v}" for k, v in zip(COLUMNS, got.rstrip("\n").split("\t"))))
                        if any(asked for _, asked in step):
                            return True
                finally:
                    if log is not None:
                        log.close()
    finally:
        bar.close()
    return False
