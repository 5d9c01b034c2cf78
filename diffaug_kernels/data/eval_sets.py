"""The data sets of an evaluation, named by spec strings (the evaluate command's --datasets and --ood-datasets).

Datasets (``--datasets``, comma-separated; nothing is downloaded, a missing path is a clear error):

* ``digits``: scikit-learn's digits, the held-out split (dk.data.digits), 32x32.
* ``digits-c:<corruption>:<severity>[:<preset>]``: the same images corrupted on the fly (dk.corruptions; ``all``
  for every corruption, severity defaults to 5; preset ``cifar`` (the default at 32x32) or ``imagenet``: the
  CIFAR-10-C constants barely touch the smooth upsampled 8x8 digits, the ImageNet-C ones do).
* ``cifar10:<root>``: CIFAR-10's test batch.
* ``cifar10-c:<root>:<corruption>:<severity>``: CIFAR-10-C's released files ``<root>/<corruption>.npy``
  ([50000, 32, 32, 3] uint8, severities 1..5 in blocks of 10000) and ``<root>/labels.npy``; ``all`` for every
  ``.npy`` corruption file in root, severity defaults to 5.
* ``imagenet-c:<root>:<severity>``: every ``<root>/<corruption>/<severity>`` (or ``<root>/<category>/<corruption>/
  <severity>``) ImageFolder tree, severity defaulting to 5; the table also shows their mean (``imagenet-c@5``).
* any other value: an ImageFolder tree (ImageNet val, one ImageNet-C ``<corruption>/<severity>`` folder,
  ImageNet-R, -Sketch, -A, -D). Class folders named by WordNet id (``n01440764``...) are mapped to the 1000
  ImageNet-1k indices (timm's ImageNetInfo) when the classifier has 1000 outputs; a tree with a subset of the
  classes (ImageNet-R and -A: 200) is scored on those classes only (the logits of the others are masked out),
  the standard protocol for these sets.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils import UsageError
from . import corruptions as C
from .datasets import CIFAR10, digits, image_folder


class CIFAR10C(Dataset):
    """CIFAR-10-C's released arrays: ``<root>/<corruption>.npy`` ([50000, 32, 32, 3] uint8: severities 1..5, 10000
    images each, in order) and ``<root>/labels.npy``; images as float32 [3, 32, 32] in [-1, 1]."""

    def __init__(self, root: str, corruption: str, severity: int = 5):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"CIFAR-10-C folder not found at {root!r} (nothing is downloaded)")
        path = os.path.join(root, f"{corruption}.npy")
        labels = os.path.join(root, "labels.npy")
        for p in (path, labels):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"CIFAR-10-C file {p!r} is missing")
        if severity not in C.SEVERITIES:
            raise UsageError(f"CIFAR-10-C severity must be 1..5, got {severity}")
        try:  # allow_pickle stays False: an object array is refused, not unpickled
            x, y = np.load(path, mmap_mode="r"), np.load(labels)
        except (ValueError, EOFError, OSError) as e:
            raise UsageError(f"{path} or {labels} is not a CIFAR-10-C .npy array of numbers ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.shape[0] % 5 or y.ndim != 1 or len(y) < x.shape[0]:
            raise UsageError(f"{path}: expected [5 * N, 32, 32, 3] uint8 images and >= 5 * N labels, got {x.shape} "
                            f"and {y.shape}")
        if x.dtype != np.uint8:  # 0..255 is what the [-1, 1] mapping below assumes
            raise UsageError(f"{path}: expected uint8 images (CIFAR-10-C's 0..255), got {x.dtype}")
        if y.dtype.kind not in "iu" or len(y) and (y.min() < 0 or y.max() > 9):
            raise UsageError(f"{labels}: expected integer labels 0..9, got {y.dtype} in "
                            f"[{y.min() if len(y) else '-'}, {y.max() if len(y) else '-'}]")
        n = x.shape[0] // 5
        lo = (severity - 1) * n
        self.x, self.y = x[lo:lo + n], np.asarray(y[lo:lo + n], dtype=np.int64)
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = torch.from_numpy(np.array(self.x[i])).permute(2, 0, 1).float() / 127.5 - 1
        return img, int(self.y[i])


@dataclass
class DatasetSpec:
    name: str  # the column name
    kind: str  # digits | digits-c | cifar10 | cifar10-c | folder
    args: tuple = ()
    group: Optional[str] = None  # expanded from one spec (e.g. imagenet-c:root:5): the table shows their mean


def _sev(s: Optional[str], spec: str) -> int:
    if s is None or s == "":
        return 5
    if not s.isdigit() or int(s) not in C.SEVERITIES:
        raise UsageError(f"dataset {spec!r}: severity must be 1..5, got {s!r}")
    return int(s)


def parse_datasets(specs: Sequence[str]) -> List[DatasetSpec]:
    """Dataset strings (see the module docstring) -> DatasetSpecs, 'all' and imagenet-c expanded."""
    out: List[DatasetSpec] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec == "digits":
            out.append(DatasetSpec("digits", "digits"))
        elif spec.startswith("digits-c:"):
            parts = spec.split(":")
            if len(parts) not in (2, 3, 4):
                raise UsageError(f"dataset {spec!r}: expected digits-c:<corruption>[:<severity>[:<preset>]]")
            sev = _sev(parts[2] if len(parts) >= 3 else None, spec)
            preset = parts[3] if len(parts) == 4 else None
            if preset is not None and preset not in C.PRESETS:
                raise UsageError(f"dataset {spec!r}: preset must be one of {C.PRESETS}, got {preset!r}")
            names = C.CORRUPTIONS if parts[1] == "all" else [parts[1]]
            for n in names:
                if n not in C.CORRUPTIONS:
                    raise UsageError(f"dataset {spec!r}: unknown corruption {n!r}; "
                                    f"available: {', '.join(C.CORRUPTIONS)}")
                tag = f"digits-c:{n}:{sev}" + (f":{preset}" if preset else "")
                group = f"digits-c@{sev}" + (f":{preset}" if preset else "")
                out.append(DatasetSpec(tag, "digits-c", (n, sev, preset), group if len(names) > 1 else None))
        elif spec.startswith("cifar10:"):
            out.append(DatasetSpec("cifar10", "cifar10", (spec.split(":", 1)[1],)))
        elif spec.startswith("cifar10-c:"):
            root, *rest = spec.split(":", 1)[1].split(":")
            if len(rest) > 2:
                raise UsageError(f"dataset {spec!r}: expected cifar10-c:<root>:<corruption>[:<severity>]")
            corr = rest[0] if rest else "all"
            sev = _sev(rest[1] if len(rest) > 1 else None, spec)
            if corr == "all":
                if not os.path.isdir(root):
                    raise FileNotFoundError(f"CIFAR-10-C folder not found at {root!r} (nothing is downloaded)")
                names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(root, "*.npy"))
                               if os.path.basename(p) != "labels.npy")
                if not names:
                    raise FileNotFoundError(f"no <corruption>.npy files in CIFAR-10-C folder {root!r}")
            else:
                names = [corr]
            for n in names:
                out.append(DatasetSpec(f"cifar10-c:{n}:{sev}", "cifar10-c", (root, n, sev),
                                       f"cifar10-c@{sev}" if len(names) > 1 else None))
        elif spec.startswith("imagenet-c:"):
            root, *rest = spec.split(":", 1)[1].split(":")
            sev = _sev(rest[0] if rest else None, spec)
            if not os.path.isdir(root):
                raise FileNotFoundError(f"ImageNet-C folder not found at {root!r} (nothing is downloaded)")
            dirs = sorted(set(glob.glob(os.path.join(root, "*", str(sev))) +
                              glob.glob(os.path.join(root, "*", "*", str(sev)))))
            dirs = [d for d in dirs if os.path.isdir(d)]
            if not dirs:
                raise FileNotFoundError(f"no <corruption>/{sev} folders under ImageNet-C root {root!r}")
            for d in dirs:
                corr = os.path.basename(os.path.dirname(d))
                out.append(DatasetSpec(f"imagenet-c:{corr}:{sev}", "folder", (d,), f"imagenet-c@{sev}"))
        else:
            if not os.path.isdir(spec):
                raise FileNotFoundError(f"dataset {spec!r} is neither a known name (digits, digits-c:..., "
                                        f"cifar10:<root>, cifar10-c:<root>:..., imagenet-c:<root>:<sev>) nor an "
                                        f"existing ImageFolder directory")
            norm = os.path.normpath(spec)
            base = os.path.basename(norm)
            parent = os.path.basename(os.path.dirname(norm))
            name = f"{parent}/{base}" if base.isdigit() or base in ("val", "test", "train") else base
            out.append(DatasetSpec(name, "folder", (spec,)))
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"datasets with the same name {dup}: give distinct folders")
    return out


class _Grey(Dataset):
    """An RGB dataset's images as one grey channel, for a 1-channel classifier: torchvision's Grayscale (ITU-R
    601-2 luma, 0.299 R + 0.587 G + 0.114 B; linear with weights summing to 1, so it maps [-1, 1] to [-1, 1])."""

    def __init__(self, base: Dataset):
        self.base = base
        if hasattr(base, "classes"):
            self.classes = base.classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from torchvision.transforms.functional import rgb_to_grayscale

        x, y = self.base[i]
        return rgb_to_grayscale(x, num_output_channels=1), y


class _ReadChecked:
    """An ImageFolder's loader that names the file it could not read (a corrupt or mislabelled image) instead of
    PIL's traceback; the evaluation stops there (the file is not skipped: the counts would silently change)."""

    def __init__(self, load):
        self.load = load

    def __call__(self, path):
        try:
            return self.load(path)
        except Exception as e:  # PIL's UnidentifiedImageError, a truncated file, an OSError...
            why = str(e).splitlines()[0] if str(e) else ""
            raise UsageError(f"cannot read image {path!r} ({type(e).__name__}: {why}): fix or remove the file "
                            f"(with --out, the pairs already finished are kept)") from None


def check_channels(ds: DatasetSpec, channels: int) -> None:
    """UsageError unless the dataset's images can be fed to a `channels`-channel classifier: digits are made with 1
    or 3 channels; CIFAR-10(-C) and ImageFolder images are RGB, turned grey for a 1-channel classifier."""
    if channels not in (1, 3):
        raise UsageError(f"the classifier takes {channels}-channel images; dataset {ds.name!r} has 1- or 3-channel "
                        f"ones only")


def build_dataset(ds: DatasetSpec, size: int, channels: int, seed: int = 0) -> Dataset:
    """The images of a dataset spec as `channels`-channel float tensors in [-1, 1] (RGB sets are converted to grey
    for channels=1, digits are made with that many channels)."""
    check_channels(ds, channels)
    if ds.kind == "digits":
        return digits("test", size, channels)
    if ds.kind == "digits-c":
        return C.CorruptedDataset(digits("test", size, channels), *ds.args[:2], seed=seed, preset=ds.args[2])
    if ds.kind == "cifar10":
        rgb = CIFAR10(ds.args[0], train=False)
    elif ds.kind == "cifar10-c":
        rgb = CIFAR10C(*ds.args)
    elif ds.kind == "folder":
        rgb = image_folder(ds.args[0], size, train=False)
        rgb.loader = _ReadChecked(rgb.loader)
    else:
        raise UsageError(f"unknown dataset kind {ds.kind!r}")
    return _Grey(rgb) if channels == 1 else rgb


def label_map(dataset: Dataset, num_classes: int):
    """(label -> classifier index tensor or None, allowed classifier indices or None) for a dataset's classes.
    ImageFolder trees with WordNet-id folders map onto ImageNet-1k's order when the classifier has 1000 outputs;
    a strict subset of them restricts the prediction to those classes (ImageNet-R/-A protocol)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return None, None
    if num_classes == 1000 and len(classes) and all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes):
        from timm.data import ImageNetInfo

        wnids = ImageNetInfo().label_names()
        index = {w: i for i, w in enumerate(wnids)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise UsageError(f"class folders {missing[:5]} are not ImageNet-1k WordNet ids")
        idx = torch.tensor([index[c] for c in classes])
        return idx, (None if len(classes) == 1000 else idx)
    if len(classes) != num_classes:
        raise UsageError(f"the dataset has {len(classes)} classes but the classifier {num_classes} outputs (and its "
                        f"folders are not ImageNet WordNet ids to map)")
    return None, None
