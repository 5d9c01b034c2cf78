"""Datasets from local files only (nothing is downloaded): the embedded digits set, ImageFolder trees,
CIFAR-10's python batches. Images come out as float32 tensors in [-1, 1], [C, H, W]."""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..utils import UsageError


def digits(split: str = "train", size: int = 32, channels: int = 1, test_fraction: float = 0.2,
           seed: int = 0) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn), upsampled bilinearly
    to size x size, in [-1, 1]; a fixed stratified train/test split. channels=3 repeats the grey channel."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).repeat(1, channels, 1, 1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    if split != "all":
        idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                               stratify=d.target)
        idx = torch.from_numpy(idx_train if split == "train" else idx_test)
        x, y = x[idx], y[idx]
    return TensorDataset(x, y)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found at {path!r} (nothing is downloaded: point to a local copy)")


class _Pair:
    """Two transforms of one image (a class, not a lambda: DataLoader workers may need to pickle it)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, im):
        return self.first(im), self.second(im)


def folder_transform(size: int = 224, train: bool = False, centre_view: bool = False):
    """What image_folder applies to each PIL image: resize + centre crop to size x size (train=False), a random
    resized crop and flip (train=True), or with centre_view the pair (random crop, centre crop); in [-1, 1]."""
    from torchvision import transforms

    tail = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    centre = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size), *tail])
    if not train:
        return centre
    crop = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *tail])
    return _Pair(crop, centre) if centre_view else crop


def image_folder(root: str, size: int = 224, train: bool = False, centre_view: bool = False):
    """An ImageFolder tree (class sub-folders) resized to size x size, in [-1, 1]. train=True adds random
    resized crops and flips; otherwise resize + centre crop (the usual ImageNet evaluation transform).
    centre_view=True (with train) makes each image a pair (random crop, centre crop) from one decode: the
    DiffAug authors' training scripts feed the centre crop to DiffAug and the random crop to the clean term."""
    from torchvision import datasets

    _require_dir(root, "image folder")
    return datasets.ImageFolder(root, transform=folder_transform(size, train, centre_view))


# What pickles of CIFAR-10's python batches hold besides dicts, lists, strings and numbers: numpy arrays (the
# reconstruction functions of numpy 1 and 2, and of pickle protocol 5) and Python 2 byte strings (_codecs.encode).
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-10 batch holds: a crafted file cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no CIFAR-10 batch holds (not loaded)")
        return super().find_class(module, name)


def read_cifar_batch(path: str):
    """(images uint8 [N, 3, 32, 32], labels: list of N ints in 0..9) from one of CIFAR-10's python batches, read
    without running code from the file; anything else is a UsageError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...: a damaged or foreign file
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise UsageError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {why})") from None
    x = d.get("data") if isinstance(d, dict) else None
    y = d.get("labels") if isinstance(d, dict) else None
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32):
        got = f"a {type(d).__name__}" if not isinstance(d, dict) else (
            f"data {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        raise UsageError(f"{path} is not a CIFAR-10 python batch: expected {{'data': uint8 [N, 3072], 'labels': "
                         f"N ints}}, got {got}")
    if not (isinstance(y, list) and len(y) == len(x) and all(type(v) is int and 0 <= v < 10 for v in y)):
        raise UsageError(f"{path} is not a CIFAR-10 python batch: its labels must be {len(x)} ints in 0..9")
    return x.reshape(-1, 3, 32, 32), y


class CIFAR10(Dataset):
    """CIFAR-10 from its python batches (cifar-10-batches-py/data_batch_1..5, test_batch), in [-1, 1]."""

    def __init__(self, root: str, train: bool = True):
        folder = root if os.path.exists(os.path.join(root, "test_batch")) else os.path.join(root, "cifar-10-batches-py")
        _require_dir(folder, "CIFAR-10 python batches")
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        xs, ys = [], []
        for n in names:
            p = os.path.join(folder, n)
            if not os.path.exists(p):
                raise FileNotFoundError(f"CIFAR-10 batch {p!r} is missing")
            x, y = read_cifar_batch(p)
            xs.append(x)
            ys.extend(y)
        self.x = torch.from_numpy(np.concatenate(xs))
        self.y = torch.tensor(ys, dtype=torch.int64)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].float() / 127.5 - 1, self.y[i]


def make_dataset(spec: str, split: str = "train", size: Optional[int] = None, channels: int = 3,
                 centre_view: bool = False) -> Dataset:
    """'digits' | 'cifar10:<root>' | a path to an ImageFolder tree (with split sub-folders train/ and val/ when
    present). size defaults to 32 for digits and CIFAR-10, 224 for folders. centre_view: see image_folder
    (digits and CIFAR-10 have no random transform, so it changes nothing for them)."""
    if spec == "digits":
        return digits(split, size or 32, channels)
    if spec.startswith("cifar10:"):
        return CIFAR10(spec.split(":", 1)[1], train=split == "train")
    sub = os.path.join(spec, "train" if split == "train" else "val")
    return image_folder(sub if os.path.isdir(sub) else spec, size or 224, train=split == "train",
                        centre_view=centre_view)
