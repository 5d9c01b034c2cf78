"""dk.utils: the one JSON writer, checkpoint loading with one-line errors, progress."""
import os
import pickle

import pytest
import torch
from helpers import CodeMarker

import diffaug_kernels as dk
from diffaug_kernels import pretrained, utils
from diffaug_kernels.commands import train_score
from diffaug_kernels.models import classifier


def test_pickled_code_is_refused_by_every_loader_naming_what_it_wanted(tmp_path):
    """A checkpoint that needs code to load: every loader refuses it without running it, names the object it asked
    for, and gives no advice to load it anyway (torch's message suggests weights_only=False or add_safe_globals)."""
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pt")
    torch.save({"model": CodeMarker(str(marker))}, path)
    loaders = [lambda: utils.torch_load(path, "train-score"),
               lambda: classifier.load_classifier(path),
               lambda: train_score.load_checkpoint(path),
               lambda: pretrained.resolve_score_model(path, "digits"),
               lambda: dk.models.load_guided_diffusion(path, "digits32")]
    for load in loaders:
        with pytest.raises((ValueError, pickle.UnpicklingError)) as e:
            load()
        msg = str(e.value)
        assert "evil.pt" in msg and "needs the Python object io.open to load" in msg, msg
        assert "not trusted" in msg and "weights_only=False" not in msg and "safe_globals" not in msg, msg
        assert "\n" not in msg, msg
    assert not marker.exists()


def test_write_json_replaces_whole_and_unused_path_never_replaces(tmp_path):
    p = str(tmp_path / "r.json")
    utils.write_json({"a": 1}, p)
    utils.write_json({"b": 2}, p)
    assert open(p).read().strip().startswith("{") and "b" in open(p).read() and "a" not in open(p).read()
    assert utils.unused_path(str(tmp_path / "r")) == str(tmp_path / "r-2.json")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary file left behind


def test_atomic_save_writes_a_checksum_that_torch_load_and_torch_load_check(tmp_path):
    """atomic_save's file is a plain torch.save archive to torch.load (the checksum is the zip comment); torch_load
    verifies it, and a file saved without one (older checkpoints) still loads."""
    path = str(tmp_path / "c.pt")
    obj = {"w": torch.arange(1000, dtype=torch.float32), "step": 3}
    utils.atomic_save(obj, path)
    assert utils.checksum_ok(path) is True
    assert torch.equal(torch.load(path, weights_only=True)["w"], obj["w"])
    assert torch.equal(utils.torch_load(path, "test")["w"], obj["w"])
    raw = bytearray(open(path, "rb").read())
    i = raw.index(b"\x00\x00\x80\x3f")  # inside the tensor data: the float 1.0
    raw[i + 3] ^= 0x01  # one bit, and the file still reads (torch.load alone would not notice)
    open(path, "wb").write(bytes(raw))
    assert torch.load(path, weights_only=True)["step"] == 3
    with pytest.raises(utils.UsageError, match="c.pt is damaged"):
        utils.torch_load(path, "test")
    plain = str(tmp_path / "plain.pt")
    torch.save(obj, plain)
    assert utils.checksum_ok(plain) is None and utils.torch_load(plain, "test")["step"] == 3


def test_a_zip_whose_end_record_names_another_disk_is_one_line(tmp_path):
    """zipfile.is_zipfile lets BadZipFile out for an end record naming a second disk (found by tests/test_fuzz.py):
    torch_load answers in one line instead."""
    path = tmp_path / "multi.pt"
    utils.atomic_save({"a": torch.ones(2)}, str(path))
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"PK\x05\x06")  # the end record; a zip64 locator before it saying "2 disks"
    raw[at - 20:at] = b"PK\x06\x07" + (0).to_bytes(4, "little") + (0).to_bytes(8, "little") + (2).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(utils.UsageError) as e:
        utils.torch_load(str(path), "test")
    assert "multi.pt" in str(e.value) and "\n" not in str(e.value)
    assert utils.is_torch_save_file(str(path)) is False
