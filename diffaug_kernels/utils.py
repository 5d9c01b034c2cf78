"""Small helpers every layer uses, one of each: the JSON writer, atomic checkpoint saves, checkpoint loading
with weights_only and one-line errors, the user-error type, progress display, and Ctrl-C as a request to stop."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import sys
import threading
import zipfile
from typing import Optional


class UsageError(ValueError):
    """Bad input from the user (a flag, a path, a file that is not what it should be): the commands print it as
    one line and exit with status 2."""


# ---------------------------------------------------------------------------------------------- files
def write_json(result: dict, path: str) -> None:
    """result as JSON at path (its folders made), replaced whole: a run killed mid-write leaves the previous
    version, not half a file (the temporary name carries the process id, so concurrent writers do not mix)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _replace_text(path, json.dumps(result, indent=1))


def _replace_text(path: str, text: str) -> None:
    """path's contents replaced whole through a temporary file (the process id in its name keeps concurrent
    writers apart); an error or Ctrl-C mid-write leaves the old file and no temporary one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str):
    """The JSON in a file, or None for a missing, unreadable or malformed one (a result a run may redo)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Journal:
    """Records of a long computation, one per unit of work (an integer key), kept so that a killed run resumes: rank
    r appends each record it finishes as a JSON line, flushed and fsync'ed, to its own file ``<path>.rank<r>`` (no
    two processes write one file; a lone process is rank 0). A file's first line is the stamp of the settings its
    records were made with: read() takes the records of every rank file with this stamp, whatever world size wrote
    them, and ignores the rest, as it does a last line cut short by a kill. Records must be JSON (ints, floats,
    strings, lists, dicts)."""

    def __init__(self, path: str, stamp, rank: int = 0):
        self.path, self.rank = path, int(rank)
        self.stamp = json.dumps(stamp, sort_keys=True)
        self._file = None

    def files(self) -> list:
        folder, base = os.path.split(self.path)
        prefix = base + ".rank"
        try:
            names = os.listdir(folder or ".")
        except FileNotFoundError:
            return []
        return sorted(os.path.join(folder, n) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())

    def read(self) -> dict:
        """{key: record} of every rank file made with this stamp (the first record of a key counts)."""
        got = {}
        for f in self.files():
            try:
                with open(f) as fh:
                    lines = fh.read().split("\n")[:-1]  # a last line without its newline is cut short
            except OSError:
                continue
            if not lines or lines[0] != self.stamp:
                continue
            for line in lines[1:]:
                try:
                    key, rec = json.loads(line)
                except ValueError:
                    continue
                got.setdefault(int(key), rec)
        return got

    def append(self, key: int, record) -> None:
        """Adds a record, durable before this returns (the rank file restarted when another stamp heads it)."""
        if self._file is None:
            path = f"{self.path}.rank{self.rank}"
            keep = False
            if os.path.isfile(path):
                with open(path, "rb+") as fh:
                    data = fh.read()
                    keep = data.startswith((self.stamp + "\n").encode())
                    if keep:  # a line cut short by a kill goes, so the next record starts a line
                        fh.truncate(data.rfind(b"\n") + 1)
            self._file = open(path, "a" if keep else "w")
            if not keep:
                self._file.write(self.stamp + "\n")
        self._file.write(json.dumps([int(key), record]) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Deletes every rank file (once the result they lead to is saved; one process, no rank writing)."""
        self.close()
        for f in self.files():
            os.remove(f)


def unused_path(stem: str, ext: str = ".json") -> str:
    """stem + ext, or stem-2 + ext, -3, ...: the first name not taken. A default output name never replaces a
    kept result (an earlier run of the same day); an explicit --json names a file to write whatever is there."""
    path, n = stem + ext, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}{ext}"
    return path


# A checkpoint's checksum: the zip archive's comment (the file's last bytes) is this tag and the SHA-256, in hex,
# of every byte before it. torch.load ignores the comment; torch_load checks it.
_SHA_TAG = b"diffaug-sha256:"
_SEAL = len(_SHA_TAG) + 64


def trim_log(path: str, last_step: int) -> None:
    """Drops the records of a JSON-lines log past last_step (the step a run resumes from), so the steps it repeats
    are logged once. Lines that are not records with a step stay."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()

    def keep(line: str) -> bool:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            return True
        return not (isinstance(step, int) and step > last_step)

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        _replace_text(path, "".join(line + "\n" for line in kept))


def atomic_save(obj, path: str) -> None:
    """torch.save(obj, path) through a temporary file (a run killed mid-save keeps the previous checkpoint), with
    the checksum torch_load verifies."""
    import torch

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with zipfile.ZipFile(tmp, "a") as z:  # the comment's room first: it is part of what the checksum covers
            z.comment = _SHA_TAG + b"0" * 64
        with open(tmp, "r+b") as f:
            data = f.read()
            f.seek(len(data) - 64)
            f.write(hashlib.sha256(data[:-_SEAL]).hexdigest().encode())
        os.replace(tmp, path)
    finally:  # an error or Ctrl-C mid-save leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def checksum_ok(path) -> Optional[bool]:
    """Whether a checkpoint's contents match the checksum atomic_save wrote; None for a file without one."""
    with open(path, "rb") as f:
        return _checksum_matches(f.read())


def _checksum_matches(data: bytes) -> Optional[bool]:
    tail = data[-_SEAL:]
    if not tail.startswith(_SHA_TAG):
        return None
    return hashlib.sha256(data[:-_SEAL]).hexdigest().encode() == tail[len(_SHA_TAG):]


def unreadable(e: BaseException) -> str:
    """Why torch.load / safetensors could not read a file, in one line."""
    msg = str(e).strip()
    if "WeightsUnpickler error:" in msg:  # torch's page-long weights_only message: name what it refused, and no
        # advice to load the file anyway (weights_only=False, add_safe_globals): a checkpoint is plain data here
        rest = [v.strip() for v in msg.split("WeightsUnpickler error:", 1)[1].splitlines() if v.strip()]
        what = re.search(r"GLOBAL (\S+)", rest[0]) if rest else None
        why = (f"it needs the Python object {what.group(1)} to load (pickled code)" if what
               else (rest[0].split(" Please ")[0][:200] if rest else type(e).__name__))
        return f"torch.load(weights_only=True) refused it: {why}; the file is not trusted and was not loaded"
    said = "torch.load(weights_only=True) refused it:"
    if said in msg:  # already said (a loader's re-raise, after the file's name)
        return msg[msg.index(said):]
    first = msg.splitlines()[0][:200] if msg else ""
    return f"unreadable: {type(e).__name__}" + (f": {first}" if first else "")


def _is_zip(source) -> bool:
    """zipfile.is_zipfile, which lets BadZipFile out for some damaged end records (a multi-disk one)."""
    try:
        return zipfile.is_zipfile(source)
    except zipfile.BadZipFile:
        return False


def is_torch_save_file(path) -> bool:
    """Whether a file starts like something torch.load reads: a zip archive (torch.save since 1.6) or a pickle."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head.startswith(b"\x80") or _is_zip(path)


def torch_load(path, kind: str, error=None):
    """torch.load(path, weights_only=True) on the CPU, or error(f"{path} is not a {kind} checkpoint (why)") (default
    UsageError) when the file is not a torch.save'd checkpoint of plain data: text, a truncated or foreign file."""
    import torch

    error = error or UsageError
    if os.path.isdir(path):
        raise error(f"{path} is a directory, not a {kind} checkpoint file")
    source = path  # a missing file: torch.load's FileNotFoundError
    if os.path.isfile(path):  # read once: the checks and torch.load share the bytes
        with open(path, "rb") as f:
            data = f.read()
        if not (data.startswith(b"\x80") or _is_zip(io.BytesIO(data))):
            if data.startswith(b"PK\x03\x04"):  # the start of a zip archive without its end
                raise error(f"{path} is truncated or damaged: an incomplete zip archive, not a whole {kind} "
                            f"checkpoint")
            raise error(f"{path} is not a {kind} checkpoint (neither a torch.save archive nor a pickle)")
        if _checksum_matches(data) is False:
            raise error(f"{path} is damaged: its contents do not match the checksum written with it (truncated or "
                        f"altered since it was saved)")
        source = io.BytesIO(data)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # KeyError: 101 (a text file), UnpicklingError, EOFError, RuntimeError (a bad zip)...
        raise error(f"{path} is not a {kind} checkpoint ({unreadable(e)})") from None


# ------------------------------------------------------------------------------------------- progress
class Progress:
    """Progress of a long loop: a tqdm bar on stderr (by default where stderr is a terminal; bar=True forces it,
    bar=False turns it off), and write() for log lines, printed above the bar or plainly without one.
    quiet=True prints nothing at all (the ranks of a distributed run other than the first)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", bar: Optional[bool] = None,
                 quiet: bool = False, leave: bool = True):
        self.quiet, self.bar = quiet, None
        if not quiet and (sys.stderr.isatty() if bar is None else bar):
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the plain lines remain
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                                file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        """Advances the bar by n, showing postfix (name=value) beside it."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def note(self, text: str, refresh: bool = False) -> None:
        """A short status beside the bar (e.g. the step inside a slow batch)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=refresh)

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------- Ctrl-C
class StopRequest:
    """Ctrl-C as a request to stop at the next step boundary. Inside `with StopRequest(what) as stop:`, the first
    SIGINT sets stop.requested (a training loop checks it between steps, saves a checkpoint and returns); a second
    one raises KeyboardInterrupt at once. Where signals cannot be caught (not the main thread) it never sets."""

    def __init__(self, what: str = "stopping after this step"):
        self.what, self.requested, self._old = what, False, None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nCtrl-C: {self.what} (Ctrl-C again stops at once, saving nothing)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def ignore_interrupt(worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: workers ignore Ctrl-C, which the main process turns into a clean stop (a
    worker killed by it would fail the next batch instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def eval_mode(*modules):
    """Every nn.Module among modules in eval mode for the block, then each submodule's own mode back (a plain
    module.train(saved) would set every child to the parent's mode)."""
    from torch import nn

    saved = [(m, m.training) for mod in modules if isinstance(mod, nn.Module) for m in mod.modules()]
    try:
        for mod in modules:
            if isinstance(mod, nn.Module):
                mod.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training
