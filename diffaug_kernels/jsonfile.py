"""Result files: the one JSON writer every command uses (benchmarks, evaluate, ood, the demo)."""
from __future__ import annotations

import json
import os


def write_json(result: dict, path: str) -> None:
    """result as JSON at path (its folders made), replaced whole: a run killed mid-write leaves the previous
    version, not half a file (the temporary name carries the process id, so concurrent writers do not mix)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def unused_path(stem: str, ext: str = ".json") -> str:
    """stem + ext, or stem-2 + ext, -3, ...: the first name not taken. A default output name never replaces a
    kept result (an earlier run of the same day); an explicit --json names a file to write whatever is there."""
    path, n = stem + ext, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}{ext}"
    return path
