import pickle

import numpy as np
import pytest
import torch

from diffaug_kernels import data


def test_digits_split_range_and_size():
    tr, te = data.digits("train"), data.digits("test")
    assert len(tr) + len(te) == 1797 and abs(len(te) - 360) <= 1
    x, y = tr.tensors
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    assert data.digits("train", size=16, channels=3).tensors[0].shape[1:] == (3, 16, 16)
    assert torch.equal(data.digits("test").tensors[0], te.tensors[0])  # the split is fixed


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.make_dataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        data.make_dataset(f"cifar10:{tmp_path}")


def test_cifar10_batches_and_image_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    ds = data.make_dataset(f"cifar10:{tmp_path}", "train")
    x, y = ds[0]
    assert len(ds) == 20 and x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / "a.png")
    ds = data.make_dataset(str(tmp_path / "imgs"), "val", size=24)
    x, y = ds[1]
    assert x.shape == (3, 24, 24) and y == 1
