"""`diffaug bench-fp8`: the FP8 3x3 convolutions' accuracy budget D(t) and, on a Hopper GPU, their speed."""
from __future__ import annotations

import sys

from .options import check_device, dtype_list, int_list, positive

NAME = "bench-fp8"
HELP = "FP8 3x3 convolutions of the score model: accuracy D(t) (any device), speed (Hopper)"
DESCRIPTION = ("D(t) = E|x0_hat_fp8 - x0_hat_ref|^2 / E|x0_hat_ref - x0|^2 of the shipped digits model on the test "
               "digits, both weight granularities (FP8 emulated in float32 off Hopper; the reference in bf16 on a "
               "GPU, float32 on the CPU). On a Hopper GPU also the 256x256 uncond UNet (random weights unless "
               "--checkpoint): its D(t), the compiled FP8 UNet against the compiled bf16 one, and the FP8 kernel "
               "against cuDNN's bf16 convolution on its four most costly 3x3 shapes. The JSON's \"ratios\": "
               "fp8_denoise_change_max (largest D(t)) and unet_fp8_vs_bf16 (Hopper).")


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--granularity", choices=("tensor", "channel"), default="channel",
                   help="weight scales of the headline FP8 model (both are measured for D(t))")
    p.add_argument("--images", type=positive, default=360, help="test digits D(t) is measured on (360: all)")
    p.add_argument("--calib-images", type=positive, default=64,
                   help="training digits the activation scales are calibrated on, noised at every t")
    p.add_argument("--times", type=int_list, default="50,250,500,750,950", help="the t of D(t), comma list")
    p.add_argument("--reference-dtype", type=dtype_list("float32", "bfloat16"), default=None,
                   help="the reference model's autocast dtype (default: bfloat16 on a GPU, float32 on the CPU, "
                        "where bf16 convolutions are emulated and slow)")
    p.add_argument("--batch", type=positive, default=64, help="images per model call (digits); the UNet's batch (GPU)")
    p.add_argument("--size", type=positive, default=None, help="the 256x256 UNet's input size on the GPU (default 224)")
    p.add_argument("--reps", type=positive, default=5, help="timed repetitions, median reported")
    p.add_argument("--warmup", type=positive, default=2, help="untimed calls first, compiling")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a guided-diffusion 256x256 uncond checkpoint for the GPU part (default: random weights)")
    p.add_argument("--accuracy-images", type=positive, default=16, help="random images for the 256x256 D(t) (GPU)")
    p.add_argument("--no-unet", action="store_true", help="GPU: only the digits D(t), not the 256x256 UNet")
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 test digits, 16 calibration digits, "
                                                        "t = 50, 500, 950")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON here")


def main(args) -> int:
    import torch

    from ..bench import fp8 as bench_fp8

    device = check_device("bench-fp8", args.device)
    if not args.times or any(not 0 <= t < 1000 for t in args.times):
        sys.exit(f"diffaug bench-fp8: --times must be times in [0, 1000), got {args.times}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.calib_images, args.times = min(args.images, 32), min(args.calib_images, 16), (50, 500, 950)
    dtype = args.reference_dtype[0] if args.reference_dtype else None
    bench_fp8.run(device=device, granularity=args.granularity, images=args.images, calib_images=args.calib_images,
                  times=args.times, reference_dtype=dtype, batch=args.batch, size=args.size, reps=args.reps,
                  warmup=args.warmup, checkpoint=args.checkpoint, accuracy_images=args.accuracy_images,
                  unet=not args.no_unet, json_path=args.json)
    return 0
