"""The certify command's logs on disk: one tab-separated log per classifier x sigma with its JSON sidecar, the
per-rank files a run appends to, and their merge.

A log ``<stem>.tsv`` holds the header line ``idx label predict radius correct time`` and one row per image,
sorted by index; ``<stem>.json`` beside it holds the settings the rows were made with. While a run certifies,
rank r appends each row it finishes, flushed and fsync'ed, to its own file ``<stem>.tsv.rank<r>`` (the log's
header and rows; a lone process is rank 0), so no two processes ever write one file. Rank 0 merges the log's
rows and every rank file's rows into the log: written to ``<stem>.tsv.merge``, fsync'ed and renamed over the log
(os.replace), only then are the rank files removed. A kill therefore leaves either the old log or the merged one,
and at worst a rank file whose rows the log already holds: the same index in two files with the same row is one
row; with different rows it is refused, as is an index twice in one file. A last line without its newline (a
kill mid-write) is dropped.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

from ..certify import ABSTAIN
from ..robustness import safe_name
from ..utils import UsageError, read_json, write_json

COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
HEADER = "\t".join(COLUMNS) + "\n"
LOG_FORMAT = "diffaug_kernels.certify_log.v1"


def log_paths(out: str, classifier: str, sigma: float) -> Tuple[str, str]:
    """(log, sidecar) of one classifier x sigma."""
    stem = os.path.join(out, f"{safe_name(classifier)}__sigma_{float(sigma)!r}")
    return stem + ".tsv", stem + ".json"


def rank_path(path: str, rank: int) -> str:
    """The file rank `rank` appends its rows of the log `path` to."""
    return f"{path}.rank{int(rank)}"


def rank_files(path: str) -> List[str]:
    """The rank files of the log `path` on disk, whatever world size wrote them, in rank order."""
    folder, base = os.path.split(path)
    prefix = base + ".rank"
    try:
        names = os.listdir(folder or ".")
    except FileNotFoundError:
        return []
    ranks = sorted(int(n[len(prefix):]) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())
    return [rank_path(path, r) for r in ranks]


def format_row(idx: int, label: int, predict: int, radius: float, seconds: float) -> str:
    correct = int(predict != ABSTAIN and predict == label)
    return (f"{int(idx)}\t{int(label)}\t{int(predict)}\t{float(radius)!r}\t{correct}\t"
            f"{datetime.timedelta(seconds=seconds)}\n")


def _line(row: tuple) -> str:
    """A row read by read_log as its line: the text format_row wrote."""
    idx, label, predict, radius, correct, seconds = row
    return f"{idx}\t{label}\t{predict}\t{radius!r}\t{correct}\t{seconds}\n"


def read_log(path: str) -> Tuple[List[tuple], int]:
    """(rows, whole) of a log: rows as (idx, label, predict, radius, correct, time) tuples, whole the byte length
    of its complete lines; a last line without its newline (a run killed mid-write) is left out of both, and so
    is a partial header. UsageError for anything else that is not a row."""
    with open(path, "rb") as f:
        data = f.read()
    whole = data.rfind(b"\n") + 1
    lines = data[:whole].decode("utf-8", errors="replace").splitlines()
    if not lines and HEADER.encode().startswith(data):  # empty, or a header cut short
        return [], 0
    if not lines or lines[0] + "\n" != HEADER:
        raise UsageError(f"{path} is not a certify log (its first line is not {HEADER.strip()!r}); move it away or "
                         f"give another --out")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        try:
            if len(parts) != len(COLUMNS):
                raise ValueError
            idx, label, predict, correct = (int(parts[i]) for i in (0, 1, 2, 4))
            radius = float(parts[3])
            if idx < 0 or correct not in (0, 1) or not radius >= 0 or math.isinf(radius):
                raise ValueError
        except ValueError:
            raise UsageError(f"{path}, line {n}, is not a row of {len(COLUMNS)} tab-separated columns "
                             f"{', '.join(COLUMNS)}: {line[:120]!r}") from None
        rows.append((idx, label, predict, radius, correct, parts[5]))
    return rows, whole


def _read_all(path: str) -> List[Tuple[str, List[tuple], int]]:
    """(file, rows, whole) of the log (when there) and of each of its rank files."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"{path} is not a file; move it away or give another --out")
    files = [path] if os.path.isfile(path) else []
    return [(f, *read_log(f)) for f in files + rank_files(path)]


def _merged(found: List[Tuple[str, List[tuple], int]], allowed: Sequence[int]) -> List[tuple]:
    """The rows of all the files, one per index, sorted by index; UsageError for an index twice in one file, at
    an index the settings never take, or with different rows in two files."""
    ok, rows, where = set(allowed), {}, {}
    for f, got, _ in found:
        seen = set()
        for r in got:
            if r[0] not in ok or r[0] in seen:
                why = "twice" if r[0] in seen else "which these settings never take"
                raise UsageError(f"{f} holds a row for image {r[0]} {why}; the log was edited: move it away")
            seen.add(r[0])
            if r[0] in rows and rows[r[0]][:5] != r[:5]:
                raise UsageError(f"{where[r[0]]} and {f} hold different rows for image {r[0]}; one was edited or "
                                 f"written by another run: move it away")
            rows.setdefault(r[0], r)
            where.setdefault(r[0], f)
    return [rows[i] for i in sorted(rows)]


def jsonable(obj):
    """obj as it reads back from JSON (tuples as lists), so settings compare equal to a sidecar's."""
    return json.loads(json.dumps(obj))


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_log(path: str, sidecar: str, settings: dict, allowed: Sequence[int]) -> List[tuple]:
    """The rows of a log and its rank files made with these settings, one per index, sorted by index; none for a
    missing log or one without rows (which prepare_log starts afresh, with these settings). UsageError, in one
    line, for a file that is not a certify log, rows made with other settings or without the sidecar, rows at
    indices these settings never take, twice in one file, or different in two. Nothing is written."""
    found = _read_all(path)
    if not any(rows for _, rows, _ in found):  # a header, or a kill before the first row: nothing to contradict
        return []
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or meta.get("format") != LOG_FORMAT or not isinstance(meta.get("settings"), dict):
        raise UsageError(f"{path} has no readable settings file {os.path.basename(sidecar)} beside it, so it cannot "
                         f"be continued; move it away or give another --out")
    old, new = meta["settings"], jsonable(settings)
    if old != new:
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        said = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diff[:3])
        raise UsageError(f"{path} was written with other settings ({said}{'; ...' if len(diff) > 3 else ''}); "
                         f"rerun with its settings, or give another --out")
    return _merged(found, allowed)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # a platform without folder handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    """text as the file at path, atomically: a reader (or a kill) sees the old file or the new one, whole."""
    tmp = path + ".merge"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(os.path.dirname(path))


def merge_log(path: str, allowed: Sequence[int]) -> List[tuple]:
    """Merges the rank files of a log into it (the log written atomically, sorted by index, without a partial last
    line) and removes them; the log is left untouched when it already holds exactly the merged rows. Returns the
    rows; UsageError as check_log's (nothing written then). Only one process may call it, with no rank writing."""
    found = _read_all(path)
    rows = _merged(found, allowed)
    ranks = [f for f, _, _ in found if f != path]
    mine = [(r, whole) for f, r, whole in found if f == path]
    if ranks or not mine or mine[0][0] != rows or mine[0][1] != os.path.getsize(path):
        _write(path, HEADER + "".join(_line(r) for r in rows))
    for f in ranks:
        os.remove(f)
    if ranks:
        _fsync_folder(os.path.dirname(path))
    return rows


def prepare_log(path: str, sidecar: str, settings: dict, t: int, allowed: Sequence[int]) -> None:
    """Makes a log that check_log accepted ready for a run: one with rows (in it or in rank files of an earlier
    run) is merged (merge_log); a new one, or one without rows, gets its sidecar and then its header (in that
    order, so a log never has rows without the settings they were made with), and rank files without rows
    go."""
    if any(rows for _, rows, _ in _read_all(path)):
        merge_log(path, allowed)
        return
    write_json({"format": LOG_FORMAT, "settings": jsonable(settings), "t": t}, sidecar)
    _write(path, HEADER)
    for f in rank_files(path):
        os.remove(f)


def open_rank_log(path: str, rank: int):
    """The rank file of this rank, open for appending rows (its header written when it is new)."""
    f = open(rank_path(path, rank), "a")
    if f.tell() == 0:
        append_row(f, HEADER)
    return f


def append_row(f, row: str) -> None:
    """Appends a row and makes it durable before the next image starts."""
    f.write(row)
    f.flush()
    os.fsync(f.fileno())


def summary_rows(path: str, indices: Sequence[int]) -> Dict[int, tuple]:
    """{index: row} of a log for the given indices (the first row of an index counts); none for a missing log."""
    want = set(int(i) for i in indices)
    got = {}
    for r in (read_log(path)[0] if os.path.isfile(path) else []):
        if r[0] in want:
            got.setdefault(r[0], r)
    return got
