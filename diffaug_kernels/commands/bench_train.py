"""`diffaug bench-train`: the DiffAug training step end to end, the published way against the package's."""
from __future__ import annotations

import argparse

from .bench_model import add_model_bench_arguments, model_bench_device
from .options import check_png, dtype_list, plot_result

NAME = "bench-train"
HELP = "time the DiffAug training step end to end (images/s and its split), published vs the package"
DESCRIPTION = ("The DiffAug training step (augment the batch, classifier forward and backward on the clean images "
               "and x0_hat, optimizer step) the published way (guided-diffusion's q_sample + pred_xstart around an "
               "eager UNet, fp16 on a GPU, and an fp32 eager classifier) against the package's (dk.DiffAug "
               "compile=True and a compiled channels_last classifier, in each of --dtypes), in one run: images/s and "
               "the time of augmentation, classifier and optimizer, the device synchronised between them. CPU: an "
               "8M-param UNet at 32x32, resnet18, batch 16, float32; GPU: the 256x256 uncond model at 224x224, "
               "resnet50, batch 64, bfloat16.")


def add_arguments(p) -> None:
    add_model_bench_arguments(p, "16 on CPU, 64 on GPU", "the UNet's, 32 on CPU; 224 on GPU", reps=5, warmup=2)
    p.add_argument("--classifier", default=None, help="timm model name (default resnet18 on CPU, resnet50 on GPU)")
    p.add_argument("--dtypes", type=dtype_list("float32", "bfloat16", "float16"), default=None,
                   help="the package rows' dtypes (DiffAug's UNet and the classifier's autocast), comma list of "
                        "float32, bfloat16, float16 (default bfloat16 on GPU, float32 on CPU: a CPU without AVX-512 "
                        "BF16 emulates bfloat16 convolutions, slowly)")
    p.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="the optimizer of every row")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="the package rows compiled (--no-compile: eager, a quick check only)")


def main(args) -> int:
    from ..bench import train as bench_train

    model_bench_device("bench-train", args)
    check_png("bench-train", args.plot)
    result = bench_train.run_train(device=args.device, batch=args.batch, size=args.size, classifier=args.classifier,
                                   reps=args.reps, warmup=args.warmup, dtypes=args.dtypes, optimizer=args.opt,
                                   compile=args.compile, json_path=args.json)
    return plot_result(result, args.plot)
