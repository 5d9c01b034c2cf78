import pickle

import numpy as np
import pytest
import torch
from helpers import CodeMarker

from diffaug_kernels import data, utils


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
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # CIFAR-10's layout: one row of 3072 bytes per image, the 1024 red, then green, then blue values (CHW)
        raw[name] = (rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 10, 4).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({"data": raw[name][0], "labels": raw[name][1]}, f)
    ds = data.make_dataset(f"cifar10:{tmp_path}", "train")
    x, y = ds[0]
    assert len(ds) == 20 and x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1

    def expect(name, j):  # image j of batch file `name`, scaled as the reader documents: uint8 -> [-1, 1]
        return torch.from_numpy(raw[name][0][j].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1, raw[name][1][j]

    labels = [lab for i in range(1, 6) for lab in raw[f"data_batch_{i}"][1]]
    assert labels != labels[::-1]  # (a reader that reversed the labels would show)
    for i, (name, j) in {0: ("data_batch_1", 0), 3: ("data_batch_1", 3), 5: ("data_batch_2", 1),
                         19: ("data_batch_5", 3)}.items():
        img, lab = ds[i]
        want_img, want_lab = expect(name, j)
        assert img.dtype == torch.float32 and int(lab) == want_lab, i
        torch.testing.assert_close(img, want_img, rtol=0, atol=1e-6)
    assert [int(ds[i][1]) for i in range(20)] == labels
    test = data.make_dataset(f"cifar10:{tmp_path}", "test")
    assert len(test) == 4 and [int(test[i][1]) for i in range(4)] == raw["test_batch"][1]
    torch.testing.assert_close(test[2][0], expect("test_batch", 2)[0], rtol=0, atol=1e-6)
    row = raw["test_batch"][0][2].astype(np.float64)
    assert float(test[2][0][0, 0, 0]) == pytest.approx(row[0] / 127.5 - 1, abs=1e-6)  # red, top-left pixel
    assert float(test[2][0][0, 0, 1]) == pytest.approx(row[1] / 127.5 - 1, abs=1e-6)  # red, its right neighbour
    assert float(test[2][0][2, 31, 31]) == pytest.approx(row[3071] / 127.5 - 1, abs=1e-6)  # blue, bottom-right
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / "a.png")
    ds = data.make_dataset(str(tmp_path / "imgs"), "val", size=24)
    x, y = ds[1]
    assert x.shape == (3, 24, 24) and y == 1


def test_crafted_cifar_batches_run_nothing_and_damaged_ones_are_one_line(tmp_path):
    """CIFAR-10's batches are pickles: one that asks for code (here open(), which would create a marker file) is
    refused before anything runs; truncated, foreign or ill-shaped batches are one-line UsageErrors naming the file."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}
    cases = {"code": {"data": good["data"], "labels": [1, 2], "x": CodeMarker(str(marker))},
             "truncated": None, "not a dict": [1, 2], "floats": {"data": np.zeros((2, 3072)), "labels": [1, 2]},
             "labels": {"data": good["data"], "labels": [1, 12]}}
    for what, payload in cases.items():
        blob = pickle.dumps(good if payload is None else payload)
        (folder / "test_batch").write_bytes(blob[: len(blob) // 2] if payload is None else blob)
        with pytest.raises(utils.UsageError, match="test_batch is not a CIFAR-10 python batch") as e:
            data.make_dataset(f"cifar10:{tmp_path}", "test")
        assert "\n" not in str(e.value), what
        if what == "code":
            assert "builtins.open" in str(e.value) or "io.open" in str(e.value)
    assert not marker.exists()
    for protocol in (2, 5):  # the released batches are protocol 2; numpy arrays pickle differently under 5
        (folder / "test_batch").write_bytes(pickle.dumps(good, protocol=protocol))
        assert len(data.make_dataset(f"cifar10:{tmp_path}", "test")) == 2
