"""`diffaug evaluate`: options, checks before any model loads, JSON + resume, image sizes, one-line errors.
Tiny everything: a random 2-level ADM UNet, timm's test_resnet, a few 16x16 images."""
import json
import os

import numpy as np
import pytest
import torch
from helpers import (
    TINY_UNET_FLAGS,
    assert_one_line_failure,
    classifier_checkpoint,
    cli_subprocess,
    expected_counts,
    image_folder_tree,
)

import diffaug_kernels as dk
from diffaug_kernels import cli, utils
from diffaug_kernels import robustness as ev
from diffaug_kernels.commands import evaluate as evc
from diffaug_kernels.data import eval_sets
from diffaug_kernels.models import classifier


def test_harness_folder_all_modes_json_resume_and_ood(tmp_path, capsys):
    data = image_folder_tree(tmp_path / "data")
    ood = image_folder_tree(tmp_path / "ood", seed=1, invert=True)
    a, b = classifier_checkpoint(tmp_path / "a.pt", seed=0, fit=data), classifier_checkpoint(tmp_path / "b.pt", seed=1)
    # the score model is a saved random UNet, so this test can load the very model the command used
    torch.manual_seed(0)
    unet_path = str(tmp_path / "unet.pt")
    unet = dk.models.ADM_CONFIGS["digits32"].replace(**TINY_UNET_FLAGS, in_channels=3).create()
    torch.save(unet.state_dict(), unet_path)
    score_flags = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_UNET_FLAGS.items()]
    score_flags.append("in_channels=3")
    flags = ["--score-model", unet_path, "--score-config", "digits32"] + [
        v for f in score_flags for v in ("--score-flag", f)]
    out = tmp_path / "out"
    argv = ["evaluate", "--classifier", a, "--classifier", f"second={b}", "--datasets", data, "--image-size", "16",
            "--batch-size", "4", "--dda-steps", "10", "--dda-depth", "3", "--dda-max-images", "2", "--de-times",
            "0,300", "--out", str(out), "--ood-datasets", ood, "--no-progress", "--threads", "1"]
    assert cli.main(argv + flags) == 0
    text = capsys.readouterr().out
    assert "Default" in text and "DDA-SE" in text and "second" in text and "OOD detection" in text
    rec = json.loads((out / "a__data.json").read_text())
    assert set(rec["acc"]) == set(ev.MODES)
    assert rec["n"] == {"Default": 6, "DE": 6, "DDA": 2, "DDA-SE": 2}

    # the numbers themselves: every mode's count recomputed from the same images, classifier and score model
    (spec,) = eval_sets.parse_datasets([data])
    ds = eval_sets.build_dataset(spec, 16, 3)
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
    aug = evc.score_augment(unet_path, "digits32", score_flags, "linear", "folder", 3)
    cfg = ev.EvalConfig(batch_size=4, dda_max_images=2, de_times=(0, 300), dda_steps=10, dda_depth=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the command's --device auto
    for cname, path in (("a", a), ("second", b)):
        r = json.loads((out / f"{cname}__data.json").read_text())
        want = expected_counts(classifier.load_classifier(path, dev), aug.to(dev), spec, x.to(dev), y.to(dev), cfg)
        assert r["correct"] == want, cname
        assert r["acc"] == {m: want[m] / r["n"][m] for m in ev.MODES}, cname
    # "a" is right on every clean image (so counting the wrong ones gives 0), and the untrained score model's
    # DE images change some of its answers (so DE scored as Default would show)
    assert rec["correct"]["Default"] == 6 and rec["correct"]["DE"] != 6
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"a", "second"}
    o = json.loads((out / "ood.json").read_text())["results"]["a"]["ood"]
    assert set(o) == {"Default/msp", "Default/energy", "DE/msp", "DE/energy", "Default/react", "Default/ash",
                      "Default/scale"}
    assert all(0 <= v["auroc"] <= 1 and 0 <= v["fpr95"] <= 1 for v in o.values())
    mtime = os.path.getmtime(out / "a__data.json")

    # a second run skips the finished pairs (and reuses the cached OOD scores)
    assert cli.main(argv + flags) == 0
    text2 = capsys.readouterr().out
    assert "[a | data] done already" in text2 and "[second | data] done already" in text2
    assert os.path.getmtime(out / "a__data.json") == mtime
    assert text2.split("Top-1 accuracy")[1] == text.split("Top-1 accuracy")[1]

    # changing one mode's settings recomputes only that mode
    argv3 = [v if v != "0,300" else "0,200" for v in argv]
    assert cli.main(argv3 + flags) == 0
    assert "settings of ['DE'] changed" in capsys.readouterr().out
    rec3 = json.loads((out / "a__data.json").read_text())
    assert rec3["settings"]["DE"]["de_times"] == [0, 200] and rec3["acc"]["DDA"] == rec["acc"]["DDA"]


def test_resume_recomputes_another_classifier_or_data_under_the_same_name(tmp_path, capsys):
    """A result file is reused only for the same classifier file, the same data and the same batch size of the
    noisy modes: a replaced checkpoint, another root with the same column name, or another --batch-size is
    recomputed, and the numbers are the new ones."""
    data = image_folder_tree(tmp_path / "d1" / "data")
    other = image_folder_tree(tmp_path / "d2" / "data", seed=3, invert=True)
    a, b = classifier_checkpoint(tmp_path / "a.pt", seed=0, fit=data), classifier_checkpoint(tmp_path / "b.pt", seed=1)
    out = str(tmp_path / "out")

    def acc(clf, root, *more):
        argv = ["evaluate", "--classifier", f"c={clf}", "--modes", "Default", "--datasets", root, "--image-size",
                "16", "--out", out, "--no-progress", "--threads", "1", *more]
        assert cli.main(argv) == 0
        text = capsys.readouterr().out
        return json.loads(open(os.path.join(out, "c__data.json")).read())["acc"]["Default"], text

    first, _ = acc(a, data)
    again, text = acc(a, data)
    assert again == first == 1.0 and "done already" in text
    fresh = ev.run([("c", classifier.load_classifier(b))], None, eval_sets.parse_datasets([data]),
                   ev.EvalConfig(modes=("Default",), image_size=16, progress=False), log=lambda m: None)
    want_b = fresh["results"]["c"]["data"]["acc"]["Default"]
    got_b, text = acc(b, data)
    assert "settings of ['Default'] changed" in text and got_b == want_b != first
    os.replace(a, b)  # the same path, another file
    got, text = acc(b, data)
    assert "changed" in text and got == first
    got_other, text = acc(b, other)
    assert "changed" in text and got_other != first
    # DE's noise is seeded per batch: another --batch-size is another number
    cfg = ev.EvalConfig(batch_size=4)
    spec = eval_sets.parse_datasets([data])[0]
    assert cfg.pair_settings("DE", "c", spec) != ev.EvalConfig(batch_size=8).pair_settings("DE", "c", spec)
    assert cfg.pair_settings("Default", "c", spec) == ev.EvalConfig(batch_size=8).pair_settings("Default", "c", spec)


def test_evaluate_refuses_what_would_fail_later_in_one_line(tmp_path, capsys):
    """--out naming a file, and an image size the score model cannot halve, are one line each; a file in --out
    that is valid JSON but not a result is recomputed, not trusted."""
    ck = classifier_checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
    base = ["evaluate", "--classifier", f"c={ck}", "--datasets", "digits", "--max-images", "4", "--no-progress",
            "--threads", "1"]
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(SystemExit, match="--out .* is a file") as e:
            cli.main(base + ["--out", str(out)])
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="multiple of 4, got \\[18\\]"):
        cli.main(base + ["--modes", "DE", "--image-size", "18", "--score-model", "random", "--score-config",
                         "digits32", "--score-flag", "channel_mult=1,2,2", "--score-flag", "num_channels=32",
                         "--score-flag", "num_res_blocks=1", "--score-flag", "attention_resolutions="])
    out = tmp_path / "out"
    out.mkdir()
    (out / "c__digits.json").write_text("[1, 2]")
    assert cli.main(base + ["--modes", "Default", "--out", str(out)]) == 0
    assert "not a result file" in capsys.readouterr().out
    assert json.loads((out / "c__digits.json").read_text())["n"]["Default"] == 4


def test_classifier_names_must_differ_as_file_names(tmp_path):
    a = classifier_checkpoint(tmp_path / "a.pt")
    with pytest.raises(utils.UsageError, match="also as file names"):
        evc.parse_classifiers([f"a b={a}", f"a_b={a}"])


def test_image_size_follows_the_classifiers(tmp_path, capsys):
    """Without --image-size the digits are made at the size the classifier was trained at (its checkpoint's
    args), not at 32; OOD folders do not change it; classifiers trained at different sizes need --image-size."""
    def ck(path, size, data="digits"):
        p = classifier_checkpoint(path, num_classes=10, in_chans=1)
        c = torch.load(p, weights_only=True)
        c["args"] = {"data": data, "image_size": size}
        torch.save(c, p)
        return p

    c16, c24, cdef = ck(tmp_path / "c16.pt", 16), ck(tmp_path / "c24.pt", 24), ck(tmp_path / "cd.pt", None)
    assert classifier.load_classifier(c16).trained_image_size == 16
    assert classifier.load_classifier(cdef).trained_image_size == 32
    ood = image_folder_tree(tmp_path / "ood")
    for argv, size in ((["--classifier", c16], 16), (["--classifier", c16, "--ood-datasets", ood], 16),
                       (["--classifier", cdef], 32), (["--classifier", c16, "--image-size", "24"], 24)):
        out = tmp_path / f"o{len(os.listdir(tmp_path))}"
        assert cli.main(["evaluate", *argv, "--modes", "Default", "--datasets", "digits", "--max-images", "8",
                         "--no-progress", "--threads", "1", "--out", str(out), "--score-model", "random",
                         "--score-config", "digits32", "--score-flag", "num_channels=32", "--score-flag",
                         "num_res_blocks=1", "--score-flag", "channel_mult=1", "--score-flag",
                         "attention_resolutions=", "--de-times", "0,100"]) == 0
        rec = json.loads((out / "c16__digits.json" if "c16" in argv[1] else out / "cd__digits.json").read_text())
        assert rec["settings"]["Default"]["image_size"] == size, (argv, rec["settings"])
    assert "were trained at other sizes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="different image sizes"):
        cli.main(["evaluate", "--classifier", c16, "--classifier", c24, "--modes", "Default", "--datasets",
                  "digits", "--no-progress"])


def test_evaluate_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        cli.main(["evaluate", "--classifier", str(tmp_path / "none.pt"), "--modes", "Default"])
    ck = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    with pytest.raises(SystemExit, match="neither a known name"):
        cli.main(["evaluate", "--classifier", ck, "--modes", "Default", "--datasets", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="unknown mode"):
        cli.main(["evaluate", "--classifier", ck, "--modes", "TTA"])
    with pytest.raises(SystemExit, match=r"--ash-percentile must be in \[0, 100\)"):
        cli.main(["evaluate", "--classifier", ck, "--modes", "Default", "--ash-percentile", "100"])
    # one in-distribution set, named: a pattern naming several, or none, is refused (it used the first one)
    data = image_folder_tree(tmp_path / "data")
    for ids, want in (("digits-c:all:3", "names 10 data sets"), (" ", "names 0 data sets")):
        with pytest.raises(SystemExit, match=want):
            cli.main(["evaluate", "--classifier", ck, "--datasets", data, "--ood-datasets", data,
                      "--id-dataset", ids, "--no-progress"])
    # a percentile that keeps none of the classifier's penultimate features is refused before any pass over the
    # data (it failed with a traceback after the whole ID pass), for ASH-S and SCALE alike
    n = classifier.load_classifier(ck).linear_head().weight.shape[1]
    for flag in ("--ash-percentile", "--scale-percentile"):
        p = 100 * (n - 0.4) / n  # k = n - round(n - 0.4) = 0
        with pytest.raises(SystemExit, match=f"{flag} {p} keeps none of .*'s {n} penultimate features") as e:
            cli.main(["evaluate", "--classifier", ck, "--datasets", "digits", "--ood-datasets", data, "--modes",
                      "Default", "--image-size", "16", "--out", str(tmp_path / "o"), "--no-progress", flag, str(p)])
        assert "\n" not in str(e.value) and not os.listdir(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("argv, msg", [
    (["--max-images=-300"], "argument --max-images: must be a positive integer"),
    (["--dda-max-images=-55"], "argument --dda-max-images: must be a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--dda-steps", "0"], "argument --dda-steps: must be a positive integer"),
    (["--dda-down", "0"], "argument --dda-down: must be a positive integer"),
    (["--dda-scale", "abc"], "argument --dda-scale: must be 'auto' or a finite number >= 0"),
    (["--dda-scale", "-1"], "argument --dda-scale: must be 'auto' or a finite number >= 0"),
    (["--image-size", "0"], "argument --image-size: must be a positive integer"),
])
def test_evaluate_bad_numbers_are_argparse_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--classifier", "x.pt", *argv])
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.parametrize("argv, msg", [
    (["--de-times=-50,0"], r"--de-times: times must be >= 0.*-50"),
    (["--modes", "DDA", "--dda-depth", "500"], r"--dda-depth must lie in \[1, 99\], got 500"),
    (["--modes", "DDA", "--dda-steps", "1"], r"--dda-steps must be at least 2"),
    (["--modes", "DDA", "--dda-down", "64", "--image-size", "32"],
     r"--dda-down 64 is larger than the images \(32x32\)"),
    (["--device", "tpu"], r"diffaug evaluate: .*--device.*tpu"),
    (["--device", "cuda:x"], r"diffaug evaluate: bad --device 'cuda:x'"),
])
def test_evaluate_bad_options_fail_before_any_model_loads(tmp_path, monkeypatch, argv, msg):
    """Options that do not depend on the score model are refused before a classifier or score model is loaded."""
    ck = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(evc, "load_classifier", no_load)
    monkeypatch.setattr(evc, "resolve_score_model", no_load)
    with pytest.raises(SystemExit, match=msg) as e:
        cli.main(["evaluate", "--classifier", ck, "--no-progress", *argv])
    assert "\n" not in str(e.value)


def test_evaluate_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    ck = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(evc, "load_classifier", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
        cli.main(["evaluate", "--classifier", ck, "--device", "cuda"])


@pytest.mark.parametrize("argv, msg", [
    (["--modes", "DE", "--de-times", "0,1000"], r"--de-times must lie in \[0, 1000\).*\[1000\]"),
    (["--modes", "DDA", "--dda-steps", "2000"], r"--dda-steps 2000: cannot take 2000 steps"),
])
def test_evaluate_options_checked_against_the_schedule_before_any_data(tmp_path, monkeypatch, argv, msg):
    ck = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    monkeypatch.setattr(ev, "build_dataset", lambda *a, **k: pytest.fail("a dataset was built"))
    flags = [v for k, val in TINY_UNET_FLAGS.items() for v in ("--score-flag", f"{k}={str(val).lower()}")]
    with pytest.raises(SystemExit, match=msg):
        cli.main(["evaluate", "--classifier", ck, "--score-model", "random", "--score-config", "digits32", *flags,
                  "--no-progress", *argv])


def test_grey_classifier_on_rgb_folder_and_cifar(tmp_path):
    """A 1-channel classifier on RGB sets (ImageFolder, CIFAR-10): the images are turned grey (torchvision's
    Grayscale luma), not fed as 3 channels to a 1-channel conv."""
    from torchvision.transforms.functional import rgb_to_grayscale

    data = image_folder_tree(tmp_path / "data")
    (spec,) = eval_sets.parse_datasets([data])
    rgb, grey = eval_sets.build_dataset(spec, 16, 3), eval_sets.build_dataset(spec, 16, 1)
    assert grey.classes == rgb.classes == ["cat", "dog"] and len(grey) == len(rgb) == 6
    x3, y3 = rgb[4]
    x1, y1 = grey[4]
    assert x1.shape == (1, 16, 16) and y1 == y3 == 1
    torch.testing.assert_close(x1, rgb_to_grayscale(x3))
    torch.testing.assert_close(x1[0], 0.2989 * x3[0] + 0.587 * x3[1] + 0.114 * x3[2], rtol=0, atol=1e-5)
    # CIFAR-10's test batch, one image
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    import pickle

    img = np.random.RandomState(0).randint(0, 256, (1, 3 * 32 * 32), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": img, "labels": [3]}, f)
    (cspec,) = eval_sets.parse_datasets([f"cifar10:{tmp_path}"])
    x, y = eval_sets.build_dataset(cspec, 32, 1)[0]
    assert x.shape == (1, 32, 32) and int(y) == 3
    with pytest.raises(utils.UsageError, match="4-channel"):
        eval_sets.build_dataset(spec, 16, 4)
    # the whole command with a 1-channel classifier on the RGB folder
    ck = classifier_checkpoint(tmp_path / "g.pt", num_classes=2, in_chans=1)
    assert cli.main(["evaluate", "--classifier", ck, "--datasets", data, "--modes", "Default", "--image-size", "16",
                     "--no-progress"]) == 0


def test_unreadable_image_names_the_file(tmp_path, capsys):
    data = image_folder_tree(tmp_path / "data")
    bad = tmp_path / "data" / "dog" / "9.png"
    bad.write_bytes(b"not a png")
    ck = classifier_checkpoint(tmp_path / "a.pt")
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--classifier", ck, "--datasets", data, "--modes", "Default", "--image-size", "16",
                  "--no-progress"])
    msg = str(e.value)
    assert msg.startswith("diffaug evaluate: error: cannot read image") and str(bad) in msg and "\n" not in msg


def test_files_that_are_not_checkpoints(tmp_path):
    """--classifier and --score-model given a text file, a non-dict pickle, or a foreign checkpoint: one line naming
    the file and what it is not (torch's weights-only unpickler says KeyError: 101)."""
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    fake_st = tmp_path / "fake.safetensors"
    fake_st.write_text("hello")
    ck = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    for path, want in ((text, "is not a train_classifier checkpoint"), (listed, "it holds a list")):
        with pytest.raises(SystemExit, match=want) as e:
            cli.main(["evaluate", "--classifier", str(path), "--modes", "Default"])
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(utils.UsageError, match="not a train_classifier checkpoint"):
        classifier.load_classifier(str(text))
    for path in (text, fake_st):
        with pytest.raises(SystemExit, match="is not a score-model checkpoint") as e:
            cli.main(["evaluate", "--classifier", ck, "--modes", "DE", "--score-model", str(path), "--score-config",
                      "digits32"])
        assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing classifier", "text classifier", "mode", "dataset", "percentile"])
def test_cli_failures_are_one_line_in_a_subprocess(case, tmp_path):
    """What a user gets wrong, run as a user runs it: one line on stderr naming it, a non-zero exit, no traceback."""
    ck = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    (tmp_path / "notes.pt").write_text("hello")
    argv, said = {
        "missing classifier": (["--classifier", str(tmp_path / "none.pt")], ["none.pt"]),
        "text classifier": (["--classifier", str(tmp_path / "notes.pt")], ["notes.pt is not a train_classifier"]),
        "mode": (["--classifier", ck, "--modes", "TTA"], ["unknown mode"]),
        "dataset": (["--classifier", ck, "--datasets", str(tmp_path / "nope")], ["neither a known name"]),
        "percentile": (["--classifier", ck, "--ash-percentile", "100"], ["--ash-percentile must be in [0, 100)"]),
    }[case]
    rc, _, err = cli_subprocess("evaluate", "--no-progress", *(["--modes", "Default"] if case != "mode" else []),
                                *argv)
    assert_one_line_failure(rc, err, "diffaug evaluate", *said)
