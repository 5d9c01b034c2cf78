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

Resume: a row is appended and fsync'ed per image. A rerun reads each log, drops a partial last line (a kill
mid-write), skips the indices already there and appends the rest; a log with rows whose sidecar holds other
settings (or is missing) is refused in one line before anything runs, and the score model loads before any file
is written (a log without rows starts afresh). --device, --backend, --compile and --threads change how the rows
are computed (up to float rounding), not what they estimate, and are not settings. Ctrl-C finishes the image at
hand and stops (exit 130); rerunning the same command continues.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import struct
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..certify import ABSTAIN, DenoisedSmoothing, certified_accuracy, dds_timestep
from ..data.eval_sets import DatasetSpec, build_dataset, check_channels, label_map, parse_datasets
from ..models.classifier import load_classifier
from ..models.score import DEFAULT_WEIGHTS, MAX_T, read_metadata, resolve_score_model
from ..robustness import dataset_identity, file_identity, in_channels, restrict_logits, safe_name
from ..schedule import NoiseSchedule
from ..utils import Progress, StopRequest, UsageError, write_json
from .evaluate import parse_classifiers, pick_image_size
from .options import check_device, positive, positive_float, probability, seed

NAME = "certify"
HELP = "certified L2 robustness by diffusion denoised smoothing (DDS), resumable logs and the paper's table"
DESCRIPTION = ("Certified accuracy at L2 radii of train_classifier checkpoints smoothed through the score model "
               "(Carlini et al. 2023, on Cohen et al.'s CERTIFY): one resumable log per classifier x sigma in "
               "locuslab/smoothing's columns, then the table (per sigma and best over sigmas), summary.json and "
               "a plot, all computed from the logs.")

RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # the paper's table columns
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
HEADER = "\t".join(COLUMNS) + "\n"
LOG_FORMAT = "diffaug_kernels.certify_log.v1"
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
    p.add_argument("--max", type=positive, default=None, help="certify at most this many images (default: all)")
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
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="the score model's autocast dtype (bfloat16 is the fast one on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the score model (CUDA graphs on CUDA)")
    p.add_argument("--backend", default="auto", choices=("auto",) + tuple(ops.BACKENDS),
                   help="backend of the fused noise and Tweedie ops")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per image instead)")


# ------------------------------------------------------------------------------------------------ seeds
def image_seed(seed: int, idx: int, sigma: float) -> int:
    """The Philox key of one image's certification: a hash of (seed, dataset index, sigma's float64 bits) only,
    so it is the same in a resumed run, for every classifier, and whatever else the run certifies."""
    bits = struct.unpack("<Q", struct.pack("<d", float(sigma)))[0]
    return int(np.random.SeedSequence([int(seed), int(idx), bits]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------------------------------ logs
def log_paths(out: str, classifier: str, sigma: float) -> Tuple[str, str]:
    """(log, sidecar) of one classifier x sigma."""
    stem = os.path.join(out, f"{safe_name(classifier)}__sigma_{float(sigma)!r}")
    return stem + ".tsv", stem + ".json"


def format_row(idx: int, label: int, predict: int, radius: float, seconds: float) -> str:
    correct = int(predict != ABSTAIN and predict == label)
    return (f"{int(idx)}\t{int(label)}\t{int(predict)}\t{float(radius)!r}\t{correct}\t"
            f"{datetime.timedelta(seconds=seconds)}\n")


def read_log(path: str) -> Tuple[List[tuple], int]:
    """(rows, whole) of a log: rows as (idx, label, predict, radius, correct, time) tuples, whole the byte length
    of its complete lines; a last line without its newline (a run killed mid-write) is left out of both, and so
    is a partial header. UsageError for anything else that is not a row."""
    with open(path, "rb") as f:
        data = f.read()
    whole = data.rfind(b"\n") + 1
    lines = data[:whole].decode("utf-8", errors="replace").splitlines()
    if not lines and HEADER.encode().startswith(data):  # empty, or a header cut short
        return [], 0
    if not lines or lines[0] + "\n" != HEADER:
        raise UsageError(f"{path} is not a certify log (its first line is not {HEADER.strip()!r}); move it away or "
                         f"give another --out")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        try:
            if len(parts) != len(COLUMNS):
                raise ValueError
            idx, label, predict, correct = (int(parts[i]) for i in (0, 1, 2, 4))
            radius = float(parts[3])
            if idx < 0 or correct not in (0, 1) or not radius >= 0 or math.isinf(radius):
                raise ValueError
        except ValueError:
            raise UsageError(f"{path}, line {n}, is not a row of {len(COLUMNS)} tab-separated columns "
                             f"{', '.join(COLUMNS)}: {line[:120]!r}") from None
        rows.append((idx, label, predict, radius, correct, parts[5]))
    return rows, whole


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def check_log(path: str, sidecar: str, settings: dict, allowed: Sequence[int]) -> List[tuple]:
    """The rows of a log made with these settings; none for a missing log or one without rows (which prepare_log
    starts afresh, with these settings). UsageError, in one line, for a file that is not a certify log, a log with
    rows made with other settings or without its sidecar, or rows at indices these settings never take or twice.
    Nothing is written."""
    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):
        raise UsageError(f"{path} is not a file; move it away or give another --out")
    rows, _ = read_log(path)
    if not rows:  # a header, or a kill before the first row: nothing to keep or to contradict
        return []
    meta = _read_json(sidecar)
    if not isinstance(meta, dict) or meta.get("format") != LOG_FORMAT or not isinstance(meta.get("settings"), dict):
        raise UsageError(f"{path} has no readable settings file {os.path.basename(sidecar)} beside it, so it cannot "
                         f"be continued; move it away or give another --out")
    old, new = meta["settings"], _jsonable(settings)
    if old != new:
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        said = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diff[:3])
        raise UsageError(f"{path} was written with other settings ({said}{'; ...' if len(diff) > 3 else ''}); "
                         f"rerun with its settings, or give another --out")
    seen, ok = set(), set(allowed)
    for r in rows:
        if r[0] not in ok or r[0] in seen:
            why = "twice" if r[0] in seen else "which these settings never take"
            raise UsageError(f"{path} holds a row for image {r[0]} {why}; the log was edited: move it away")
        seen.add(r[0])
    return rows


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def prepare_log(path: str, sidecar: str, settings: dict, t: int) -> None:
    """Makes a log that check_log accepted ready for appending: one with rows loses a partial last line (a kill
    mid-write); a new one, or one without rows, gets its sidecar and then its header (in that order, so a log
    never has rows without the settings they were made with)."""
    if os.path.exists(path):
        rows, whole = read_log(path)
        if rows:
            if whole != os.path.getsize(path):
                with open(path, "r+b") as f:
                    f.truncate(whole)
                    os.fsync(f.fileno())
            return
    write_json({"format": LOG_FORMAT, "settings": _jsonable(settings), "t": t}, sidecar)
    with open(path, "w") as f:
        f.write(HEADER)
        f.flush()
        os.fsync(f.fileno())


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
            rows, _ = read_log(path) if os.path.isfile(path) else ([], 0)
            got = {}
            for r in rows:
                if r[0] in want:
                    got.setdefault(r[0], r)
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
            rows = {r[0]: r for r in (read_log(p)[0] if os.path.isfile(p) else []) if r[0] in want}
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
    tally = _Tally()
    try:
        return _main(args, tally)
    except (FileNotFoundError, UsageError) as e:
        raise SystemExit(f"diffaug certify: error: {e}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: the rows written so far are whole (each one is fsync'ed)
        print(f"\ndiffaug certify: interrupted; {_saved(tally, args.out)}", file=sys.stderr)
        return 130


def _saved(tally: _Tally, out: str) -> str:
    if not tally.total:
        return "nothing certified yet"
    return (f"{tally.saved} of {tally.total} rows are saved in {out}/; rerunning the same command continues from "
            f"them")


def _main(args, tally: _Tally) -> int:
    # every option is checked before a model loads: a bad one is one line, no traceback
    device = check_device("certify", args.device)
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
              "alpha": args.alpha, "seed": args.seed, "skip": args.skip, "batch": args.batch, "dtype": args.dtype}
    jobs, logs = [], {}
    for (cname, _), cspec in zip(classifiers, cspecs):
        for s in args.sigma:
            path, sidecar = log_paths(args.out, cname, s)
            settings = {"classifier": file_identity(cspec.path), "sigma": s, **common}
            rows = check_log(path, sidecar, settings, every)
            done = {r[0] for r in rows}
            jobs.append((cname, s, path, sidecar, settings, [i for i in indices if i not in done]))
            logs.setdefault(cname, {})[s] = path
            tally.saved += len(done & set(indices))
    tally.total = len(jobs) * len(indices)
    # the score model, when there is work, before any file is written: a flag it refuses leaves no log behind
    score = load_score(args, dspec, channels, size, schedule, device) if any(j[5] for j in jobs) else None
    for cname, s, path, sidecar, settings, _ in jobs:  # all logs checked first: a refusal leaves every file as is
        prepare_log(path, sidecar, settings, times[s])
    if score is not None and _certify(args, device, classifiers, maps, dataset, jobs, score, tally):
        print(f"diffaug certify: stopped; {_saved(tally, args.out)}", file=sys.stderr)
        return 130

    what = f"{len(indices)} images of {dspec.name}" + (
        f" (indices 0, {args.skip}, {2 * args.skip}, ...)" if args.skip > 1 and len(indices) > 1 else "")
    title = f"DDS certification: N0={args.N0}, N={args.N}, alpha={args.alpha:g}, {what}"
    summary = summarize(logs, indices)
    table = format_table(summary, title)
    summary.update(title=title, settings=_jsonable(common), t={repr(s): t for s, t in times.items()}, table=table)
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


def _certify(args, device, classifiers, maps, dataset, jobs, score, tally: _Tally) -> bool:
    """Certifies every image each job still lacks, one fsync'ed row each; True when Ctrl-C stopped it."""
    model, schedule = score
    clfs = dict(classifiers)
    done = tally.saved
    bar = Progress(tally.total, initial=done, desc="certify", unit="img", bar=False if args.no_progress else None)
    try:
        with StopRequest("finishing this image, then stopping") as stop:
            for cname, sigma, path, _, _, todo in jobs:
                if not todo:
                    continue
                nc, lmap, allowed = maps[cname]
                clf = clfs[cname] if allowed is None else _Restricted(clfs[cname], allowed)
                try:
                    smooth = DenoisedSmoothing(clf, model, schedule, sigma, nc, prediction=getattr(
                        model, "prediction", "eps"), dtype=DTYPES[args.dtype], compile=args.compile,
                        backend=args.backend)
                except ValueError as e:
                    raise UsageError(f"--sigma {sigma:g}: {e}") from None
                bar.write(f"[{cname} | sigma {sigma:g}, t = {smooth.t}] {len(todo)} images to certify -> {path}")
                with open(path, "a") as log:
                    for idx in todo:
                        x, y = dataset[idx]
                        label = int(y) if lmap is None else int(lmap[int(y)])
                        t0 = time.time()
                        predict, radius = smooth.certify(x.to(device), args.N0, args.N, args.alpha, args.batch,
                                                         seed=image_seed(args.seed, idx, sigma))
                        row = format_row(idx, label, predict, radius, time.time() - t0)
                        log.write(row)
                        log.flush()
                        os.fsync(log.fileno())
                        tally.saved += 1
                        bar.update(1, clf=cname, sigma=f"{sigma:g}")
                        if bar.bar is None:
                            bar.write(f"[{cname} | sigma {sigma:g}] " + "  ".join(
                                f"{k} {v}" for k, v in zip(COLUMNS, row.rstrip("\n").split("\t"))))
                        if stop.requested:
                            return True
    finally:
        bar.close()
    return False
