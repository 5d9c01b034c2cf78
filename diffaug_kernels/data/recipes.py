"""The training sets of the classifier recipe (train-classifier's build_datasets), with the DiffAug authors' data
recipes beyond the plain training set (github.com/oore-lab/diffaug, training_scripts/):

- +Synth (synth_train.py): extra labelled ImageFolders (e.g. generated images) concatenated with the training
  set; the sampler shuffles the union uniformly and DiffAug applies to all of it. Their class folders are matched
  to the training set's classes by name.
- DeepAugment (diffda.py): every training image has precomputed EDSR and CAE distortions at the same relative
  path in two folders; each batch holds the clean images, their EDSR and CAE copies and DiffAug of the clean
  images, and the loss sums the four cross-entropies (views "x", "deepaugment" and "x_da").
- DeepAugment + AugMix (diffda_augmix.py): the clean, EDSR and CAE images become one dataset three times the
  training set's size; each sample gets two AugMix views and AugMix's JSD loss, and DiffAug takes the centre
  crop of the clean image it came from.

Clean, EDSR and CAE images get independent random crops, as in the authors' scripts."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

from torch.utils.data import ConcatDataset, Dataset, Subset

from ..utils import UsageError
from .datasets import CIFAR10, folder_transform, make_dataset
from .views import TrainViews, augmix_transform

# CIFAR-10's class names in label order (batches.meta's label_names), for matching --extra-data folders
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def num_classes(ds: Dataset) -> int:
    """The number of classes of a training set (through Subset and TrainViews wrappers)."""
    base = unwrap(ds)
    if hasattr(base, "classes"):
        return len(base.classes)
    labels = base.y if hasattr(base, "y") else getattr(base, "tensors", (None, None))[1]
    if labels is None:
        raise UsageError("cannot tell the number of classes of this dataset: pass --num-classes")
    return int(labels.max()) + 1


def unwrap(ds: Dataset) -> Dataset:
    while isinstance(ds, (Subset, TrainViews)):
        ds = ds.dataset if isinstance(ds, Subset) else ds.base
    return ds


def class_names(ds: Dataset, data: str) -> list:
    """The class names of a training set: an ImageFolder's folder names, CIFAR-10's label names, the digits'
    "0" .. "9"."""
    base = unwrap(ds)
    if hasattr(base, "classes"):
        return list(base.classes)
    if isinstance(base, CIFAR10):
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(num_classes(base))]


class LabelledUnion(ConcatDataset):
    """The training set and its extra folders as one dataset, every label a Python int (the parts give tensors or
    ints, which one batch cannot mix)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, int(y)


class _Relabel:
    """An extra folder's label -> the training set's label of the same class name (picklable for workers)."""

    def __init__(self, table: Sequence[int]):
        self.table = list(table)

    def __call__(self, y: int) -> int:
        return self.table[y]


def extra_folder(root: str, train_classes: Sequence[str], transform, train_root: str) -> Dataset:
    """An ImageFolder whose labels are the training set's for the same class-folder names; a folder that is not
    one, or a class name the training set lacks, is a UsageError naming both folders."""
    from torchvision import datasets

    if not os.path.isdir(root):
        raise UsageError(f"--extra-data folder not found: {root!r}")
    try:
        folder = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"--extra-data {root} is not an ImageFolder tree ({str(e).splitlines()[0][:200]})") from None
    index = {c: i for i, c in enumerate(train_classes)}
    unknown = [c for c in folder.classes if c not in index]
    if unknown:
        raise UsageError(f"--extra-data {root}: its class folders {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                         f"are not classes of the training set {train_root} (whose classes are "
                         f"{list(train_classes)[:5]}{' ...' if len(train_classes) > 5 else ''}); class folders are "
                         f"matched by name")
    folder.target_transform = _Relabel([index[c] for c in folder.classes])
    return folder


def extra_transform(size: int, channels: int, folder_train: bool, centre_view: bool):
    """The transform of extra images: the training folder's own (folder_train), else a resize to size x size (the
    digits and CIFAR-10 have no random transform), grey for one channel."""
    if folder_train:
        return folder_transform(size, train=True, centre_view=centre_view)
    from torchvision import transforms

    grey = [transforms.Grayscale(1)] if channels == 1 else []
    return transforms.Compose([transforms.Resize((size, size)), *grey, transforms.ToTensor(),
                               transforms.Normalize([0.5] * channels, [0.5] * channels)])


# ------------------------------------------------------------------------------------------------ DeepAugment
def _image_extensions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def pair_files(root: str, paths: Sequence[str], folder: str) -> list:
    """The file in `folder` at each clean image's path relative to `root` (the extension may differ: a .png copy
    of a .JPEG image pairs). A clean image without a counterpart, a counterpart without a clean image, or two
    candidates for one image is a UsageError naming the folders, before anything is trained."""
    if not os.path.isdir(folder):
        raise UsageError(f"--deepaugment folder not found: {folder!r}")
    exts = _image_extensions()
    index: dict = {}
    for dirpath, _, files in os.walk(folder, followlinks=True):
        for name in files:
            if name.lower().endswith(exts):
                path = os.path.join(dirpath, name)
                key = os.path.splitext(os.path.relpath(path, folder))[0]
                if key in index:
                    raise UsageError(f"--deepaugment {folder}: two images pair with one training image "
                                     f"({index[key]} and {path})")
                index[key] = path
    keys = [os.path.splitext(os.path.relpath(p, root))[0] for p in paths]
    missing = [k for k in keys if k not in index]
    if missing:
        raise UsageError(f"--deepaugment {folder}: {len(missing)} of the {len(keys)} training images of {root} have "
                         f"no counterpart at the same relative path (e.g. {missing[0]}.*)")
    unpaired = sorted(set(index) - set(keys))
    if unpaired:
        raise UsageError(f"--deepaugment {folder}: {len(unpaired)} images have no training image at the same relative "
                         f"path in {root} (e.g. {index[unpaired[0]]})")
    return [index[k] for k in keys]


class DeepAugmentViews(Dataset):
    """diffda.py's batches: ({"x": random crop of the clean image, "deepaugment": (random crops of its EDSR and
    CAE copies), "x_da": its centre crop (with diffaug)}, label)."""

    def __init__(self, folder, partners: Sequence[Sequence[str]], size: int, diffaug: bool,
                 indices: Optional[Sequence[int]] = None):
        self.folder, self.partners = folder, [list(p) for p in partners]
        self.crop, self.centre = folder_transform(size, train=True), folder_transform(size, train=False)
        self.diffaug = diffaug
        self.indices = list(range(len(folder.samples))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        path, y = self.folder.samples[j]
        image = self.folder.loader(path)
        views = {"x": self.crop(image),
                 "deepaugment": tuple(self.crop(self.folder.loader(p[j])) for p in self.partners)}
        if self.diffaug:
            views["x_da"] = self.centre(image)
        return views, y


class DeepAugmentSources(Dataset):
    """diffda_augmix.py's dataset: the clean images, then their EDSR copies, then their CAE copies (3N samples),
    each a random crop, paired with the centre crop of the clean image (with diffaug) for DiffAug; TrainViews
    adds the AugMix views."""

    def __init__(self, folder, partners: Sequence[Sequence[str]], size: int, diffaug: bool,
                 indices: Optional[Sequence[int]] = None):
        self.folder = folder
        self.indices = list(range(len(folder.samples))) if indices is None else list(indices)
        self.sources = [[p for p, _ in folder.samples], *[list(p) for p in partners]]
        self.crop, self.centre = folder_transform(size, train=True), folder_transform(size, train=False)
        self.diffaug = diffaug

    def __len__(self):
        return len(self.sources) * len(self.indices)

    def __getitem__(self, i):
        source, k = divmod(i, len(self.indices))
        j = self.indices[k]
        clean, y = self.folder.samples[j]
        x = self.crop(self.folder.loader(self.sources[source][j]))
        if self.diffaug:
            return (x, self.centre(self.folder.loader(clean))), y
        return x, y


def deepaugment_dataset(train, spec: str, size: int, diffaug: bool, augmix: bool,
                        limit: Optional[int] = None) -> Dataset:
    """DeepAugmentViews (or, with augmix, DeepAugmentSources) of an ImageFolder training set and
    "EDSR_DIR,CAE_DIR", every file paired first."""
    folders = [f for f in spec.split(",") if f]
    if len(folders) != 2:
        raise UsageError(f"--deepaugment takes two folders, EDSR_DIR,CAE_DIR; got {spec!r}")
    if not hasattr(train, "samples"):
        raise UsageError("--deepaugment pairs images by relative path: --data must be an ImageFolder tree")
    paths = [p for p, _ in train.samples]
    partners = [pair_files(train.root, paths, f) for f in folders]
    indices = range(min(limit, len(paths))) if limit else None
    cls = DeepAugmentSources if augmix else DeepAugmentViews
    return cls(train, partners, size, diffaug, indices)


# ------------------------------------------------------------------------------------------------ the recipe
def build_datasets(args):
    """-> train dataset, val dataset (or None), channels, image size, number of classes, from train-classifier's
    options (data, val, AugMix, --extra-data, --deepaugment)."""
    is_digits = args.data == "digits"
    is_folder = not (is_digits or args.data.startswith("cifar10:"))
    extra = [d for d in (getattr(args, "extra_data", None) or "").split(",") if d]
    deepaugment = getattr(args, "deepaugment", None)
    if args.channels is not None and not is_digits and args.channels != 3:
        raise UsageError("--channels 1 is only for --data digits (CIFAR-10 and folders are RGB)")
    if extra and deepaugment:
        raise UsageError("--extra-data and --deepaugment are separate recipes: give one of them")
    channels = (args.channels or 1) if is_digits else 3
    size = args.image_size or (224 if is_folder else 32)
    if args.data.startswith("cifar10:") and size != 32:
        raise UsageError("CIFAR-10 is 32x32; --image-size must be 32 (or left out)")
    augmix = augmix_transform(args.augmix_config, channels, args.augmix_all_ops) if args.augmix else None
    centre_view = is_folder and not args.no_diffaug  # DiffAug takes the centre crop, as the authors' scripts do
    train = make_dataset(args.data, "train", size, channels, centre_view=centre_view)
    val = None
    if not args.no_val:
        vspec = args.val_data or args.data
        val = make_dataset(vspec, "test", size, channels)
        if args.val_data is None and is_folder and not os.path.isdir(os.path.join(args.data, "val")):
            warnings.warn(f"{args.data} has no val/ folder: validating on the training images (give --val-data)")
    classes = args.num_classes or num_classes(train)
    if val is not None and args.limit_val:
        val = Subset(val, range(min(args.limit_val, len(val))))
    if deepaugment:
        if not is_folder:
            raise UsageError("--deepaugment pairs images by relative path: --data must be an ImageFolder tree")
        train = deepaugment_dataset(train, deepaugment, size, not args.no_diffaug, augmix is not None,
                                    args.limit_train)
        return (TrainViews(train, augmix) if augmix is not None else train), val, channels, size, classes
    if args.limit_train:
        train = Subset(train, range(min(args.limit_train, len(train))))
    if extra:
        names = class_names(train, args.data)
        transform = extra_transform(size, channels, is_folder, centre_view)
        root = getattr(unwrap(train), "root", args.data)
        train = LabelledUnion([train, *(extra_folder(d, names, transform, root) for d in extra)])
    if augmix is not None or centre_view:
        train = TrainViews(train, augmix)
    return train, val, channels, size, classes
