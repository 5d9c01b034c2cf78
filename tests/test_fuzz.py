"""Fuzzing with hypothesis: the command-line parsers on random arguments and every file loader on damaged copies
of real files (flipped bytes, truncations, random bytes). Each outcome is a success or a one-line error of the
types the commands turn into one line (ValueError, which UsageError is, FileNotFoundError, argparse's exit 2):
never a traceback of another type, a hang (an alarm per example) or an allocation past a bound (the data
segment is capped while the loaders run)."""
import contextlib
import io
import os
import pickle
import re
import resource
import signal

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_FLAGS, classifier_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffaug_kernels import cli, pretrained, utils
from diffaug_kernels.commands import train_score
from diffaug_kernels.data import datasets, eval_sets
from diffaug_kernels.models import classifier, unet

MEMORY_BOUND = 2 * 2**30  # bytes a loader may allocate beyond what the process holds (the files are < 1 MB)
HANG_S = 60  # far beyond what any example takes: an alarm, not a speed check
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@contextlib.contextmanager
def bounded():
    """Caps the data segment at MEMORY_BOUND past its current size and raises on a hang, for one example."""
    used = int(re.search(r"VmData:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + MEMORY_BOUND if hard == resource.RLIM_INFINITY else min(hard, used + MEMORY_BOUND)

    def hang(signum, frame):
        raise TimeoutError(f"no answer within {HANG_S} s")

    old = signal.signal(signal.SIGALRM, hang)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        signal.signal(signal.SIGALRM, old)


def one_line_or_success(call) -> None:
    with bounded():
        try:
            call()
        except (ValueError, FileNotFoundError) as e:  # UsageError is a ValueError
            msg = str(e)
            assert msg and "\n" not in msg.strip(), f"a {type(e).__name__} of several lines: {msg[:2000]}"


# ---------------------------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One valid file of each kind a loader reads, as bytes, with the loader that reads it from a path."""
    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    flags = dict(image_size=8, in_channels=1, **TINY_UNET_FLAGS)
    model = unet.create_adm_unet(**flags)
    export = pretrained.export_safetensors(model, str(d / "m.safetensors"), unet.ADMConfig(**flags), "linear", 50)
    torch.save(model.state_dict(), d / "gd.pt")
    clf = classifier_checkpoint(d / "c.pt", num_classes=10, in_chans=1)
    utils.atomic_save({"format": "diffaug_kernels.train_score.v1", "step": 3, "args": {"steps": 3}}, str(d / "s.pt"))
    rng = np.random.default_rng(0)
    with open(d / "cifar", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]}, f)
    npy = io.BytesIO()
    np.save(npy, rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, format="PNG")

    def cifar_c(path):
        root = os.path.dirname(path)
        np.save(os.path.join(root, "labels.npy"), np.arange(10) % 10)
        os.replace(path, os.path.join(root, "fog.npy"))
        ds = eval_sets.CIFAR10C(root, "fog", 2)
        return ds[len(ds) - 1] if len(ds) else None

    def image(path):
        root = os.path.dirname(path)
        os.makedirs(os.path.join(root, "tree", "a"), exist_ok=True)
        os.replace(path, os.path.join(root, "tree", "a", "x.png"))
        ds = eval_sets.build_dataset(eval_sets.parse_datasets([os.path.join(root, "tree")])[0], 8, 3)
        return ds[0]

    return {
        "score export": (open(export, "rb").read(), lambda p: pretrained.load_score_model(p)),
        "score metadata": (open(export, "rb").read(), lambda p: pretrained.read_metadata(p)),
        "score --score-model": (open(export, "rb").read(), lambda p: pretrained.resolve_score_model(p, "digits")),
        "guided-diffusion": (open(d / "gd.pt", "rb").read(), lambda p: unet.load_guided_diffusion(p, **flags)),
        "classifier": (open(clf, "rb").read(), lambda p: classifier.load_classifier(p)),
        "train-score checkpoint": (open(d / "s.pt", "rb").read(), lambda p: train_score.load_checkpoint(p)),
        "torch_load": (open(d / "s.pt", "rb").read(), lambda p: utils.torch_load(p, "test")),
        "CIFAR-10 batch": (open(d / "cifar", "rb").read(), lambda p: datasets.read_cifar_batch(p)),
        "CIFAR-10-C array": (npy.getvalue(), cifar_c),
        "image": (png.getvalue(), image),
    }


def damaged(data: bytes, flips, cut, noise) -> bytes:
    out = bytearray(data[:cut] if cut is not None else data)
    for at, v in flips:
        if out:
            out[at % len(out)] = v
    return bytes(out) + noise


KINDS = ["score export", "score metadata", "score --score-model", "guided-diffusion", "classifier",
         "train-score checkpoint", "torch_load", "CIFAR-10 batch", "CIFAR-10-C array", "image"]


@pytest.mark.parametrize("kind", KINDS)
def test_valid_files_load(files, kind, tmp_path):
    """The fuzz starts from files each loader reads whole (so its damage, not the base, makes any error)."""
    data, load = files[kind]
    path = tmp_path / ("f.safetensors" if "score" in kind else "f.pt")
    path.write_bytes(data)
    assert load(str(path)) is not None


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 2**20), noise=st.binary(max_size=64), whole_noise=st.booleans(),
       tail=st.booleans())
def test_damaged_files_are_one_line_errors(files, kind, tmp_path_factory, flips, cut, noise, whole_noise, tail):
    data, load = files[kind]
    if tail and cut is None:  # the end of the file, where the zip directory, the checksum and the data lie
        flips = [(len(data) - 1 - (at % 256), v) for at, v in flips]
    blob = noise if whole_noise else damaged(data, flips, cut, noise)
    path = tmp_path_factory.mktemp("fuzz") / ("f.safetensors" if "score" in kind else "f.pt")
    path.write_bytes(blob)
    one_line_or_success(lambda: load(str(path)))


# --------------------------------------------------------------------------------------------- the parsers
def _options():
    """Each command's option strings, from the parser itself."""
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sorted(s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help")
            for name, p in sub.choices.items()}


OPTIONS = _options()
VALUES = st.sampled_from(["0", "1", "-1", "2", "nan", "inf", "-inf", "1e400", "1e-400", "", " ", "x", "1,2",
                          "0,1000", "5,2000", "99999999999999999999", "2**64", "digits", "cpu", "cuda", "auto",
                          "/nonexistent", "a=b", "=", "linear", "Default,DE", "0.5", "-0.0", "²", "١٢"]) | st.text(
                              max_size=12)


@pytest.mark.parametrize("command", sorted(OPTIONS))
@FUZZ
@given(data=st.data())
def test_parsers_answer_in_one_line(command, data, capsys):
    opts = OPTIONS[command]
    argv = [command]
    for _ in range(data.draw(st.integers(0, 6))):
        argv += [data.draw(st.sampled_from(opts)), data.draw(VALUES)]
    capsys.readouterr()
    with bounded():
        try:
            cli.build_parser().parse_args(argv)
        except SystemExit as e:
            err = capsys.readouterr().err
            assert e.code == 2 and err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
