"""dk.data.eval_sets: the evaluation's dataset specs and readers (CIFAR-10-C files, ImageNet wnid folders)."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffaug_kernels as dk
from diffaug_kernels import robustness as ev
from diffaug_kernels import utils
from diffaug_kernels.data import corruptions as C
from diffaug_kernels.data import eval_sets


# ------------------------------------------------------------------------------------------------ dataset readers
def test_cifar10c_npy_layout(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, size=(5 * 6, 32, 32, 3), dtype=np.uint8)
    y = np.tile(np.arange(6) % 10, 5)
    np.save(tmp_path / "fog.npy", x)
    np.save(tmp_path / "contrast.npy", x[::-1].copy())
    np.save(tmp_path / "labels.npy", y)
    ds = eval_sets.CIFAR10C(str(tmp_path), "fog", severity=3)
    assert len(ds) == 6
    img, lab = ds[2]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and lab == y[14]
    torch.testing.assert_close(img, torch.from_numpy(x[14]).permute(2, 0, 1).float() / 127.5 - 1)
    specs = eval_sets.parse_datasets([f"cifar10-c:{tmp_path}:all:2"])
    assert [d.name for d in specs] == ["cifar10-c:contrast:2", "cifar10-c:fog:2"]
    assert specs[0].group == "cifar10-c@2"
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        eval_sets.CIFAR10C(str(tmp_path), "snow")
    with pytest.raises(FileNotFoundError, match="not found"):
        eval_sets.parse_datasets([f"cifar10-c:{tmp_path}/nope"])
    # arrays that are not CIFAR-10-C's are refused, not scaled into nonsense
    for name, arr in (("float", x.astype(np.float32) / 255), ("small", x[:, :16, :16])):
        np.save(tmp_path / f"{name}.npy", arr)
        with pytest.raises(utils.UsageError, match="uint8|32, 32, 3"):
            eval_sets.CIFAR10C(str(tmp_path), name)
    np.save(tmp_path / "labels.npy", y + 5)
    with pytest.raises(utils.UsageError, match="labels 0..9"):
        eval_sets.CIFAR10C(str(tmp_path), "fog")


def test_parse_datasets_and_errors(tmp_path):
    names = [d.name for d in eval_sets.parse_datasets(["digits", "digits-c:contrast:2", "digits-c:pixelate"])]
    assert names == ["digits", "digits-c:contrast:2", "digits-c:pixelate:5"]
    assert len(eval_sets.parse_datasets(["digits-c:all:1"])) == len(C.CORRUPTIONS)
    (spec,) = eval_sets.parse_datasets(["digits-c:gaussian_blur:3:imagenet"])
    ds = eval_sets.build_dataset(spec, 32, 1)
    torch.testing.assert_close(ds[0][0], C.corrupt_image(dk.data.digits("test")[0][0], "gaussian_blur", 3, 0, 0,
                                                         "imagenet"))
    with pytest.raises(utils.UsageError, match="preset"):
        eval_sets.parse_datasets(["digits-c:contrast:2:mnist"])
    for sev in ("1", "5"):
        for corr in ("fog", "blur/zoom_blur"):
            (tmp_path / "inc" / corr / sev / "n01440764").mkdir(parents=True)
    got = eval_sets.parse_datasets([f"imagenet-c:{tmp_path / 'inc'}:5"])
    assert sorted(d.name for d in got) == ["imagenet-c:fog:5", "imagenet-c:zoom_blur:5"]
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        eval_sets.parse_datasets([str(tmp_path / "missing")])
    with pytest.raises(utils.UsageError, match="unknown corruption"):
        eval_sets.parse_datasets(["digits-c:fog:3"])
    with pytest.raises(utils.UsageError, match="unknown mode"):
        ev.parse_modes("Default,TTA")
    assert ev.parse_modes("dda-se,de,default") == ("Default", "DE", "DDA-SE")
    assert ev.parse_times("0:451:50") == tuple(range(0, 451, 50))


def test_imagenet_wnid_folders_map_to_1k_indices(tmp_path):
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    for w in (wnids[5], wnids[900]):
        (tmp_path / w).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / w / "a.png")
    ds = dk.data.image_folder(str(tmp_path), 8)
    lmap, allowed = eval_sets.label_map(ds, 1000)
    assert lmap.tolist() == [5, 900] and allowed.tolist() == [5, 900]
    z = ev.restrict_logits(torch.zeros(1, 1000), allowed)
    assert torch.isinf(z).sum() == 998
    with pytest.raises(utils.UsageError, match="2 classes"):
        eval_sets.label_map(ds, 10)


def test_cifar10c_object_arrays_are_refused_not_unpickled(tmp_path):
    """An .npy of Python objects would need pickle to load: refused in one line (allow_pickle stays off)."""
    np.save(tmp_path / "fog.npy", np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    np.save(tmp_path / "labels.npy", np.zeros(5, np.int64))
    with pytest.raises(utils.UsageError, match="not a CIFAR-10-C .npy array of numbers") as e:
        eval_sets.CIFAR10C(str(tmp_path), "fog")
    assert "\n" not in str(e.value)
