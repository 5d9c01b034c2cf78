"""dk.utils: the one JSON writer, checkpoint loading with one-line errors, progress."""
import os
import pickle

import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels import pretrained, utils
from diffaug_kernels.commands import train_score
from diffaug_kernels.models import classifier


class _Marker:
    """Unpickling this runs code: it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_refused_by_every_loader_naming_what_it_wanted(tmp_path):
    """A checkpoint that needs code to load: every loader refuses it without running it, names the object it asked
    for, and gives no advice to load it anyway (torch's message suggests weights_only=False or add_safe_globals)."""
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pt")
    torch.save({"model": _Marker(str(marker))}, path)
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
