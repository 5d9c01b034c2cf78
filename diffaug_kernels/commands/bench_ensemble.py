"""`diffaug bench-ensemble`: DiffAug-Ensemble with batched times against the per-t loop and against DDA."""
from __future__ import annotations

import argparse

from .bench_model import add_model_bench_arguments, model_bench_device
from .options import check_png, non_negative, plot_result

NAME = "bench-ensemble"
HELP = "time DiffAug-Ensemble: batched times vs the per-t loop vs DDA"
DESCRIPTION = ("DE over t = 0, 50, ..., 450 with batched times (dk.diffaug_ensemble) against the per-t loop of the "
               "published evaluation (and the same loop with the dk ops and UNet settings: the batching gain alone) "
               "and against DDA at the same batch. CPU: an 8M-param UNet at 32x32 and resnet18; GPU: the 256x256 "
               "uncond model and resnet50.")


def add_arguments(p) -> None:
    add_model_bench_arguments(p, 8, "the UNet's, 32 on CPU, 256 on GPU")
    p.add_argument("--dda-reps", type=non_negative, default=1,
                   help="timed DDA runs after one untimed warm-up (default 1: it is slow, minutes per call on a "
                        "CPU); 0 skips the DDA row (and the DE / DDA ratio)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the loop and DE with DiffAug(compile=True) (default: on GPU only; two compiles)")


def main(args) -> int:
    from ..bench import model as bench_model

    model_bench_device("bench-ensemble", args)
    check_png("bench-ensemble", args.plot)
    result = bench_model.run_ensemble(device=args.device, batch=args.batch, size=args.size, reps=args.reps,
                                      warmup=args.warmup, dda_reps=args.dda_reps, compile=args.compile,
                                      json_path=args.json)
    return plot_result(result, args.plot)


