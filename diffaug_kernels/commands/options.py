"""Option types and checks the commands share: counts, --device, --plot paths, the benchmark chart."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional


def positive(s: str) -> int:
    if not s.strip().isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return int(s)


def non_negative(s: str) -> int:
    if not s.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}")
    return int(s)


def _finite(s: str) -> float:
    """s as a finite float, NaN when it is none."""
    try:
        v = float(s)
    except ValueError:
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def positive_float(s: str) -> float:
    v = _finite(s)
    if not v > 0:  # (False for NaN)
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s!r}")
    return v


def non_negative_float(s: str) -> float:
    v = _finite(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def dtype_list(*allowed: str):
    """An option type: a comma list of torch dtype names among `allowed` ("torch." prefix accepted), in order."""

    def parse(s: str) -> tuple:
        import torch

        names = [n.strip().removeprefix("torch.") for n in s.split(",") if n.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"dtypes must be a comma list of {', '.join(allowed)}, got {s!r}")
        return tuple(getattr(torch, n) for n in names)

    return parse


def int_list(s: str) -> tuple:
    """A comma list of distinct integers ('' is the empty list: a command that needs one says so)."""
    try:
        out = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {s!r}")
    return out


def float_list(s: str) -> tuple:
    """A comma list of distinct non-negative finite numbers, at least one."""
    out = tuple(non_negative_float(v) for v in s.split(",") if v.strip())
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative numbers, got {s!r}")
    return out


def boolean(s: str) -> bool:
    """guided-diffusion's boolean flags: true/false, yes/no, 1/0."""
    v = s.strip().lower()
    if v in ("true", "yes", "1", "t", "y"):
        return True
    if v in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {s!r}")


def probability(s: str) -> float:
    """A number in the open interval (0, 1) (a failure probability such as certify's alpha)."""
    v = _finite(s)
    if not 0 < v < 1:  # (False for NaN)
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {s!r}")
    return v


def fraction(s: str) -> float:
    """A finite number in [0, 1) (a decay, a dropout or smoothing rate, a momentum)."""
    v = _finite(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {s!r}")
    return v


def seed(s: str) -> int:
    """A seed: an integer in [0, 2**63) (what torch.manual_seed and the Philox key take without wrapping)."""
    if not s.strip().isdigit() or int(s) >= 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {s!r}")
    return int(s)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command, with a pointer to --help (argparse's
    default prints the whole usage first, a dozen lines for the larger commands). Control characters of the
    user's arguments (a newline in an unrecognised argument) are written escaped, so the line stays one."""

    def error(self, message: str):
        message = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already says it or there is none to say."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def dda_scale(s: str):
    """'auto' or a finite number >= 0 (DDA's guidance scale)."""
    if s.strip().lower() == "auto":
        return "auto"
    v = _finite(s)
    if not v >= 0:
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


def check_png(cmd: str, path) -> None:
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


def plot_result(result: dict, png) -> int:
    if png:
        from ..bench import plots

        print(f"wrote {plots.results_chart(result, png)}")
    return 0


