"""Command line: `diffaug <command>` or `python -m diffaug_kernels <command>`.

Each command is one `_add_<name>(subparsers)` function that declares its options and sets `func`, so a new
command (demo, train-score, evaluate, ...) is one more function in COMMANDS; imports stay inside the
commands so `diffaug --help` is fast.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Optional, Sequence

RESULTS_DIR = os.path.join("benchmarks", "results")


def _shapes(s: str) -> tuple:
    try:
        shapes = tuple(tuple(int(d) for d in part.lower().split("x")) for part in s.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 64x3x224x224,256x3x32x32, got {s!r}") from None
    if not shapes or any(len(sh) != 4 or min(sh) < 1 for sh in shapes):  # the published code is image-only
        raise argparse.ArgumentTypeError(f"each shape must be BxCxHxW with positive sizes, got {s!r}")
    return shapes


def _dtypes(s: str) -> tuple:
    import torch

    names = [n.strip().removeprefix("torch.") for n in s.split(",") if n.strip()]
    ok = ("float16", "bfloat16", "float32", "float64")
    bad = [n for n in names if n not in ok]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"dtypes must be a comma list of {', '.join(ok)}, got {s!r}")
    return tuple(getattr(torch, n) for n in names)


def _ops(s: str) -> tuple:
    names = tuple(n.strip() for n in s.split(",") if n.strip())
    known = ("forward_noise", "tweedie", "forward_noise_multi")
    if not names or any(n not in known for n in names):
        raise argparse.ArgumentTypeError(f"ops must be a comma list of {', '.join(known)}, got {s!r}")
    return names


def _positive(s: str) -> int:
    if not s.strip().isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return int(s)


def _non_negative(s: str) -> int:
    if not s.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}")
    return int(s)


def _dda_scale(s: str):
    """'auto' or a finite number >= 0 (DDA's guidance scale)."""
    import math

    if s.strip().lower() == "auto":
        return "auto"
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a finite number >= 0, got {s!r}")
    return v


def check_device(cmd: str, spec: Optional[str]):
    """The torch.device a --device value names (None, '' or 'auto': cuda when torch sees a GPU, else cpu), checked
    to exist here; else SystemExit("diffaug CMD: ...") naming the value, before any model or data is touched."""
    import torch

    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise SystemExit(f"diffaug {cmd}: bad --device {spec!r}: expected cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"diffaug {cmd}: --device {spec}: not supported here (cpu, or cuda[:i] with a GPU)")
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise SystemExit(f"diffaug {cmd}: --device {spec}: torch sees no CUDA device here (use --device cpu)")
        if device.index is not None and device.index >= n:
            raise SystemExit(f"diffaug {cmd}: --device {spec}: torch sees only {n} CUDA device(s)")
    return device


# ------------------------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the fused ops against the published eager and compiled code",
                       description="Times forward_noise and tweedie: guided-diffusion's eager code, its "
                                   "torch.compile'd twin and every fused backend; prints one table.")
    p.add_argument("--shapes", type=_shapes, default=((64, 3, 224, 224), (256, 3, 32, 32)),
                   help="comma list of BxCxHxW (default 64x3x224x224,256x3x32x32)")
    p.add_argument("--dtypes", type=_dtypes, default=None, help="comma list (default float32,bfloat16)")
    p.add_argument("--ops", type=_ops, default=("forward_noise", "tweedie"),
                   help="comma list of forward_noise, tweedie, forward_noise_multi (the K=10 DiffAug-Ensemble "
                        "expansion); default forward_noise,tweedie")
    p.add_argument("--reps", type=_positive, default=10, help="timed repetitions; the median is reported (default 10)")
    p.add_argument("--warmup", type=_positive, default=5,
                   help="untimed calls first (default 5: past first-touch and huge-page set-up of fresh outputs)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true",
                   help="keep caches warm between calls (default: evict them before each timed call)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help=f"write results here (default: {RESULTS_DIR}/<device>-<date>.json when that folder "
                        "exists under the current directory; -2, -3, ... is added rather than replace a file)")
    p.add_argument("--no-json", action="store_true", help="write no JSON file")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the results as a bar chart (share of the copy bandwidth per implementation)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import torch

    from . import bench
    from .jsonfile import unused_path

    device = check_device("bench", args.device)
    _check_png("bench", args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = args.json
    if json_path is None and not args.no_json and os.path.isdir(RESULTS_DIR):
        json_path = unused_path(os.path.join(RESULTS_DIR, f"{device.type}-{datetime.date.today().isoformat()}"))
    result = bench.run_bench(shapes=args.shapes, dtypes=args.dtypes or (torch.float32, torch.bfloat16),
                             reps=args.reps, warmup=args.warmup, device=device,
                             json_path=None if args.no_json else json_path, op_names=args.ops,
                             flush=not args.no_flush)
    return _plot(result, args.plot)


# ------------------------------------------------------------------------------------- train-score
def _add_train_score(sub) -> None:
    p = sub.add_parser("train-score", help="train an eps-prediction ADM UNet (the DiffAug score model) with DDPM",
                       description="DDPM training (simple eps loss, t ~ U{0..T-1}, x_t from dk.forward_noise) of "
                                   "an ADM UNet: AdamW, EMA, gradient clipping, bf16 autocast, checkpoints with "
                                   "resume, export of the EMA weights to safetensors. Options left out take the "
                                   "defaults shown, or the checkpoint's values with --resume.")
    p.add_argument("--data", default=None, help="'digits' (embedded scikit-learn digits; default), "
                   "'cifar10:<root>' or a local ImageFolder directory")
    p.add_argument("--config", default=None, help="a key of dk.models.ADM_CONFIGS (default digits32)")
    p.add_argument("--model", action="append", default=None, metavar="NAME=VALUE",
                   help="override an ADM config flag, e.g. --model num_channels=16 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps to reach (default 2000)")
    p.add_argument("--batch-size", type=_positive, default=None, help="default 64")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--lr-warmup", type=int, default=None, help="linear learning-rate warm-up steps (default 100)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay, with warm-up (default 0.999)")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--schedule", choices=("linear", "cosine"), default=None, help="noise schedule (default linear)")
    p.add_argument("--T", type=_positive, default=None, help="diffusion steps (default 1000)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the UNet (default off)")
    p.add_argument("--seed", type=int, default=None, help="seed of init, data order, t and noise (default 0)")
    p.add_argument("--out", default=None,
                   help="checkpoint directory (default runs/train-score; with --resume, the checkpoint's folder)")
    p.add_argument("--save-every", type=_positive, default=None, help="checkpoint period in steps (default 500)")
    p.add_argument("--keep", type=int, default=2, help="newest checkpoints kept (default 2; 0 keeps all)")
    p.add_argument("--log-every", type=_positive, default=None, help="log period in steps (default 50)")
    p.add_argument("--export", metavar="PATH.safetensors", default=None,
                   help="write the EMA weights here, with the config and schedule in the metadata")
    p.add_argument("--export-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="dtype of the exported weights (default float16; loaded back as float32)")
    p.add_argument("--resume", metavar="PATH", default=None, help="a checkpoint file, or a directory (its newest)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")

    def run(args) -> int:
        args.device = str(check_device("train-score", args.device))  # before the data and the model
        from . import train_score

        return train_score.run_cli(args)

    p.set_defaults(func=run)


def _model_bench_args(p, batch: int, size_help: str) -> None:
    """The options bench-model and bench-ensemble share."""
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--batch", type=_positive, default=batch, help=f"images per call (default {batch})")
    p.add_argument("--size", type=_positive, default=None, help=f"image size (default {size_help})")
    p.add_argument("--reps", type=_positive, default=5, help="timed repetitions, median reported (default 5)")
    p.add_argument("--warmup", type=_positive, default=2, help="untimed calls first, compiling (default 2)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON here")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the results as a bar chart (images/s)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every row (cuDNN times its convolution algorithms; "
                        "off by default, as in the published code)")


def _model_bench_device(name: str, args) -> None:
    import torch

    from . import bench_model

    args.device = str(check_device(name, args.device))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.size:
        try:
            bench_model.check_size(args.size, bench_model._device_and_unet(args.device, None)[2])
        except ValueError as e:
            sys.exit(f"diffaug {name}: --size: {e}")


def _add_bench_model(sub) -> None:
    p = sub.add_parser("bench-model", help="time the UNet forward and the whole DiffAug step (images/s)",
                       description="The ADM UNet forward (eager fp32, bf16 autocast + channels_last, compiled) and "
                                   "the DiffAug step against the published pipeline, in one run. CPU: an 8M-param "
                                   "UNet at 32x32; GPU: the 256x256 uncond model at 224x224.")
    _model_bench_args(p, 64, "32 on CPU, 224 on GPU")
    p.add_argument("--profile", metavar="PATH", default=None,
                   help="also profile one compiled DiffAug step: time by kernel group and the top kernels, as text")
    p.add_argument("--nchw", action="store_true",
                   help="also time the compiled UNet on a contiguous (NCHW) input: which layout is faster (one more "
                        "compile)")
    p.add_argument("--candidates", action="store_true",
                   help="GPU: also time the compiled UNet with other settings than the default: group-norm "
                        "statistics group-wise (one more compile), cudnn.benchmark")
    p.set_defaults(func=_run_bench_model)


def _run_bench_model(args) -> int:
    from . import bench_model

    _model_bench_device("bench-model", args)
    if args.candidates:
        try:
            bench_model.check_candidates(args.device.startswith("cuda"))
        except ValueError as e:
            sys.exit(f"diffaug bench-model: --{e}")
    _check_png("bench-model", args.plot)
    result = bench_model.run(device=args.device, batch=args.batch, size=args.size, reps=args.reps,
                             warmup=args.warmup, json_path=args.json, profile=args.profile, nchw=args.nchw,
                             candidates=args.candidates)
    return _plot(result, args.plot)


def _add_bench_ensemble(sub) -> None:
    p = sub.add_parser("bench-ensemble", help="time DiffAug-Ensemble: batched times vs the per-t loop vs DDA",
                       description="DE over t = 0, 50, ..., 450 with batched times (dk.diffaug_ensemble) against "
                                   "the per-t loop of the published evaluation (and the same loop with the dk ops "
                                   "and UNet settings: the batching gain alone) and against DDA at the same batch. "
                                   "CPU: an 8M-param UNet at 32x32 and resnet18; GPU: the 256x256 uncond model "
                                   "and resnet50.")
    _model_bench_args(p, 8, "the UNet's, 32 on CPU, 256 on GPU")
    p.add_argument("--dda-reps", type=_non_negative, default=1,
                   help="timed DDA runs after one untimed warm-up (default 1: it is slow, minutes per call on a "
                        "CPU); 0 skips the DDA row (and the DE / DDA ratio)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the loop and DE with DiffAug(compile=True) (default: on GPU only; two compiles)")
    p.set_defaults(func=_run_bench_ensemble)


def _run_bench_ensemble(args) -> int:
    from . import bench_model

    _model_bench_device("bench-ensemble", args)
    _check_png("bench-ensemble", args.plot)
    result = bench_model.run_ensemble(device=args.device, batch=args.batch, size=args.size, reps=args.reps,
                                      warmup=args.warmup, dda_reps=args.dda_reps, compile=args.compile,
                                      json_path=args.json)
    return _plot(result, args.plot)


def _check_png(cmd: str, path) -> None:
    """--plot's folder made now, before a long benchmark, so an unwritable path is one line, not lost results."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        sys.exit(f"diffaug {cmd}: --plot {path}: {folder} (or a folder above it) is a file, not a folder")
    except OSError as e:
        sys.exit(f"diffaug {cmd}: --plot {path}: cannot make its folder ({e.strerror or e})")
    if os.path.isdir(path):
        sys.exit(f"diffaug {cmd}: --plot {path} is a folder; give a .png file name")


def _plot(result: dict, png) -> int:
    if png:
        from . import plots

        print(f"wrote {plots.results_chart(result, png)}")
    return 0


# --------------------------------------------------------------------------------------------- plot
def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw a kept benchmark result (bench, bench-model, bench-ensemble JSON) as a "
                                    "bar chart",
                       description="Reads a results file the bench commands wrote and draws it as a PNG bar chart: "
                                   "the ops as shares of the copy bandwidth, the model and ensemble rows as "
                                   "images/s.")
    p.add_argument("json", metavar="JSON", help="a results file (benchmarks/results/...)")
    p.add_argument("--out", metavar="PNG", default=None, help="where to write the chart (default: JSON's name, .png)")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from . import plots

    try:
        with open(args.json) as f:
            result = json.load(f)
        out = args.out or os.path.splitext(args.json)[0] + ".png"
        _check_png("plot", out)
        print(f"wrote {plots.results_chart(result, out)}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"diffaug plot: {args.json}: cannot draw it ({type(e).__name__}: {e})")
    return 0


# ----------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="classifiers x modes (Default, DE, DDA, DDA-SE) x datasets, the paper's table",
                       description="Top-1 accuracy of train_classifier checkpoints under Default, DiffAug-Ensemble, "
                                   "DDA and DDA-SE on digits(-C), CIFAR-10(-C) and ImageFolder sets (ImageNet, "
                                   "-C, -R, -Sketch, -A, -D); OOD detection (MSP, energy, ReAct, ASH-S, SCALE) with "
                                   "--ood-datasets. JSON per classifier x dataset in --out, resumable.")
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
    p.add_argument("--batch-size", type=_positive, default=64, help="images per batch (default 64)")
    p.add_argument("--max-images", type=_positive, default=None, help="evaluate a fixed random subset of N images")
    p.add_argument("--dda-max-images", type=_positive, default=None,
                   help="DDA / DDA-SE on a fixed random N of those (DDA costs ~150 model passes per image)")
    p.add_argument("--de-times", default="0:451:50",
                   help="DE times in [0, T) of the score model's schedule: '0,50,100' or start:stop:step "
                        "(default 0:451:50)")
    p.add_argument("--dda-steps", type=_positive, default=100, help="DDA respaced steps, 2..T (default 100)")
    p.add_argument("--dda-depth", type=_positive, default=50,
                   help="DDA depth N, 1..(--dda-steps - 1) (default 50)")
    p.add_argument("--dda-down", type=_positive, default=4,
                   help="DDA low-pass factor D, at most the image size (default 4)")
    p.add_argument("--dda-scale", type=_dda_scale, default="auto",
                   help="DDA guidance scale >= 0; 'auto' (default) = 6 * sqrt(C*H*W / (3*256*256))")
    p.add_argument("--image-size", type=_positive, default=None,
                   help="size the digits and ImageFolder sets are made at (CIFAR-10 stays 32); default: the "
                        "size the classifiers were trained at, else 32 for digits / CIFAR-10 sets and 224 otherwise")
    p.add_argument("--ood-datasets", default=None, help="comma list of OOD datasets (same syntax as --datasets)")
    p.add_argument("--id-dataset", default=None, help="the in-distribution set for OOD (default: first of --datasets)")
    p.add_argument("--react-percentile", type=float, default=90.0,
                   help="ReAct's clip threshold: this percentile of the ID set's penultimate activations (default 90)")
    p.add_argument("--ash-percentile", type=float, default=90.0, help="ASH-S pruning percentile (default 90)")
    p.add_argument("--scale-percentile", type=float, default=85.0, help="SCALE percentile (default 85)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto: cuda when available)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="results folder (JSON per classifier x dataset; resumable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args) -> int:
        from . import evaluate

        return evaluate.main_from_args(args)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="DiffAug end to end on the digits: train with/without, evaluate, plots",
                       description="Trains a small timm classifier on scikit-learn's digits with and without "
                                   "DiffAug (the shipped score model), evaluates Default / DE / DDA / DDA-SE on "
                                   "clean and corrupted test images, prints the table and writes results.json, "
                                   "the augmentation grid and the entropy-vs-t plot. About 3.3 minutes (198 s) "
                                   "measured on 2 CPU cores with the default threads (README.md); --quick for a "
                                   "smoke run.")
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts: a smoke run of every piece")
    p.add_argument("--epochs", type=_positive, default=None, help="classifier epochs (default 5; --quick 1)")
    p.add_argument("--model", default=None, help="timm classifier (default resnet10t; --quick test_resnet)")
    p.add_argument("--eval-images", type=_positive, default=None,
                   help="test images per dataset for Default and DE (default 200 of the 360 in the digits test split)")
    p.add_argument("--dda-images", type=_positive, default=None,
                   help="test images per dataset for DDA / DDA-SE (default 32: DDA is the slow mode)")
    p.add_argument("--corruptions", default=None,
                   help="comma list of corruption:severity[:preset] (default gaussian_noise:5:imagenet,"
                        "impulse_noise:5:imagenet,gaussian_blur:3:imagenet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch.set_num_threads (default: torch's); on a machine busy with other jobs --threads 1 "
                        "avoids oversubscription (measured: several times faster there)")
    p.add_argument("--score-model", default="default",
                   help="'default' (the shipped digits model) or 'random' (an untrained tiny UNet: smoke runs only)")

    def run(args) -> int:
        from . import demo

        return demo.main_from_args(args)

    p.set_defaults(func=run)


# -------------------------------------------------------------------------------------------- main
COMMANDS = (_add_bench, _add_bench_model, _add_bench_ensemble, _add_plot, _add_train_score, _add_evaluate, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffaug", description="diffaug-kernels: fused DiffAug ops, "
                                     "benchmarks and recipes.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
