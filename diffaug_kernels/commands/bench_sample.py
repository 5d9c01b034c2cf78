"""`diffaug bench-sample`: classifier-guided DDIM sampling (images/s) against guided-diffusion's classifier_sample
loop."""
from __future__ import annotations

import argparse
import sys

from .bench_model import add_model_bench_arguments, model_bench_device
from .options import check_png, dtype_list, non_negative_float, plot_result, positive

NAME = "bench-sample"
HELP = "time classifier-guided DDIM sampling: dk.sampling vs guided-diffusion's classifier_sample loop"
DESCRIPTION = ("Images per second of classifier-guided DDIM (eta 0) with dk.sampling.ddim_sample against the "
               "published classifier_sample.py loop of guided-diffusion (fp16 eager on a GPU, fp32 on the CPU), the "
               "same UNet and classifier weights, x_T, labels and steps, in one run; the run also checks that the "
               "fp32 images agree. CPU: the 8M-param 32x32 UNet and a 32x32 noisy classifier, 10 steps, batch 8; "
               "GPU: the 256x256 uncond model and the 256x256 classifier, 25 steps, batch 16.")


def add_arguments(p) -> None:
    add_model_bench_arguments(p, "8 on CPU, 16 on GPU", "the UNet's: 32 on CPU, 256 on GPU", reps=3, warmup=1)
    p.add_argument("--steps", type=positive, default=None,
                   help="respaced DDIM steps, DDIM striding (guided-diffusion's ddimN) (default 10 on CPU, 25 on GPU)")
    p.add_argument("--scale", type=non_negative_float, default=1.0, help="classifier scale")
    p.add_argument("--dtypes", type=dtype_list("float32", "bfloat16", "float16"), default="float32,bfloat16",
                   help="autocast dtypes of the dk rows, comma list of float32, bfloat16, float16 (a CPU without "
                        "AVX-512 BF16 emulates bfloat16 convolutions, slowly)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time ddim_sample(compile=True) for each dtype (one compile each: minutes on a CPU)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: torch's)")


def main(args) -> int:
    import torch

    from ..bench import sampling as bench_sampling

    model_bench_device("bench-sample", args)
    try:
        bench_sampling.check_options(args.device, args.size, args.steps)
    except ValueError as e:
        sys.exit(f"diffaug bench-sample: {e}")
    check_png("bench-sample", args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_sampling.run_sample(device=args.device, batch=args.batch, size=args.size, steps=args.steps,
                                       scale=args.scale, reps=args.reps, warmup=args.warmup, compile=args.compile,
                                       dtypes=args.dtypes, json_path=args.json)
    return plot_result(result, args.plot)
