"""`diffaug evaluate` resumed inside a data set and run under torchrun: a run killed mid-set keeps its finished
batches (dk.utils.Journal) and the rerun computes only the others, to the numbers of an uninterrupted run; two
gloo processes write the files one process writes (accuracies, OOD scores and metrics), also continuing a
1-process run's batches. Tiny everything: a random 1-level ADM UNet, timm's test_resnet as a nearest-class-mean
digits classifier, 8x8 digits, batches of 4."""
import json

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_FLAGS, ncm_checkpoint, torchrun

import diffaug_kernels as dk
from diffaug_kernels import cli
from diffaug_kernels import robustness as ev

SIZE, IMAGES, BATCH = 8, 24, 4
SCORE_FLAGS = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_UNET_FLAGS.items()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A nearest-class-mean 10-class grey classifier (right on some digits, not all) and a saved random UNet."""
    root = tmp_path_factory.mktemp("evaluate_shards")
    ck = ncm_checkpoint(root / "c.pt", SIZE)
    torch.manual_seed(0)
    unet = dk.models.ADM_CONFIGS["digits32"].replace(**TINY_UNET_FLAGS).create().eval()
    path = str(root / "unet.pt")
    torch.save(unet.state_dict(), path)
    return {"clf": ck, "unet": path}


def argv(files, out, *more):
    return ["evaluate", "--classifier", f"c={files['clf']}", "--score-model", files["unet"], "--score-config",
            "digits32", *[v for f in SCORE_FLAGS for v in ("--score-flag", f)], "--datasets", "digits",
            "--image-size", str(SIZE), "--max-images", str(IMAGES), "--batch-size", str(BATCH), "--de-times",
            "0,200", "--dda-steps", "4", "--dda-depth", "2", "--dda-down", "2", "--dda-max-images", "9",
            "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out), *more]


def record(path):
    """A result file without its timing."""
    r = json.loads(path.read_text())
    r.pop("seconds")
    return r


def journals(out):
    return sorted(p.name for p in out.iterdir() if ".batches.rank" in p.name)


def test_a_killed_run_keeps_its_batches_and_the_rerun_computes_the_others(files, tmp_path, monkeypatch, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli.main(argv(files, whole)) == 0
    calls, real = [], ev.de_predict

    def counted(*a, stop_at=None, **k):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "de_predict", lambda *a, **k: counted(*a, stop_at=3, **k))
    assert cli.main(argv(files, part)) == 130
    assert "the same command continues" in capsys.readouterr().err
    assert journals(part) == ["digits.batches.rank0"] and not (part / "c__digits.json").exists()
    kept = dk.utils.Journal(str(part / "digits.batches"), None).files()
    assert len(open(kept[0]).read().splitlines()) == 1 + 2  # the stamp and the two finished batches

    calls.clear()
    monkeypatch.setattr(ev, "de_predict", lambda *a, **k: counted(*a, **k))
    assert cli.main(argv(files, part)) == 0
    assert len(calls) == IMAGES // BATCH - 2  # only the batches the journal lacked
    assert record(part / "c__digits.json") == record(whole / "c__digits.json")
    assert journals(part) == []  # the result file holds them now

    # a journal made with other settings is not trusted: the run starts the set afresh
    (part / "c__digits.json").unlink()
    calls.clear()
    monkeypatch.setattr(ev, "de_predict", lambda *a, **k: counted(*a, stop_at=2, **k))
    assert cli.main(argv(files, part, "--seed", "1")) == 130
    calls.clear()
    monkeypatch.setattr(ev, "de_predict", lambda *a, **k: counted(*a, **k))
    assert cli.main(argv(files, part)) == 0
    assert len(calls) == IMAGES // BATCH
    assert record(part / "c__digits.json") == record(whole / "c__digits.json")


def test_journal_keeps_whole_lines_of_its_stamp(tmp_path):
    j = dk.utils.Journal(str(tmp_path / "x"), {"a": 1}, rank=1)
    j.append(3, {"v": [1, 2]})
    j.append(5, {"v": 0})
    j.close()
    with open(tmp_path / "x.rank1", "a") as f:
        f.write('[7, {"v"')  # a kill mid-line
    other = dk.utils.Journal(str(tmp_path / "x"), {"a": 2}, rank=0)
    other.append(9, {"v": 9})
    other.close()
    assert dk.utils.Journal(str(tmp_path / "x"), {"a": 1}, rank=0).read() == {3: {"v": [1, 2]}, 5: {"v": 0}}
    again = dk.utils.Journal(str(tmp_path / "x"), {"a": 1}, rank=1)
    again.append(7, {"v": 7})  # after the cut line, on a line of its own
    again.close()
    assert again.read() == {3: {"v": [1, 2]}, 5: {"v": 0}, 7: {"v": 7}}
    mine = dk.utils.Journal(str(tmp_path / "x"), {"a": 2}, rank=1)
    mine.append(1, {})  # another stamp: this rank's file starts again
    mine.close()
    assert mine.read() == {1: {}, 9: {"v": 9}}
    mine.remove()
    assert list(tmp_path.iterdir()) == []


def test_two_processes_write_what_one_writes(files, tmp_path, monkeypatch):
    """torchrun with 2 gloo processes continues a killed 1-process run (its two batches kept) and writes the
    accuracies, the OOD scores, metrics and table of one process; rank 0 alone prints."""
    ood = ["--ood-datasets", "digits-c:impulse_noise:5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(argv(files, one, *ood)) == 0
    calls, real = [], ev.de_predict

    def stop_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "de_predict", stop_third)
    assert cli.main(argv(files, two, *ood)) == 130
    assert journals(two) == ["digits.batches.rank0"]
    rc, out, err = torchrun(*argv(files, two, *ood), timeout=400)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert out.count("OOD detection") == 1, out
    assert record(two / "c__digits.json") == record(one / "c__digits.json")
    assert json.loads((two / "ood.json").read_text()) == json.loads((one / "ood.json").read_text())
    for name in ("c__digits.scores.npz", "c__digits-c_impulse_noise_5.scores.npz"):
        with np.load(one / name) as a, np.load(two / name) as b:
            assert sorted(a) == sorted(b)
            for k in a:
                assert np.array_equal(a[k], b[k]), (name, k)
    assert (two / "table.txt").read_text() == (one / "table.txt").read_text()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no journal left
