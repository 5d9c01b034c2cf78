"""`diffaug bench-model`: the ADM UNet forward and the whole DiffAug step against the published pipeline."""
from __future__ import annotations

import argparse
import sys

from .options import check_device, check_png, plot_result, positive

NAME = "bench-model"
HELP = "time the UNet forward and the whole DiffAug step (images/s)"
DESCRIPTION = ("The ADM UNet forward (eager fp32, bf16 autocast + channels_last, compiled) and the DiffAug step "
               "against the published pipeline, in one run. CPU: an 8M-param UNet at 32x32; GPU: the 256x256 "
               "uncond model at 224x224.")


def add_model_bench_arguments(p, batch, size_help: str, reps: int = 5, warmup: int = 2) -> None:
    """The options the model benchmarks share (bench-model, bench-ensemble, bench-certify). batch: an int, or
    the words saying the default."""
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--batch", type=positive, default=batch if isinstance(batch, int) else None,
                   help=f"images per call (default {batch})")
    p.add_argument("--size", type=positive, default=None, help=f"image size (default {size_help})")
    p.add_argument("--reps", type=positive, default=reps, help=f"timed repetitions, median reported (default {reps})")
    p.add_argument("--warmup", type=positive, default=warmup, help=f"untimed calls first, compiling (default {warmup})")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON here")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the results as a bar chart (images/s)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every row (cuDNN times its convolution algorithms; "
                        "off by default, as in the published code)")


def model_bench_device(name: str, args) -> None:
    import torch

    from ..bench import model as bench_model

    args.device = str(check_device(name, args.device))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.size:
        try:
            bench_model.check_size(args.size, bench_model.device_and_unet(args.device, None)[2])
        except ValueError as e:
            sys.exit(f"diffaug {name}: --size: {e}")


def add_arguments(p) -> None:
    add_model_bench_arguments(p, 64, "32 on CPU, 224 on GPU")
    p.add_argument("--profile", metavar="PATH", default=None,
                   help="also profile one compiled DiffAug step: time by kernel group and the top kernels, as text")
    p.add_argument("--nchw", action="store_true",
                   help="also time the compiled UNet on a contiguous (NCHW) input: which layout is faster (one more "
                        "compile)")
    p.add_argument("--candidates", action="store_true",
                   help="GPU: also time the compiled UNet with other settings than the default: group-norm "
                        "statistics group-wise (one more compile), cudnn.benchmark")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the UNet with fused group_norm_silu (one more compile; default: on a GPU) and "
                        "check its output against the unfused one; with --profile, profile its step too")


def main(args) -> int:
    from ..bench import model as bench_model

    model_bench_device("bench-model", args)
    if args.candidates:
        try:
            bench_model.check_candidates(args.device.startswith("cuda"))
        except ValueError as e:
            sys.exit(f"diffaug bench-model: --{e}")
    check_png("bench-model", args.plot)
    result = bench_model.run(device=args.device, batch=args.batch, size=args.size, reps=args.reps,
                             warmup=args.warmup, json_path=args.json, profile=args.profile, nchw=args.nchw,
                             candidates=args.candidates, fused=args.fused)
    return plot_result(result, args.plot)


