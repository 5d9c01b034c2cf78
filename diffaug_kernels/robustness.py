"""The robustness evaluation harness: classifiers x test-time modes x data sets, as in the DiffAug paper's tables
(rows: classifiers; columns: dataset x mode top-1 accuracy), plus OOD detection. The evaluate command
(commands/evaluate.py) parses the options and calls run / run_ood.

Modes (names as in the paper's tables):

* ``Default``: softmax(f(x)).
* ``DE``: DiffAug-Ensemble, dk.diffaug_ensemble over ``--de-times`` (default 0, 50, ..., 450).
* ``DDA``: softmax(f(dk.dda.adapt(x))) with the published DDA settings (dk.dda.DDA_DEFAULTS: 100 respaced steps,
  depth 50, low-pass factor 4) except the guidance scale: DDA's 6 is for 3x256x256 images and the step per
  pixel shrinks like 1/sqrt(C*H*W) (see dk.dda.adapt), so ``--dda-scale auto`` (the default) uses
  6 * sqrt(C*H*W / (3*256*256)), the same per-pixel step; at 256x256 RGB that is exactly 6.
* ``DDA-SE``: the mean of the DDA and Default softmax (one adaptation serves DDA and DDA-SE).

Data sets: dk.data.eval_sets.

Results: ``--out DIR`` gets one JSON per (classifier, dataset) as it finishes (``<classifier>__<dataset>.json``,
with the accuracies, image counts per mode, settings and time); a re-run skips the pairs whose file already holds
every requested mode with the same settings (and computes only the missing modes otherwise), so an interrupted
evaluation resumes; inside a dataset, the batches finished so far are kept in ``<dataset>.batches.rank<r>``
(dk.utils.Journal) until its results are written, so a kill loses at most a batch. Under torchrun (a Shard) each
rank takes every world_size-th of a dataset's batches still to do, and the files are those of one process: a
batch's noise is seeded by its index, so its numbers do not depend on who computes it. ``summary.json`` and
``table.txt`` hold the whole table.

OOD (``--ood-datasets``): the ID set is ``--id-dataset`` (default the first of --datasets); MSP and energy scores
on the Default and DE outputs (DE: MSP of the mean softmax, energy of the mean logits) and, as in the paper's OOD
table, ReAct, ASH-S and SCALE on the Default pass (the classifier's pooled penultimate features and final linear
layer; ReAct's threshold is the ``--react-percentile`` (90) percentile of the ID set's activations, ASH-S at
``--ash-percentile`` 90, SCALE at ``--scale-percentile`` 85); AUROC and FPR@95%TPR with ID as positive (dk.ood).
A classifier without a linear head on its features gets MSP and energy only (the log says why).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .data.eval_sets import DatasetSpec, build_dataset, label_map
from .utils import Journal, Progress, UsageError, read_json, write_json

MODES = ("Default", "DE", "DDA", "DDA-SE")
_MODE_ALIASES = {m.lower(): m for m in MODES} | {"dda_se": "DDA-SE", "ddase": "DDA-SE", "def": "Default"}
DDA_REF_PIXELS = 3 * 256 * 256  # DDA's guidance scale 6 is for 3x256x256 images


def default_dda_scale(shape) -> float:
    C_, H, W = shape[-3:]
    return 6.0 * math.sqrt(C_ * H * W / DDA_REF_PIXELS)


def stream_seed(*parts) -> int:
    ints = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in ints]).generate_state(1, np.uint64)[0] >> 1)


class _Recorder:
    """Stands in for the classifier inside dk.diffaug_ensemble: runs EVERY classifier on each batch of denoised
    images (so the score model's work is shared by all of them) and keeps their logits; returns the first's."""

    def __init__(self, clfs: Dict[str, Callable], allowed: Optional[Tensor]):
        self.clfs, self.allowed = clfs, allowed
        self.calls: Dict[str, List[Tensor]] = {n: [] for n in clfs}

    def __call__(self, x):
        first = None
        for n, clf in self.clfs.items():
            z = restrict_logits(clf(x).float(), self.allowed)
            self.calls[n].append(z)
            first = z if first is None else first
        return first


def restrict_logits(logits: Tensor, allowed: Optional[Tensor]) -> Tensor:
    if allowed is None:
        return logits
    out = torch.full_like(logits, float("-inf"))
    idx = allowed.to(logits.device)
    out[:, idx] = logits[:, idx]
    return out


def de_predict(clfs: Dict[str, Callable], aug, x: Tensor, times, seed: int, allowed=None, max_batch=None) -> dict:
    """DiffAug-Ensemble for several classifiers on the SAME denoised images: {name: (mean softmax [B, K], mean
    logits [B, K])}. The mean softmax is dk.diffaug_ensemble's (the mean over t in times of softmax(f(x0_hat_t)),
    t = 0 the raw image); the mean logits feed the energy score."""
    from .ensemble import diffaug_ensemble

    rec = _Recorder(clfs, allowed)
    diffaug_ensemble(rec, aug, x, times=times, seed=seed, max_batch=max_batch)
    B = x.shape[0]
    n_raw = sum(int(t) == 0 for t in times)
    out = {}
    for n, calls in rec.calls.items():
        # diffaug_ensemble's call order: the raw batch (when t = 0 is in times) first, then the expanded rows,
        # row r belonging to image r % B
        z = torch.cat(calls).cpu()
        # -inf (a class restrict_logits left out) becomes finite for the sums; NaN and +inf stay, so the energy of an
        # image whose logits broke is NaN and its metrics say so, as for the other scores
        zf = z.masked_fill(z == float("-inf"), -1e4)
        p = torch.softmax(z, -1)
        probs, logits = torch.zeros(B, z.shape[-1]), torch.zeros(B, z.shape[-1])
        k = 0
        if n_raw:
            probs += n_raw * p[:B]
            logits += n_raw * zf[:B]
            k = B
        rows = torch.arange(z.shape[0] - k) % B
        probs.index_add_(0, rows, p[k:])
        logits.index_add_(0, rows, zf[k:])
        out[n] = (probs / len(times), restrict_logits(logits / len(times), allowed))
    return out


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class EvalConfig:
    modes: tuple = MODES
    batch_size: int = 64
    max_images: Optional[int] = None
    dda_max_images: Optional[int] = None
    de_times: tuple = tuple(range(0, 451, 50))
    dda_steps: int = 100
    dda_depth: int = 50
    dda_down: int = 4
    dda_scale: Optional[float] = None  # None: default_dda_scale(image shape)
    # rows per score-model call in DE: None = the batch size on CPU (timing candidate chunks there costs more
    # than it saves), dk.ensemble.pick_chunk's measured best on GPU
    de_max_batch: Optional[int] = None
    image_size: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    # OOD: ReAct's threshold percentile (of the ID set's penultimate activations), ASH-S's and SCALE's percentiles
    react_percentile: float = 90.0
    ash_percentile: float = 90.0
    scale_percentile: float = 85.0
    extra: Dict = field(default_factory=dict)
    # classifier name -> what identifies the classifier itself (file_identity of its checkpoint): a result file
    # of another classifier under the same name is then recomputed, not reused
    identities: Dict = field(default_factory=dict)

    def mode_settings(self, mode: str) -> dict:
        """What one mode's number depends on (resume compares it)."""
        s = {"max_images": self.max_images, "seed": self.seed, "image_size": self.image_size, **self.extra}
        if mode != "Default":  # the noise of a batch is seeded by its index
            s["batch_size"] = self.batch_size
        if mode == "DE":
            s["de_times"] = list(self.de_times)
        if mode in ("DDA", "DDA-SE"):
            s.update(dda_steps=self.dda_steps, dda_depth=self.dda_depth, dda_down=self.dda_down,
                     dda_scale=self.dda_scale, dda_max_images=self.dda_max_images)
        if mode == "Default":
            s.pop("score_model", None)
        return _jsonable(s)

    def pair_settings(self, mode: str, classifier: str, ds: "DatasetSpec") -> dict:
        """mode_settings plus which classifier and which data: a resumed run compares them all."""
        return {**self.mode_settings(mode), "classifier": _jsonable(self.identities.get(classifier)),
                "data": dataset_identity(ds)}


def file_identity(path: str) -> list:
    """[absolute path, size, modification time in ns]: changes when the file is replaced or rewritten."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def dataset_identity(ds: "DatasetSpec") -> list:
    """The spec a dataset was built from, paths made absolute (two roots with the same column name differ)."""
    return [ds.kind, *(os.path.abspath(a) if isinstance(a, str) and os.path.exists(a) else _jsonable(a)
                       for a in ds.args)]


def parse_modes(s) -> tuple:
    items = s.split(",") if isinstance(s, str) else list(s)
    modes = []
    for m in items:
        m = m.strip()
        if not m:
            continue
        key = _MODE_ALIASES.get(m.lower())
        if key is None:
            raise UsageError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
        if key not in modes:
            modes.append(key)
    if not modes:
        raise UsageError("no modes given")
    return tuple(sorted(modes, key=MODES.index))


def parse_times(s: str) -> tuple:
    """'0,50,100' or 'start:stop:step' -> ints."""
    try:
        if ":" in s:
            a, b, c = (int(v) for v in s.split(":"))
            times = tuple(range(a, b, c))
        else:
            times = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"times must look like 0,50,100 or 0:451:50, got {s!r}") from None
    if not times:
        raise UsageError(f"no times in {s!r}")
    if min(times) < 0:
        raise UsageError(f"times must be >= 0 (t = 0 is the raw image), got {min(times)} in {s!r}")
    return times


def check_times(times, T: int) -> None:
    """UsageError unless every DE time lies in [0, T) of the score model's schedule."""
    bad = [t for t in times if not 0 <= t < T]
    if bad:
        raise UsageError(f"--de-times must lie in [0, {T}) for the score model's {T}-step schedule, got {bad}")


def _check_count(what: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UsageError(f"{what} must be a positive integer, got {n!r}")


def subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of n images (the same every run), in index order; all when n is None or >= len."""
    if n is not None:
        _check_count("the number of images to evaluate", n)
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    return Subset(ds, idx)


def step_note(progress: Progress, every_s: float = 2.0):
    """progress(i, n) for dda.adapt: 'DDA step i/n' beside the bar, redrawn at most every every_s seconds (a step
    can take seconds at ImageNet sizes; redrawing at every step would flood a log)."""
    last = [time.time()]

    def note(i: int, n: int) -> None:
        redraw = time.time() - last[0] >= every_s
        if redraw:
            last[0] = time.time()
        progress.note(f"DDA step {i}/{n} of this batch", refresh=redraw)

    return note


# ------------------------------------------------------------------------------------------------ one pair
@dataclass
class Shard:
    """This process's part of a run over several (torchrun): rank r of world_size computes every world_size-th of
    the batches still to do, and gather(obj) returns [obj of rank 0, obj of rank 1, ...] on every rank (a
    collective, torch.distributed's all_gather_object). The default is a lone process."""
    rank: int = 0
    world_size: int = 1
    gather: Callable = staticmethod(lambda obj: [obj])

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@torch.no_grad()
def evaluate_dataset(clfs, aug, dataset: Dataset, modes: Sequence[str], cfg: EvalConfig, name: str = "",
                     want_scores: bool = False, desc: str = "", features: Sequence[str] = (),
                     shard: Optional[Shard] = None, journal=None) -> Dict[str, dict]:
    """Accuracies of classifiers on one dataset in each mode. clfs: {name: classifier} (or one classifier,
    named "classifier"), all fed the SAME DiffAug and DDA images (the score model runs once per batch for all).
    Returns {name: {'acc': {mode: float}, 'n': {mode: int}, 'correct': {...}, 'seconds': float}} (+ 'scores':
    per-image msp / energy arrays of the Default and DE outputs when want_scores; + 'features': the [N, D]
    float32 penultimate features of the classifiers named in ``features``, whose Default logits are then their
    linear head applied to those features: one pass serves both). aug: a dk.DiffAug (its model and schedule also
    serve DDA); None is allowed for Default only.

    Each batch's noise is seeded by its index and its DDA images are fixed by their place in the set, so a batch
    gives the same numbers whoever computes it: with a shard, each rank computes its share of the batches and
    every rank returns the result of all (what one process returns; 'seconds' sums the batches' times). journal:
    a dk.utils.Journal of per-batch records (accuracies only, not want_scores): the batches it holds are not
    recomputed, and each batch computed here is appended to it."""
    if not isinstance(clfs, dict):
        clfs = {"classifier": clfs}
    shard = shard or Shard()
    if want_scores and journal is not None:
        raise ValueError("a journal keeps accuracies only, not per-image scores")
    modes = tuple(modes)
    if any(m != "Default" for m in modes) and aug is None:
        raise UsageError(f"modes {[m for m in modes if m != 'Default']} need a score model")
    for k in ("batch_size", "max_images", "dda_max_images"):
        if getattr(cfg, k) is not None or k == "batch_size":
            _check_count(k, getattr(cfg, k))
    ds = subset(dataset, cfg.max_images, stream_seed(cfg.seed, "subset", name))
    n_batches = -(-len(ds) // cfg.batch_size)
    done = journal.read() if journal is not None else {}
    done = shard.gather(done if shard.is_main else None)[0]  # rank 0's reading: every rank plans the same
    todo = [b for b in range(n_batches) if b not in done]
    new = {}
    for b, rec in _batch_records(clfs, aug, dataset, ds, modes, cfg, name, want_scores, desc, features,
                                 todo[shard.rank::shard.world_size], shard.is_main):
        if journal is not None:
            journal.append(b, rec)
        new[b] = rec
    recs = dict(done)
    for part in shard.gather(new):
        recs.update(part)
    return _combine(clfs, modes, [recs[b] for b in range(n_batches)], want_scores, features)


def _combine(clfs, modes, recs: List[dict], want_scores: bool, features: Sequence[str]) -> Dict[str, dict]:
    """evaluate_dataset's result from its per-batch records, in batch order."""
    count = {m: sum(r["n"][m] for r in recs) for m in modes}
    secs = round(sum(r["seconds"] for r in recs), 2)
    res = {}
    for n in clfs:
        correct = {m: sum(r["correct"][n][m] for r in recs) for m in modes}
        res[n] = {"acc": {m: (correct[m] / count[m] if count[m] else None) for m in modes},
                  "n": dict(count), "correct": correct, "seconds": secs}
        if want_scores:
            keys = recs[0]["scores"][n] if recs else {}
            res[n]["scores"] = {k: np.concatenate([r["scores"][n][k] for r in recs]) for k in keys}
        if n in features:
            res[n]["features"] = np.concatenate([r["features"][n] for r in recs])
    return res


def _batch_records(clfs, aug, dataset, ds, modes, cfg: EvalConfig, name, want_scores, desc, features,
                   batches: Sequence[int], show: bool):
    """(b, record) for each batch index b of batches: the images counted and classified right per mode and
    classifier, the time taken (+ per-image scores and features as numpy arrays when asked)."""
    from . import dda as dda_mod
    from . import ood

    device = torch.device(cfg.device)
    ncs = {getattr(getattr(c, "net", c), "num_classes", None) for c in clfs.values()}
    if len(ncs) != 1:
        raise UsageError(f"classifiers evaluated together must have the same number of classes, got {ncs}")
    nc = ncs.pop()
    lmap, allowed = label_map(dataset, nc) if nc else (None, None)
    bs = cfg.batch_size
    loader = DataLoader(ds, batch_sampler=[list(range(b * bs, min((b + 1) * bs, len(ds)))) for b in batches],
                        num_workers=0)
    need_dda = any(m in ("DDA", "DDA-SE") for m in modes)
    # DDA / DDA-SE on a fixed random subset of the images when capped (not the first ones: folders are sorted by
    # class)
    dda_mask = torch.zeros(len(ds), dtype=torch.bool)
    if need_dda:
        cap = len(ds) if cfg.dda_max_images is None else min(cfg.dda_max_images, len(ds))
        g = torch.Generator().manual_seed(stream_seed(cfg.seed, "dda-subset", name))
        dda_mask[torch.randperm(len(ds), generator=g)[:cap]] = True
    need_de = "DE" in modes or (want_scores and aug is not None)
    total = sum(min(bs, len(ds) - b * bs) for b in batches)
    bar = Progress(total, desc=desc or name, unit="img", bar=cfg.progress and show, leave=False)
    correct = {n: {m: 0 for m in modes} for n in clfs}
    count = {m: 0 for m in modes}
    for b, (x, y) in zip(batches, loader):
        t0 = time.time()
        x = x.to(device)
        y = torch.as_tensor(y)
        if lmap is not None:
            y = lmap[y]
        y = y.to(device)
        B = x.shape[0]
        sel = torch.nonzero(dda_mask[b * bs:b * bs + B]).flatten().to(device)
        k = sel.numel()
        de = None
        if need_de:
            mb = cfg.de_max_batch or (cfg.batch_size if device.type == "cpu" else None)
            de = de_predict(clfs, aug, x, cfg.de_times, stream_seed(cfg.seed, "de", name, b), allowed, max_batch=mb)
        adapted = None
        if k > 0:
            xs = x[sel]
            scale = cfg.dda_scale if cfg.dda_scale is not None else default_dda_scale(xs.shape)
            step = None if bar.bar is None else step_note(bar)
            adapted = dda_mod.adapt(aug, aug.schedule, xs, steps=cfg.dda_steps, depth=cfg.dda_depth,
                                    down_factor=cfg.dda_down, guidance_scale=scale,
                                    seed=stream_seed(cfg.seed, "dda", name, b), prediction=aug.prediction,
                                    clip=aug.clip,
                                    progress=step)
        rec = {"n": {m: k if m in ("DDA", "DDA-SE") else B for m in modes}, "correct": {}}
        scores, feats = {}, {}
        for n, clf in clfs.items():
            if n in features:
                f = clf.penultimate(x).float()
                feats[n] = f.cpu().numpy()
                logits0 = restrict_logits(_apply_head(clf.linear_head(), f), allowed)
            else:
                logits0 = restrict_logits(clf(x).float(), allowed)
            p0 = torch.softmax(logits0, -1)
            c = rec["correct"][n] = {}
            if "Default" in modes:
                c["Default"] = int((p0.argmax(1) == y).sum())
            sc = scores[n] = {}
            if want_scores:
                sc["Default/msp"] = ood.msp(logits0).cpu().numpy()
                sc["Default/energy"] = ood.energy(logits0).cpu().numpy()
            if de is not None:
                p_de, z_de = de[n]
                if "DE" in modes:
                    c["DE"] = int((p_de.argmax(1) == y.cpu()).sum())
                if want_scores:
                    sc["DE/msp"] = p_de.max(1).values.numpy()
                    sc["DE/energy"] = ood.energy(z_de).numpy()
            if adapted is not None:
                p_a = torch.softmax(restrict_logits(clf(adapted).float(), allowed), -1)
                if "DDA" in modes:
                    c["DDA"] = int((p_a.argmax(1) == y[sel]).sum())
                if "DDA-SE" in modes:
                    c["DDA-SE"] = int(((0.5 * (p_a + p0[sel])).argmax(1) == y[sel]).sum())
            for m in modes:
                c.setdefault(m, 0)
                correct[n][m] += c[m]
        if want_scores:
            rec["scores"] = scores
        if features:
            rec["features"] = feats
        rec["seconds"] = time.time() - t0
        for m in modes:
            count[m] += rec["n"][m]
        first = next(iter(clfs))
        bar.update(B, **{m: f"{100 * correct[first][m] / count[m]:.1f}" for m in modes if count[m]})
        yield b, rec
    bar.close()


# ------------------------------------------------------------------------------------------------ the run
def _quiet(*args, **kwargs) -> None:
    """The log of a rank other than 0."""


def safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in s)


def _is_record(obj) -> bool:
    """Whether obj looks like a result file run() wrote (anything else there is recomputed, not trusted)."""
    return isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("acc", "n", "correct", "seconds",
                                                                                "settings"))


def run(classifiers, aug, datasets: Sequence[DatasetSpec], cfg: EvalConfig, out: Optional[str] = None,
        ood_datasets: Sequence[DatasetSpec] = (), id_dataset: Optional[DatasetSpec] = None,
        log=print, shard: Optional[Shard] = None) -> dict:
    """classifiers: [(name, nn.Module)] (inputs in [-1, 1]); aug: dk.DiffAug or None. Evaluates every (classifier,
    dataset) pair (all classifiers of a dataset together: one DiffAug / DDA pass serves them all), writes and
    reads OUT/<clf>__<dataset>.json (resume: modes already there with the same settings are not recomputed;
    while a dataset is under way its finished batches are kept in OUT/<dataset>.batches.rank<r>, so a killed run
    loses at most a batch per rank), returns {'results': {clf: {dataset: record}}, 'ood': ..., 'table': str}.
    With a shard (torchrun), every rank computes its share of each dataset's batches and returns the whole result;
    rank 0 alone writes the result files and logs."""
    shard = shard or Shard()
    if not shard.is_main:  # the other ranks read the result files (to plan the same work) but write none
        log = _quiet
    if out:
        os.makedirs(out, exist_ok=True)
    classifiers = [(n, c.to(cfg.device).eval()) for n, c in classifiers]
    if ood_datasets:  # run_ood checks again on the heads that pass feature_head_check
        _check_feature_percentiles({n: h for n, c in classifiers if hasattr(c, "linear_head")
                                    and (h := c.linear_head()) is not None}, cfg)
    channels, size = _clf_input([c for _, c in classifiers], aug, cfg)
    results: Dict[str, Dict[str, dict]] = {n: {} for n, _ in classifiers}
    for ds in datasets:
        recs, todo = {}, {}
        for cname, _ in classifiers:
            path = os.path.join(out, f"{safe_name(cname)}__{safe_name(ds.name)}.json") if out else None
            prev = read_json(path) if path and os.path.isfile(path) else None
            rec = prev if _is_record(prev) else None
            if prev is not None and rec is None:
                log(f"[{cname} | {ds.name}] {path} is not a result file of this command: recomputing it")
            todo[cname] = [m for m in cfg.modes if rec is None or rec["acc"].get(m) is None
                           or rec["settings"].get(m) != cfg.pair_settings(m, cname, ds)]
            if rec is not None:
                changed = [m for m in todo[cname] if m in rec["settings"]]
                if changed:
                    log(f"[{cname} | {ds.name}] settings of {changed} changed since {path}: recomputing them")
                if not todo[cname]:
                    log(f"[{cname} | {ds.name}] done already ({path}): skipped")
            if rec is None:
                rec = {"classifier": cname, "dataset": ds.name, "group": ds.group, "acc": {}, "n": {},
                       "correct": {}, "seconds": {}, "settings": {}}
            recs[cname] = (rec, path)
        modes = tuple(m for m in cfg.modes if any(m in t for t in todo.values()))
        journal = None
        if out:  # what the batches depend on: another stamp starts the dataset afresh
            stamp = {"modes": modes, "settings": {n: {m: cfg.pair_settings(m, n, ds) for m in modes}
                                                  for n in todo if todo[n]}}
            journal = Journal(os.path.join(out, f"{safe_name(ds.name)}.batches"), _jsonable(stamp), shard.rank)
        if modes:
            clfs = {n: c for n, c in classifiers if todo[n]}
            dataset = build_dataset(ds, size, channels, cfg.seed)
            r = evaluate_dataset(clfs, aug, dataset, modes, cfg, name=ds.name,
                                 desc=f"{ds.name} [{', '.join(modes)}]", shard=shard, journal=journal)
            if journal:
                journal.close()
            for cname in clfs:
                rec, path = recs[cname]
                for m in todo[cname]:
                    rec["acc"][m], rec["n"][m], rec["correct"][m] = (r[cname]["acc"][m], r[cname]["n"][m],
                                                                     r[cname]["correct"][m])
                    rec["seconds"][m] = r[cname]["seconds"]
                    rec["settings"][m] = cfg.pair_settings(m, cname, ds)
                if path and shard.is_main:  # saved before it is reported: a line on screen is a result on disk
                    write_json(rec, path)
                log(f"[{cname} | {ds.name}] " + "  ".join(
                    f"{m} {100 * rec['acc'][m]:.2f}% (n={rec['n'][m]})" for m in cfg.modes
                    if rec["acc"].get(m) is not None) + f"  ({r[cname]['seconds']:.1f}s for all classifiers)")
        if journal and shard.is_main:  # the results hold its batches now (or needed none of them)
            journal.remove()
        for cname, (rec, _) in recs.items():
            results[cname][ds.name] = rec
    ood_res = {}
    if ood_datasets:
        ood_res = run_ood(classifiers, aug, id_dataset or datasets[0], ood_datasets, cfg, out, log, shard)
    table = format_table(results, datasets, cfg.modes)
    text = table + ("\n\n" + format_ood_table(ood_res) if ood_res else "")
    if out and shard.is_main:
        write_json({"results": results, "ood": ood_res, "settings": {m: cfg.mode_settings(m) for m in cfg.modes}},
                   os.path.join(out, "summary.json"))
        with open(os.path.join(out, "table.txt"), "w") as f:
            f.write(text + "\n")
    return {"results": results, "ood": ood_res, "table": text}


FEATURE_SCORES = ("react", "ash", "scale")


def _apply_head(head: torch.nn.Linear, f: Tensor) -> Tensor:
    """The classifier's linear head on float32 features, in float32."""
    return F.linear(f, head.weight.float(), None if head.bias is None else head.bias.float())


def feature_head_check(clf, x: Tensor) -> Optional[str]:
    """None when clf's logits are its final nn.Linear applied to its penultimate features (so ReAct, ASH-S and
    SCALE apply, dk.ood), else the reason they do not. x: a few input images to check on."""
    if not (hasattr(clf, "penultimate") and hasattr(clf, "linear_head")):
        return "it exposes no penultimate features (not a train_classifier classifier)"
    head = clf.linear_head()
    if head is None:
        return "its final layer is not an nn.Linear"
    with torch.no_grad():
        z = clf(x).float()
        f = clf.penultimate(x).float()
        zf = _apply_head(head, f)
    if zf.shape != z.shape or not torch.allclose(zf, z, rtol=1e-3, atol=1e-3 * (1 + z.abs().max().item())):
        return "its logits are not its linear head applied to its pre-logit features"
    return None


def _feature_scores(feats: np.ndarray, head, threshold: float, cfg: EvalConfig, chunk: int = 4096) -> dict:
    """ReAct / ASH-S / SCALE scores of [N, D] penultimate features through the linear head, in row chunks."""
    from . import ood

    w = head.weight.detach().float().cpu()
    b = None if head.bias is None else head.bias.detach().float().cpu()
    out: Dict[str, list] = {k: [] for k in FEATURE_SCORES}
    for i in range(0, len(feats), chunk):
        f = torch.from_numpy(np.ascontiguousarray(feats[i:i + chunk]))
        out["react"].append(ood.react(f, w, b, threshold))
        out["ash"].append(ood.ash(f, w, b, cfg.ash_percentile))
        out["scale"].append(ood.scale(f, w, b, cfg.scale_percentile))
    return {f"Default/{k}": torch.cat(v).numpy() for k, v in out.items()}


def detection_metrics(id_s: np.ndarray, ood_s: np.ndarray) -> dict:
    """AUROC and FPR@95 (ID positive); None for both, with the count, where a score is NaN (ASH-S / SCALE of an
    all-zero feature vector is 0/0, as in their papers' code)."""
    from . import ood

    bad = int((~np.isfinite(id_s)).sum() + (~np.isfinite(ood_s)).sum())
    if bad:
        return {"auroc": None, "fpr95": None, "non_finite": bad}
    return {"auroc": ood.auroc(id_s, ood_s), "fpr95": ood.fpr_at_95_tpr(id_s, ood_s)}


def _check_feature_percentiles(heads: dict, cfg: EvalConfig) -> None:
    """UsageError when ASH-S's or SCALE's percentile keeps none of a linear head's input features: checked before
    any pass over the data, rather than failing after the ID set's whole DE pass."""
    from . import ood

    for cname, head in heads.items():
        n = head.weight.shape[1]
        for flag, p in (("--ash-percentile", cfg.ash_percentile), ("--scale-percentile", cfg.scale_percentile)):
            if ood.kept_count(n, p) < 1:
                raise UsageError(f"{flag} {p} keeps none of {cname}'s {n} penultimate features "
                                f"(k = n - round(n * p / 100) = {ood.kept_count(n, p)}); use a smaller one")


def run_ood(classifiers, aug, id_ds: DatasetSpec, ood_datasets, cfg: EvalConfig, out, log=print,
            shard: Optional[Shard] = None) -> dict:
    """AUROC and FPR@95 of each classifier with id_ds as in-distribution, for MSP and energy of the Default and DE
    outputs and, for classifiers whose logits are a linear head on penultimate features (feature_head_check),
    ReAct, ASH-S and SCALE of the Default pass (the paper's OOD table; ReAct's threshold is the
    cfg.react_percentile-th percentile of the ID set's activations, as OpenOOD takes it from ID data). Per-image
    scores are cached in OUT/<clf>__<dataset>.scores.npz with the settings they were computed with (the ID file
    also holds the ReAct threshold, which the OOD files' settings include). With a shard, each rank scores its
    share of the batches; rank 0 alone writes and logs."""
    from . import ood as ood_mod

    shard = shard or Shard()
    if not shard.is_main:
        log = _quiet
    if out:
        os.makedirs(out, exist_ok=True)
    modes = ("Default", "DE") if aug is not None else ("Default",)
    base_keys = [f"{m}/{s}" for m in modes for s in ("msp", "energy")]
    classifiers = [(n, c.to(cfg.device).eval()) for n, c in classifiers]
    channels, size = _clf_input([c for _, c in classifiers], aug, cfg)
    id_data = _NoClasses(build_dataset(id_ds, size, channels, cfg.seed))
    probe = torch.stack([id_data[i][0] for i in range(min(4, len(id_data)))]).to(cfg.device)
    heads = {}
    for cname, clf in classifiers:
        why = feature_head_check(clf, probe)
        if why:
            log(f"[{cname}] ReAct / ASH / SCALE skipped: {why}")
        else:
            heads[cname] = clf.linear_head()
    _check_feature_percentiles(heads, cfg)
    keys = {n: base_keys + ([f"Default/{s}" for s in FEATURE_SCORES] if n in heads else []) for n, _ in classifiers}
    settings = {m: cfg.mode_settings(m) for m in modes}
    settings["ood"] = {"react_percentile": cfg.react_percentile, "ash_percentile": cfg.ash_percentile,
                       "scale_percentile": cfg.scale_percentile}
    thresholds: Dict[str, float] = {}

    def scores_of(ds: DatasetSpec, dataset=None, is_id=False) -> Dict[str, dict]:
        got, missing, stamps, paths = {}, {}, {}, {}
        for cname, clf in classifiers:
            extra = {} if is_id or cname not in heads else {"react_threshold": thresholds[cname]}
            extra |= {"classifier": _jsonable(cfg.identities.get(cname)), "data": dataset_identity(ds)}
            stamps[cname] = json.dumps(settings | extra, sort_keys=True)
            fname = f"{safe_name(cname)}__{safe_name(ds.name)}.scores.npz"
            path = paths[cname] = os.path.join(out, fname) if out else None
            if path and os.path.isfile(path):
                with np.load(path) as z:
                    ok = all(k in z for k in keys[cname]) and "settings" in z and str(z["settings"]) == stamps[cname]
                    if ok and is_id and cname in heads:
                        ok = "react_threshold" in z
                        if ok:
                            thresholds[cname] = float(z["react_threshold"])
                    if ok:
                        got[cname] = {k: z[k] for k in keys[cname]}
                        continue
            missing[cname] = clf
        if missing:
            data = dataset if dataset is not None else _NoClasses(build_dataset(ds, size, channels, cfg.seed))
            r = evaluate_dataset(missing, aug, data, (), cfg, name=ds.name, want_scores=True,
                                 desc=f"{ds.name} (OOD scores)", features=[n for n in missing if n in heads],
                                 shard=shard)
            for cname in missing:
                sc, extra = dict(r[cname]["scores"]), {}
                if cname in heads:
                    f = r[cname]["features"]
                    if is_id:
                        thresholds[cname] = ood_mod.react_threshold(f, cfg.react_percentile)
                        extra["react_threshold"] = np.array(thresholds[cname])
                        if (f < 0).any():
                            log(f"[{cname}] note: its penultimate features have negative values; ReAct / ASH / "
                                f"SCALE are defined for non-negative (post-ReLU) ones")
                    sc.update(_feature_scores(f, heads[cname], thresholds[cname], cfg))
                got[cname] = sc
                if out and shard.is_main:
                    np.savez(paths[cname], settings=np.array(stamps[cname]), **extra, **sc)
        return got

    id_scores = scores_of(id_ds, id_data, is_id=True)
    res: Dict[str, dict] = {n: {} for n, _ in classifiers}
    for ds in ood_datasets:
        sc = scores_of(ds)
        for cname, _ in classifiers:
            res[cname][ds.name] = {k: detection_metrics(id_scores[cname][k], sc[cname][k]) for k in keys[cname]}
            log(f"[{cname} | OOD {ds.name} vs {id_ds.name}] " + "  ".join(
                f"{k} AUROC " + ("n/a" if v["auroc"] is None else f"{100 * v['auroc']:.2f}")
                for k, v in res[cname][ds.name].items()))
    if out and shard.is_main:
        write_json({"id_dataset": id_ds.name, "settings": settings["ood"], "react_threshold": thresholds,
                    "results": res}, os.path.join(out, "ood.json"))
    return res


class _NoClasses(Dataset):
    """A dataset view without class names (OOD sets: labels unused, no class mapping)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, _ = self.base[i]
        return x, 0


def in_channels(clf) -> int:
    """The classifier's input channels (its first convolution's)."""
    conv = next((m for m in clf.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _clf_input(clfs, aug, cfg: EvalConfig):
    chans = {in_channels(c) for c in clfs}
    if len(chans) != 1:
        raise UsageError(f"the classifiers take different numbers of input channels {sorted(chans)}")
    channels = chans.pop()
    size = cfg.image_size or 224
    if aug is not None:
        sc = getattr(aug.model, "in_channels", channels)
        if sc != channels:
            raise UsageError(f"the classifiers take {channels}-channel images but the score model {sc}")
    return channels, size


def _jsonable(obj):
    return json.loads(json.dumps(obj))


# ------------------------------------------------------------------------------------------------ tables
def _fmt(v):
    return "  -  " if v is None else f"{100 * v:5.2f}"


def format_table(results: Dict[str, Dict[str, dict]], datasets: Sequence[DatasetSpec], modes: Sequence[str]) -> str:
    """Rows: classifiers; column groups: datasets (and the mean of each expanded group), each with its modes and
    their average (as the paper's tables)."""
    cols: List[tuple] = []  # (header, getter(rec_by_ds) -> {mode: acc})
    groups: Dict[str, List[str]] = {}
    for ds in datasets:
        cols.append((ds.name, [ds.name]))
        if ds.group:
            groups.setdefault(ds.group, []).append(ds.name)
    for g, names in groups.items():
        if len(names) > 1:
            cols.append((f"{g} (mean of {len(names)})", names))
    show_avg = len(modes) > 1
    sub = list(modes) + (["Avg"] if show_avg else [])
    w = 7
    base = w * len(sub) + len(sub) - 1
    widths = [max(base, len(h)) for h, _ in cols]
    name_w = max([10] + [len(c) for c in results])
    head1 = " " * name_w + " | " + " | ".join(h.center(cw) for (h, _), cw in zip(cols, widths))
    head2 = "classifier".ljust(name_w) + " | " + " | ".join(
        " ".join(m.rjust(w) for m in sub).rjust(cw) for cw in widths)
    lines = [head1, head2, "-" * len(head2)]
    for cname, by_ds in results.items():
        cells = []
        for (_, names), cw in zip(cols, widths):
            accs = []
            for m in modes:
                vals = [by_ds.get(n, {}).get("acc", {}).get(m) for n in names]
                accs.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
            if show_avg:
                accs.append(None if any(v is None for v in accs) else sum(accs) / len(accs))
            cells.append(" ".join(_fmt(a).rjust(w) for a in accs).rjust(cw))
        lines.append(cname.ljust(name_w) + " | " + " | ".join(cells))
    return "Top-1 accuracy (%)\n" + "\n".join(lines)


def format_ood_table(ood_res: dict) -> str:
    """Rows: (classifier, OOD set); columns: scores; cells AUROC/FPR@95 in %."""
    if not ood_res:
        return ""
    keys: List[str] = []
    for by_ds in ood_res.values():
        for rec in by_ds.values():
            keys += [k for k in rec if k not in keys]

    def cell(v):
        if v is None:
            return "-"
        if v["auroc"] is None:
            return f"n/a ({v.get('non_finite')} NaN scores)"
        return f"{100 * v['auroc']:.2f}/{100 * v['fpr95']:.2f}"

    rows = [[c, ds] + [cell(rec.get(k)) for k in keys] for c, by_ds in ood_res.items() for ds, rec in by_ds.items()]
    head = ["classifier", "OOD set"] + keys
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    lines = ["OOD detection: AUROC / FPR@95%TPR (%), ID = positive", fmt(head), "-" * len(fmt(head))]
    return "\n".join(lines + [fmt(r) for r in rows])
