"""`diffaug bench-certify`: certify's noise samples per second against the published DDS loop."""
from __future__ import annotations

import argparse

from .bench_model import add_model_bench_arguments, model_bench_device
from .options import check_png, dtype_list, plot_result, positive, positive_float

NAME = "bench-certify"
HELP = "time certification's noise samples: dk.certify vs the published DDS loop"
DESCRIPTION = ("Noise samples per second of certify (one image, batches of noise draws through the UNet's Tweedie "
               "step and the classifier) against the published DDS loop (q_sample and p_sample of guided-diffusion), "
               "the same UNet, classifier and batch. CPU: an 8M-param UNet at 32x32 and resnet18, batch 64; GPU: the "
               "256x256 uncond model at 224x224 and resnet50, batch 200.")


def add_arguments(p) -> None:
    add_model_bench_arguments(p, "64 on CPU, 200 on GPU", "the UNet's, 32 on CPU; 224 on GPU", reps=3, warmup=1)
    p.add_argument("--sigma", type=positive_float, default=0.5, help="smoothing noise, pixel units (t* from it)")
    p.add_argument("--batches", type=positive, default=2, help="batches of noise draws per timed call")
    p.add_argument("--dtypes", type=dtype_list("float32", "bfloat16", "float16"), default="float32,bfloat16",
                   help="the UNet's dtypes in the dk rows, comma list of float32, bfloat16, float16 (a CPU without "
                        "AVX-512 BF16 emulates bfloat16 convolutions, slowly: give float32 there)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time DenoisedSmoothing(compile=True) for each dtype (one compile each)")


def main(args) -> int:
    from ..bench import model as bench_model

    model_bench_device("bench-certify", args)
    check_png("bench-certify", args.plot)
    result = bench_model.run_certify(device=args.device, batch=args.batch, size=args.size, sigma=args.sigma,
                                     batches=args.batches, reps=args.reps, warmup=args.warmup, compile=args.compile,
                                     dtypes=args.dtypes, json_path=args.json)
    return plot_result(result, args.plot)
