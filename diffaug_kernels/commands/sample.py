"""`diffaug sample`: images from a score model by DDIM or DDPM (dk.sampling), optionally classifier-guided by a
train-guidance checkpoint, written as guided-diffusion's sample scripts write them.

    python -m diffaug_kernels sample --sampler ddim --steps 25 --num 64 --out samples_out
    python -m diffaug_kernels sample --classifier runs/train-guidance/ckpt_0000300.pt --classifier-scale 4 \\
        --labels 0,1,2,3 --out guided_out

Files in --out: ``samples.npz`` (arr_0: uint8 [N, H, W, C] images, quantised as guided-diffusion's
image_sample.py / classifier_sample.py do, ((x + 1) * 127.5).clamp(0, 255) truncated to uint8; arr_1: the
int64 [N] target labels when guided), ``grid.png`` (unguided: a square-ish grid; guided: one row per label,
the label at its left) and ``sample.json`` (the settings and times).

Noise: batch b (images b * batch .. b * batch + batch - 1) is sampled with the Philox key
stream_seed(seed, "sample", b): DDPM's x_T and step noise come from it (dk.sampling.ddpm_sample's seed); for
DDIM, x_T = dk.philox_normal(shape, key, offset 0) and eta's noise uses the same key. "random" labels are drawn
uniformly from a generator seeded with stream_seed(seed, "labels"). So the output is a function of --seed and
--batch.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import sampling
from ..bench import plots
from ..models.guidance import load_guidance_classifier
from ..models.score import resolve_score_model
from ..ops import philox_normal
from ..robustness import stream_seed
from ..schedule import NoiseSchedule
from ..utils import Progress, UsageError, write_json
from .options import check_device, non_negative_float, positive, seed

NAME = "sample"
HELP = "sample images by DDIM or DDPM, optionally classifier-guided; writes samples.npz and grid.png"
DESCRIPTION = ("Images from a score model by DDIM or ancestral DDPM over a respaced schedule (dk.sampling), "
               "optionally guided by a train-guidance classifier towards given labels. Writes OUT/samples.npz "
               "(uint8 NHWC arr_0, labels arr_1 when guided, as guided-diffusion's sample scripts), OUT/grid.png "
               "and OUT/sample.json.")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def steps_spec(s: str):
    """--steps: an integer (guided-diffusion's respacing "N") or a respacing string ("ddim25", "10,15,20")."""
    s = s.strip()
    return int(s) if s.isdigit() else s


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], guided-diffusion's quantisation (truncation, not rounding)."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def parse_labels(spec: Optional[str], num: int, num_classes: int, seed_value: int) -> Tensor:
    """int64 [num]: 'random' (uniform, seeded by stream_seed(seed, 'labels')) or a comma list repeated to num."""
    if spec is None or spec.strip() == "random":
        g = torch.Generator().manual_seed(stream_seed(seed_value, "labels"))
        return torch.randint(0, num_classes, (num,), generator=g)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--labels must be 'random' or a comma list of integers, got {spec!r}") from None
    if not values:
        raise UsageError(f"--labels must be 'random' or a comma list of integers, got {spec!r}")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"--labels {bad} lie outside the classifier's classes 0..{num_classes - 1}")
    return torch.tensor(values * math.ceil(num / len(values)), dtype=torch.int64)[:num]


def grid(images: np.ndarray, path: str, labels: Optional[np.ndarray] = None,
         names: Optional[Sequence[str]] = None) -> str:
    """uint8 NHWC images as one PNG: a square-ish grid, or with labels one row (or more) per label, sorted, with
    the label (its class name when given) at the left of each row."""
    from PIL import Image, ImageDraw

    tiles = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if labels is None:
        cols = math.ceil(math.sqrt(len(tiles)))
        rows = [list(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
        return plots.save_image_grid(rows, path)
    cols = max(8, math.ceil(math.sqrt(len(tiles))))
    rows, row_labels = [], []
    for lab in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == lab)
        for i in range(0, len(idx), cols):
            rows.append([tiles[j] for j in idx[i:i + cols]])
            row_labels.append(str(names[lab]) if names and lab < len(names) else str(lab))
    plots.save_image_grid(rows, path)
    with Image.open(path) as im:
        body = im.convert("RGB")
    left = 10 + 6 * max(len(s) for s in row_labels)
    canvas = Image.new("RGB", (body.width + left, body.height), (255, 255, 255))
    canvas.paste(body, (left, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (body.height - 2) / len(rows)
    for i, s in enumerate(row_labels):
        draw.text((4, 2 + i * row_h + row_h / 2 - 5), s, fill=(0, 0, 0))
    canvas.save(path, format="PNG")
    return path


def run(model, schedule: NoiseSchedule, out: str, sampler: str = "ddim", steps=25, num: int = 64, batch: int = 16,
        seed_value: int = 0, shape: Optional[tuple] = None, classifier=None, classifier_scale: float = 1.0,
        labels: Optional[Tensor] = None, eta: float = 0.0, dtype=None, compile: bool = False,
        device=None, progress: Optional[bool] = None, names: Optional[Sequence[str]] = None,
        extra: Optional[dict] = None) -> dict:
    """Samples num images of shape (C, H, W) in batches; writes out/samples.npz, grid.png, sample.json and returns
    the summary. labels (int64 [num]) are the guidance targets, with classifier."""
    if sampler not in ("ddim", "ddpm"):
        raise UsageError(f"sampler must be ddim or ddpm, got {sampler!r}")
    try:
        S = sampling.respace(schedule, steps)[0].num_timesteps
    except (TypeError, ValueError) as e:
        raise UsageError(f"--steps {steps}: {e}") from None
    prediction = getattr(model, "prediction", "eps")
    device = torch.device(device or "cpu")
    n_batches = math.ceil(num / batch)
    bar = Progress(n_batches * S, desc="sample", unit="step", bar=progress)
    bar.write(f"sample: {num} images {'x'.join(map(str, shape))} by {sampler.upper()} in {S} steps, batches of "
              f"{batch}" + (f", guided (scale {classifier_scale:g})" if classifier is not None else "")
              + f", device {device}")
    chunks, t0 = [], time.perf_counter()
    try:
        for b in range(n_batches):
            n = min(batch, num - b * batch)
            key = stream_seed(seed_value, "sample", b)
            y = labels[b * batch:b * batch + n].to(device) if classifier is not None else None
            kw = dict(steps=steps, prediction=prediction, classifier=classifier, classifier_scale=classifier_scale,
                      y=y, dtype=dtype, compile=compile, progress=lambda done, total: bar.update())
            if sampler == "ddim":
                x_T = philox_normal((n, *shape), key, 0, device=device)
                x = sampling.ddim_sample(model, schedule, x_T, eta=eta, seed=key, **kw)
            else:
                x = sampling.ddpm_sample(model, schedule, (n, *shape), seed=key, device=device, **kw)
            chunks.append(to_uint8(x))
            if bar.bar is None:
                bar.write(f"sample: batch {b + 1}/{n_batches} done, {time.perf_counter() - t0:.0f}s")
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    images = np.concatenate(chunks)
    os.makedirs(out, exist_ok=True)
    arrays = [images] + ([labels.numpy()] if classifier is not None else [])
    npz = os.path.join(out, "samples.npz")
    np.savez(npz, *arrays)
    png = grid(images, os.path.join(out, "grid.png"), labels.numpy() if classifier is not None else None, names)
    summary = {"num": num, "shape": list(images.shape), "sampler": sampler, "steps": steps, "respaced_steps": S,
               "eta": eta, "batch": batch, "seed": seed_value, "guided": classifier is not None,
               "classifier_scale": classifier_scale if classifier is not None else None,
               "dtype": str(dtype).removeprefix("torch.") if dtype else "float32", "compile": compile,
               "wall_s": round(wall, 1), "files": {"npz": npz, "grid": png}, **(extra or {})}
    write_json(summary, os.path.join(out, "sample.json"))
    return summary


def add_arguments(p) -> None:
    p.add_argument("--score-model", default="default",
                   help="'default' (the shipped digits model), a train-score export, a guided-diffusion checkpoint "
                        "with --score-config/--score-flag, a diffusers folder, or 'random' (tests only)")
    p.add_argument("--score-config", default=None, help="ADM_CONFIGS name of a checkpoint")
    p.add_argument("--score-flag", action="append", default=[], metavar="KEY=VALUE",
                   help="create_model flag of a checkpoint (repeatable)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="DDIM (eta 0: deterministic) or DDPM")
    p.add_argument("--steps", type=steps_spec, default=25,
                   help="respacing: N (guided-diffusion's 'N': N timesteps spread evenly) or a string such as "
                        "ddim25 or 10,15,20")
    p.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM's eta in [0, 1]")
    p.add_argument("--num", type=positive, default=64, help="images to sample")
    p.add_argument("--batch", type=positive, default=16, help="images per sampler call")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise (per batch) and of random labels")
    p.add_argument("--classifier", metavar="CKPT", default=None,
                   help="a train-guidance checkpoint (kind noisy or da): guide the samples towards --labels")
    p.add_argument("--classifier-scale", type=non_negative_float, default=None,
                   help="guidance scale (default 1.0, guided-diffusion's)")
    p.add_argument("--labels", default=None, help="with --classifier: 'random' (default) or a comma list of "
                   "class indices, repeated to --num")
    p.add_argument("--image-size", type=positive, default=None,
                   help="default: the classifier's, else the score model's image size, else 32")
    p.add_argument("--channels", type=positive, default=None,
                   help="default: the classifier's image channels, else the score model's, else 1")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="autocast dtype of the models")
    p.add_argument("--compile", action="store_true", help="torch.compile the score model and the classifier")
    p.add_argument("--out", default="samples_out", help="output folder")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="plain lines, no progress bar")


def main(args) -> int:
    device = check_device(NAME, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.classifier is None and (args.labels is not None or args.classifier_scale is not None):
            raise UsageError("--labels and --classifier-scale guide the samples: give --classifier CKPT")
        if args.eta > 1:
            raise UsageError(f"--eta must lie in [0, 1], got {args.eta}")
        if args.eta > 0 and args.sampler != "ddim":
            raise UsageError("--eta is DDIM's; DDPM's noise is fixed by its variance")
        torch.manual_seed(args.seed)  # the 'random' test model's weights follow --seed
        model, schedule = resolve_score_model(args.score_model, "digits", args.score_config, args.score_flag,
                                              args.channels)
        schedule = schedule or NoiseSchedule.linear(1000)
        model.to(device)
        classifier, labels, info = None, None, {}
        if args.classifier is not None:
            classifier = load_guidance_classifier(args.classifier, device)
            info = classifier.guidance_info
            labels = parse_labels(args.labels, args.num, info["num_classes"], args.seed)
        C = args.channels or info.get("image_channels") or getattr(model, "in_channels", None) or 1
        size = args.image_size or info.get("image_size") or getattr(model, "image_size", None) or 32
        if info and (C, size) != (info["image_channels"], info["image_size"]):
            raise UsageError(f"the classifier takes {info['image_size']}x{info['image_size']} images of "
                             f"{info['image_channels']} channels, not {size}x{size}x{C}")
        score_c = getattr(model, "in_channels", None)
        if score_c is not None and score_c != C:
            raise UsageError(f"the score model takes {score_c}-channel images, not {C}")
        summary = run(model, schedule, args.out, args.sampler, args.steps, args.num, args.batch, args.seed,
                      (C, size, size), classifier,
                      1.0 if args.classifier_scale is None else args.classifier_scale, labels, args.eta,
                      DTYPES[args.dtype], args.compile, device, False if args.no_progress else None,
                      info.get("classes"),
                      extra={"score_model": args.score_model, "classifier": args.classifier,
                             "labels": args.labels if args.classifier else None})
    except (FileNotFoundError, ValueError, TypeError) as e:
        sys.exit(f"diffaug {NAME}: {e}")
    print(f"sample: wrote {summary['files']['npz']} ({'x'.join(map(str, summary['shape']))} uint8"
          + (", labels" if summary["guided"] else "") + f") and {summary['files']['grid']} in {summary['wall_s']}s")
    return 0
