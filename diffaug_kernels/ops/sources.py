"""A fingerprint of csrc/, compiled into the extension and checked at import: an extension built from other
sources than the checkout now holds (an edit without a rebuild, or a rebuild that failed and left the old
binary in place) is reported instead of silently running old kernels. Standard library only: setup.py runs it."""
from __future__ import annotations

import glob
import hashlib
import os


def sources_hash(csrc: str) -> int:
    """63-bit hash of csrc's C++/CUDA sources (names and contents), 0 where there are none."""
    files = sorted(glob.glob(os.path.join(csrc, "*.h")) + glob.glob(os.path.join(csrc, "*.cpp"))
                   + glob.glob(os.path.join(csrc, "*.cu")))
    if not files:
        return 0
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    return int(h.hexdigest()[:15], 16)
