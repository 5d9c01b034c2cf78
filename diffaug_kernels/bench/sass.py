"""The compiled extension's sm_90 machine code (SASS), read without a GPU: per-kernel resource use and
instruction counts, for tests (tests/ops/test_build.py) and tools/sass_stats.py. Uses the cuobjdump that Triton
bundles (the CUDA toolkit here ships none), else one on PATH."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def cuobjdump() -> str | None:
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


@dataclass
class Kernel:
    name: str  # mangled
    regs: int
    stack: int
    local: int
    sass: list[tuple[int, str]]  # (address, instruction text without the trailing ";")


def kernels(binary: str, tool: str | None = None) -> list[Kernel]:
    """Every kernel in a shared object or cubin, with its resource use and SASS."""
    tool = tool or cuobjdump()
    if tool is None:
        raise FileNotFoundError("no cuobjdump: Triton bundles one (is triton installed?)")
    usage = subprocess.run([tool, "-res-usage", binary], check=True, capture_output=True, text=True).stdout
    res = {n: (int(r), int(s), int(lo)) for n, r, s, lo in
           re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)}
    sass = subprocess.run([tool, "-sass", binary], check=True, capture_output=True, text=True).stdout
    out = []
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0].strip()
        code = [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", body)]
        r, s, lo = res.get(name, (-1, -1, -1))
        out.append(Kernel(name, r, s, lo, code))
    return out


def outer_loop(k: Kernel) -> tuple[int, int, int]:
    """(set-up, loop, cold): instructions before the outermost backward branch's target (a kernel's set-up), from
    there to that branch (its main loop body), and of those, the ones that valid inputs never run: what a
    predicated forward branch skips to avoid a call (the device-side assert; libm's sqrtf slow path) or local
    memory (libm's sincosf reduction of huge arguments)."""
    idx = {a: i for i, (a, _) in enumerate(k.sass)}
    back, skips = [], []
    for i, (a, ins) in enumerate(k.sass):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if not m or int(m.group(1), 16) not in idx:
            continue
        j = idx[int(m.group(1), 16)]
        if j < i:
            back.append((j, i))
        elif ins.startswith("@") and any(re.match(r"(@\S+\s+)?(CALL|LDL|STL)\b", c) for _, c in k.sass[i + 1:j]):
            skips.append((i + 1, j))
    if not back:
        return len(k.sass), 0, 0
    start, end = min(back)
    cold = set()
    for a, b in skips:
        if start <= a and b <= end + 1:
            cold.update(range(a, b))
    return start, end - start + 1, len(cold)
