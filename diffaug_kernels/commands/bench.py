"""`diffaug bench`: the fused ops timed against guided-diffusion's eager code and its torch.compile'd twin."""
from __future__ import annotations

import argparse
import datetime
import os

from .options import check_device, check_png, dtype_list, plot_result, positive

NAME = "bench"
HELP = "time the fused ops against the published eager and compiled code"
DESCRIPTION = ("Times forward_noise and tweedie (and, asked, forward_noise_multi, reverse_step and group_norm_silu): "
               "guided-diffusion's eager code, its torch.compile'd twin and every fused backend; prints one table.")
RESULTS_DIR = os.path.join("benchmarks", "results")


def _shapes(s: str) -> tuple:
    try:
        shapes = tuple(tuple(int(d) for d in part.lower().split("x")) for part in s.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 64x3x224x224,256x3x32x32, got {s!r}") from None
    if not shapes or any(len(sh) != 4 or min(sh) < 1 for sh in shapes):  # the published code is image-only
        raise argparse.ArgumentTypeError(f"each shape must be BxCxHxW with positive sizes, got {s!r}")
    return shapes


def _ops(s: str) -> tuple:
    names = tuple(n.strip() for n in s.split(",") if n.strip())
    known = ("forward_noise", "tweedie", "forward_noise_multi", "reverse_step", "group_norm_silu")
    if not names or any(n not in known for n in names):
        raise argparse.ArgumentTypeError(f"ops must be a comma list of {', '.join(known)}, got {s!r}")
    return names


def add_arguments(p) -> None:
    p.add_argument("--shapes", type=_shapes, default=((64, 3, 224, 224), (256, 3, 32, 32)),
                   help="comma list of BxCxHxW (default 64x3x224x224,256x3x32x32)")
    p.add_argument("--dtypes", type=dtype_list("float16", "bfloat16", "float32", "float64"), default=None,
                   help="comma list (default float32,bfloat16)")
    p.add_argument("--ops", type=_ops, default=("forward_noise", "tweedie"),
                   help="comma list of forward_noise, tweedie, forward_noise_multi (the K=10 DiffAug-Ensemble "
                        "expansion), reverse_step (a guided DDPM step with a learned variance), group_norm_silu "
                        "(ADM's ResBlock norm + scale-shift + SiLU, 32 groups: give C a multiple of 32); default "
                        "forward_noise,tweedie")
    p.add_argument("--layout", choices=("contiguous", "channels_last"), default="contiguous",
                   help="memory format of the image-shaped inputs (channels_last: the compiled UNet's) "
                        "(default contiguous)")
    p.add_argument("--reps", type=positive, default=10, help="timed repetitions; the median is reported (default 10)")
    p.add_argument("--warmup", type=positive, default=5,
                   help="untimed calls first (default 5: past first-touch and huge-page set-up of fresh outputs)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true",
                   help="keep caches warm between calls (default: evict them before each timed call)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help=f"write results here (default: {RESULTS_DIR}/<device>-<date>.json when that folder "
                        "exists under the current directory; -2, -3, ... is added rather than replace a file)")
    p.add_argument("--no-json", action="store_true", help="write no JSON file")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the results as a bar chart (share of the copy bandwidth per implementation)")


def main(args) -> int:
    import torch

    from ..bench import harness
    from ..utils import unused_path

    device = check_device("bench", args.device)
    check_png("bench", args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = args.json
    if json_path is None and not args.no_json and os.path.isdir(RESULTS_DIR):
        json_path = unused_path(os.path.join(RESULTS_DIR, f"{device.type}-{datetime.date.today().isoformat()}"))
    result = harness.run_bench(shapes=args.shapes, dtypes=args.dtypes or (torch.float32, torch.bfloat16),
                             reps=args.reps, warmup=args.warmup, device=device,
                             json_path=None if args.no_json else json_path, op_names=args.ops,
                             flush=not args.no_flush, layout=args.layout)
    return plot_result(result, args.plot)


