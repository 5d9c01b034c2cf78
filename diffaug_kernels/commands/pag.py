"""`python -m diffaug_kernels pag`: perceptually aligned gradients (dk.pag) of train_classifier checkpoints on the
digits: input gradients with and without the DiffAug denoiser, their alignment with the Bayes-optimal direction of
the training set's empirical mixture per t, and accuracy under L2 PGD.

    python -m diffaug_kernels pag --classifier plain=runs/digits-plain/checkpoint.pt \\
        --classifier diffaug=runs/digits-diffaug/checkpoint.pt --out pag_out

Files in --out: ``pag.json`` (settings, alignment per classifier and t, robust accuracy per eps, times);
``pag_grid.png`` (per test digit: one row per classifier, the image, its plain input gradient and its gradient
through the denoiser at each t, then the Bayes direction's row at each x_t; each tile normalised by its own largest
magnitude, grey = 0); ``alignment_vs_t.png``.

Noise: the batch of images at t (--batch-size of them, in order) is noised with Philox seed --seed + t, the same
noise for its x_t and its gradient through DiffAug; so the numbers depend on --seed and --batch-size.

Alignment at t: the cosine between a classifier's gradient and dk.pag.bayes_direction over the training digits.
"through DiffAug" is d log p(y | x0_hat(x_t)) / dx (x_t = forward noise of the test digit x with a fixed seed per
t), compared with the Bayes direction at that x_t (the gradient in x is sqrt(abar) times the one in x_t: the
cosine is the same); "plain" is the classifier's own d log p(y | x) / dx, compared with the Bayes direction at the
clean x taken as x_t. The Bayes direction needs the labelled training set in memory, so the data are the
digits (scikit-learn's, at the classifiers' channels and 32x32).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import pag
from ..augment import DiffAug
from ..bench import plots
from ..bench.harness import environment
from ..data import digits
from ..models.classifier import load_classifier
from ..models.guidance import load_guidance_classifier
from ..models.score import resolve_score_model
from ..ops import forward_noise
from ..robustness import in_channels
from ..schedule import NoiseSchedule
from ..utils import Progress, UsageError, write_json
from .evaluate import parse_classifiers
from .options import float_list, int_list, positive, seed

NAME = "pag"
HELP = "perceptually aligned gradients: input-gradient grids, alignment with the Bayes direction per t, L2 PGD"
DESCRIPTION = ("Input gradients of train_classifier checkpoints on the digits, plain and through the DiffAug "
               "denoiser at chosen t; their mean cosine with the Bayes-optimal direction of the training set's "
               "empirical mixture per t; accuracy under L2 PGD at a few eps. Writes pag.json, pag_grid.png and "
               "alignment_vs_t.png.")

DEFAULT_TIMES = (200, 300, 400, 500, 600, 700, 800)
DEFAULT_EPS = (0.25, 0.5, 1.0)


def add_arguments(p) -> None:
    p.add_argument("--classifier", action="append", required=True, metavar="[NAME=]PATH",
                   help="a train_classifier checkpoint trained on the digits (repeatable)")
    p.add_argument("--guidance-classifier", action="append", default=[], metavar="[NAME=]PATH",
                   help="a train-guidance checkpoint (noisy or DA classifier of x_t) trained on the digits "
                        "(repeatable): its gradient d log p(y | x_t, t) / dx_t against the Bayes direction at x_t")
    p.add_argument("--times", type=int_list, default=DEFAULT_TIMES,
                   help="comma list of diffusion times for the gradients through DiffAug (default 200,300,...,800)")
    p.add_argument("--images", type=positive, default=128, help="test digits the alignment is averaged over")
    p.add_argument("--grid-images", type=positive, default=4, help="test digits shown in pag_grid.png")
    p.add_argument("--eps", type=float_list, default=DEFAULT_EPS,
                   help="comma list of L2 PGD radii in the [-1, 1] image units (default 0.25,0.5,1.0)")
    p.add_argument("--pgd-images", type=positive, default=200, help="test digits attacked at each eps")
    p.add_argument("--pgd-steps", type=positive, default=7, help="PGD steps (step 1.5 * eps / steps)")
    p.add_argument("--batch-size", type=positive, default=64, help="images per gradient or attack batch")
    p.add_argument("--score-model", default="default",
                   help="'default' (the shipped digits model), a train-score export, a checkpoint with "
                        "--score-config/--score-flag, or 'random' (tests only)")
    p.add_argument("--score-config", default=None, help="ADM_CONFIGS name for a checkpoint")
    p.add_argument("--score-flag", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model flag of a checkpoint (repeatable)")
    p.add_argument("--out", default="pag_out", help="output folder (default ./pag_out)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise and the PGD random starts")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per step instead)")


# ------------------------------------------------------------------------------------------------ the work
def _batches(n: int, bs: int):
    return [(s, min(n, s + bs)) for s in range(0, n, bs)]


def _grid(rows_per_image: Sequence[Sequence[Tensor]], labels: Sequence[str], headers: Sequence[str],
          path: str) -> str:
    """plots.save_image_grid with a label to the left of each row."""
    from PIL import Image, ImageDraw

    plots.save_image_grid(rows_per_image, path, headers=headers)
    with Image.open(path) as im:
        grid = im.convert("RGB")
    left = 8 + 6 * max(len(s) for s in labels)
    canvas = Image.new("RGB", (grid.width + left, grid.height), (255, 255, 255))
    canvas.paste(grid, (left, 0))
    draw = ImageDraw.Draw(canvas)
    top, row_h = 16, (grid.height - 16 - 2) / len(labels)
    for i, s in enumerate(labels):
        draw.text((4, top + i * row_h + row_h / 2 - 5), s, fill=(0, 0, 0))
    canvas.save(path, format="PNG")
    return path


def _fmt(row: dict, width: int = 0) -> str:
    """A mean cosine, with the number of images it is over where some had no Bayes direction."""
    text = "n/a" if row["mean"] is None else f"{row['mean']:+.3f}"
    return f"{text:>{width}}"


def _normalised(g: Tensor) -> Tensor:
    """A gradient tile scaled to [-1, 1] by its own largest magnitude (grey is 0)."""
    m = float(g.abs().max())
    return g / m if m > 0 else g


class AtTime(nn.Module):
    """A guidance classifier (x_t, t) -> logits held at one time t, as a classifier of x_t alone."""

    def __init__(self, net: nn.Module, t: int):
        super().__init__()
        self.net, self.t = net, int(t)

    def forward(self, x_t: Tensor) -> Tensor:
        return self.net(x_t, torch.full((x_t.shape[0],), self.t, dtype=torch.int64, device=x_t.device))


def _cosines(a: Tensor) -> dict:
    """Mean, standard error and count of the cosines that exist (a zero Bayes direction has none)."""
    a = a[~torch.isnan(a)]
    sem = float(a.std() / len(a) ** 0.5) if len(a) > 1 else None
    return {"mean": float(a.mean()) if len(a) else None, "sem": sem, "n": len(a)}


def run(classifiers: Dict[str, nn.Module], aug: DiffAug, out: str, times: Sequence[int] = DEFAULT_TIMES,
        images: int = 128, grid_images: int = 4, eps: Sequence[float] = DEFAULT_EPS, pgd_images: int = 200,
        pgd_steps: int = 7, batch_size: int = 64, seed: int = 0, progress: bool = True,
        log: Callable[[str], None] = print, extra: Optional[dict] = None,
        guidance: Optional[Dict[str, nn.Module]] = None) -> dict:
    """The whole analysis on the digits for classifiers {name: module}; returns what pag.json holds. progress:
    a bar on a terminal; log prints the per-step lines. guidance: {name: guidance classifier (x_t, t) ->
    logits} (dk.models.load_guidance_classifier), whose gradients in x_t at each t are compared with the Bayes
    direction at the same x_t (pag.json's "guidance_alignment"; no PGD: they classify noisy images)."""
    guidance = guidance or {}
    schedule = aug.schedule
    times = [int(t) for t in times]
    if not times or not all(0 <= t < schedule.num_timesteps for t in times):
        raise UsageError(f"--times must lie in [0, {schedule.num_timesteps}), got {times}")
    chans = {in_channels(c) for c in classifiers.values()}
    if len(chans) != 1:
        raise UsageError(f"the classifiers take different numbers of input channels {sorted(chans)}")
    channels = chans.pop()
    os.makedirs(out, exist_ok=True)
    train_x, train_y = digits("train", 32, channels).tensors
    test_x, test_y = digits("test", 32, channels).tensors
    n, n_pgd, n_grid = min(images, len(test_x)), min(pgd_images, len(test_x)), min(grid_images, len(test_x))
    x, y = test_x[:n], test_y[:n]
    t_start = time.time()
    per_set = len(_batches(n, batch_size))
    steps_total = (len(times) * (len(classifiers) + len(guidance) + 1) + len(classifiers)) * per_set
    steps_total += len(classifiers) * (len(eps) + 1) * len(_batches(n_pgd, batch_size))  # eps 0: clean
    bar = Progress(steps_total, desc="pag", unit="batch", bar=None if progress else False)

    def say(msg: str) -> None:
        if bar.bar is not None:
            bar.write(msg)
        else:
            log(msg)

    timing = {}

    # the Bayes directions: at x_t (the same noise DiffAug draws for the seed) and at the clean x, per t
    t0 = time.time()
    bayes_noisy, bayes_clean = {}, {}
    for t in times:
        nb, cb = [], []
        for lo, hi in _batches(n, batch_size):
            x_t = forward_noise(x[lo:hi], t, schedule, seed=seed + t, backend=aug.backend)
            nb.append(pag.bayes_direction(x_t, t, y[lo:hi], train_x, train_y, schedule))
            cb.append(pag.bayes_direction(x[lo:hi], t, y[lo:hi], train_x, train_y, schedule))
            bar.update(1)
        bayes_noisy[t], bayes_clean[t] = torch.cat(nb), torch.cat(cb)
    timing["bayes_s"] = round(time.time() - t0, 1)

    # the classifiers' gradients and their alignment
    t0 = time.time()
    align, grads = {}, {}
    for name, clf in classifiers.items():
        def gradients(**kw):
            parts = []
            for lo, hi in _batches(n, batch_size):
                parts.append(pag.input_gradient(clf, x[lo:hi], y[lo:hi], **kw))
                bar.update(1)
            return torch.cat(parts)

        plain = gradients()
        rows = {"plain": {}, "diffaug": {}}
        grads[name] = {"plain": plain[:n_grid]}
        for t in times:
            g = gradients(augment=aug, t=t, seed=seed + t)
            grads[name][t] = g[:n_grid]
            rows["diffaug"][t] = _cosines(pag.alignment(g, bayes_noisy[t]))
            rows["plain"][t] = _cosines(pag.alignment(plain, bayes_clean[t]))
            say(f"[pag] {name} t = {t}: alignment through DiffAug {_fmt(rows['diffaug'][t])}, "
                      f"plain {_fmt(rows['plain'][t])}")
        align[name] = rows
    galign = {}
    for name, net in guidance.items():  # d log p(y | x_t, t) / dx_t on the x_t the Bayes directions were taken at
        galign[name], grads[name] = {}, {}
        for t in times:
            parts = []
            for lo, hi in _batches(n, batch_size):
                x_t = forward_noise(x[lo:hi], t, schedule, seed=seed + t, backend=aug.backend)
                parts.append(pag.input_gradient(AtTime(net, t), x_t, y[lo:hi]))
                bar.update(1)
            g = torch.cat(parts)
            grads[name][t] = g[:n_grid]
            galign[name][t] = _cosines(pag.alignment(g, bayes_noisy[t]))
            say(f"[pag] guidance classifier {name} t = {t}: alignment at x_t {_fmt(galign[name][t])}")
    timing["gradients_s"] = round(time.time() - t0, 1)

    # robustness under L2 PGD
    t0 = time.time()
    robust = {}
    for name, clf in classifiers.items():
        acc = pag.robust_accuracy(clf, test_x[:n_pgd], test_y[:n_pgd], [0.0, *eps], steps=pgd_steps,
                                  batch_size=batch_size, seed=seed, progress=lambda done, total: bar.update(1))
        robust[name] = {f"{e:g}": a for e, a in acc.items()}
        say(f"[pag] {name} accuracy under L2 PGD: " + ", ".join(f"eps {k} {100 * v:.1f}%"
                                                                      for k, v in robust[name].items()))
    timing["pgd_s"] = round(time.time() - t0, 1)
    bar.close()

    # the figures
    headers = ["x", "plain"] + [f"t={t}" for t in times]
    rows, labels = [], []
    for b in range(n_grid):
        for name in classifiers:
            rows.append([x[b]] + [_normalised(grads[name]["plain"][b])]
                        + [_normalised(grads[name][t][b]) for t in times])
            labels.append(name)
        for name in guidance:
            rows.append([x[b], torch.zeros_like(x[b])] + [_normalised(grads[name][t][b]) for t in times])
            labels.append(name)
        rows.append([x[b], torch.zeros_like(x[b])] + [_normalised(bayes_noisy[t][b]) for t in times])
        labels.append("Bayes")
    grid = _grid(rows, labels, headers, os.path.join(out, "pag_grid.png"))
    series = {}
    for name in classifiers:
        for kind in ("diffaug", "plain"):
            ts = [t for t in times if align[name][kind][t]["mean"] is not None]
            label = f"{name}, {'x0_hat' if kind == 'diffaug' else 'x'}"
            series[label] = (ts, [align[name][kind][t]["mean"] for t in ts])
    for name in guidance:
        ts = [t for t in times if galign[name][t]["mean"] is not None]
        series[f"{name} (guidance), x_t"] = (ts, [galign[name][t]["mean"] for t in ts])
    curve = plots.plot_lines(series, os.path.join(out, "alignment_vs_t.png"),
                             title=f"Cosine with the Bayes direction ({n} test digits; x0_hat: through DiffAug)",
                             xlabel="diffusion time t",
                             ylabel="mean cosine", hline=(0.0, "0"))
    timing["total_s"] = round(time.time() - t_start, 1)
    result = {
        "settings": {"times": times, "images": n, "grid_images": n_grid, "eps": list(eps), "pgd_images": n_pgd,
                     "pgd_steps": pgd_steps, "batch_size": batch_size, "seed": seed, "eps_units": "[-1, 1] images",
                     "data": "digits", "train_points": len(train_x), **(extra or {})},
        "alignment": {name: {kind: {str(t): v for t, v in by.items()} for kind, by in rows_.items()}
                      for name, rows_ in align.items()},
        "guidance_alignment": {name: {str(t): v for t, v in by.items()} for name, by in galign.items()},
        "robust_accuracy": robust, "files": {"grid": grid, "alignment": curve}, "times": timing,
        "environment": environment("cpu"),
    }
    write_json(result, os.path.join(out, "pag.json"))
    return result


def format_table(result: dict) -> str:
    times = result["settings"]["times"]
    lines = ["Mean cosine with the Bayes direction (through DiffAug / plain input gradient)",
             "classifier    " + "".join(f"{'t=' + str(t):>16}" for t in times)]
    for name, by in result["alignment"].items():
        lines.append(f"{name:<14}" + "".join(_fmt(by["diffaug"][str(t)], 8) + _fmt(by["plain"][str(t)], 8)
                                             for t in times))
    first = next(iter(result["alignment"].values()))  # the Bayes directions are the classifiers' common ones
    lines.append(f"images (of {result['settings']['images']}) with a non-zero Bayes direction, at x_t / at x: "
                 + ", ".join(f"t={t} {first['diffaug'][str(t)]['n']} / {first['plain'][str(t)]['n']}" for t in times))
    for name, by in result.get("guidance_alignment", {}).items():
        lines.append(f"{name + ' (x_t)':<14}" + "".join(_fmt(by[str(t)], 8) + " " * 8 for t in times))
    eps = list(next(iter(result["robust_accuracy"].values())))
    lines += ["", "Accuracy (%) under L2 PGD (eps in [-1, 1] image units; eps 0 = clean)",
              "classifier    " + "".join(f"{'eps ' + e:>10}" for e in eps)]
    for name, acc in result["robust_accuracy"].items():
        lines.append(f"{name:<14}" + "".join(f"{100 * acc[e]:>10.1f}" for e in eps))
    return "\n".join(lines)


def main(args) -> int:
    old = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        specs = parse_classifiers(args.classifier)
        classifiers = {c.name: load_classifier(c.path) for c in specs}
        gspecs = parse_classifiers(args.guidance_classifier) if args.guidance_classifier else []
        guidance = {c.name: load_guidance_classifier(c.path, "cpu") for c in gspecs}
        clash = sorted(set(classifiers) & set(guidance))
        if clash:
            raise UsageError(f"--classifier and --guidance-classifier names must differ, both have {clash}")
        torch.manual_seed(args.seed)  # the 'random' test model's weights follow --seed
        model, schedule = resolve_score_model(args.score_model, "digits", args.score_config, args.score_flag,
                                              in_channels(next(iter(classifiers.values()))))
        schedule = schedule or NoiseSchedule.linear(1000)
        aug = DiffAug(model, schedule, prediction=getattr(model, "prediction", "eps"))
        result = run(classifiers, aug, args.out, args.times, args.images, args.grid_images, args.eps, args.pgd_images,
                     args.pgd_steps, args.batch_size, args.seed, progress=not args.no_progress,
                     extra={"score_model": args.score_model, "classifiers": {c.name: c.path for c in specs},
                            "guidance_classifiers": {c.name: c.path for c in gspecs}}, guidance=guidance)
    except (FileNotFoundError, ValueError, UsageError) as e:
        raise SystemExit(f"diffaug pag: error: {e}") from None
    finally:
        torch.set_num_threads(old)
    print(format_table(result))
    print(f"written: {args.out}/pag.json, {result['files']['grid']}, {result['files']['alignment']} "
          f"({result['times']['total_s']} s)")
    return 0
