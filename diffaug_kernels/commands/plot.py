"""`diffaug plot`: a kept benchmark result drawn as a bar chart."""
from __future__ import annotations

import json
import os
import sys

from .options import check_png

NAME = "plot"
HELP = "draw a kept benchmark result (bench, bench-model, bench-ensemble JSON) as a bar chart"
DESCRIPTION = ("Reads a results file the bench commands wrote and draws it as a PNG bar chart: the ops as shares of "
               "the copy bandwidth, the model and ensemble rows as images/s.")


def add_arguments(p) -> None:
    p.add_argument("json", metavar="JSON", help="a results file (benchmarks/results/...)")
    p.add_argument("--out", metavar="PNG", default=None, help="where to write the chart (default: JSON's name, .png)")


def main(args) -> int:
    from ..bench import plots

    try:
        with open(args.json) as f:
            result = json.load(f)
        out = args.out or os.path.splitext(args.json)[0] + ".png"
        check_png("plot", out)
        print(f"wrote {plots.results_chart(result, out)}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"diffaug plot: {args.json}: cannot draw it ({type(e).__name__}: {e})")
    return 0


