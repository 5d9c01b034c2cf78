"""`diffaug pag`: a tiny end-to-end run (random test_resnet classifiers, an untrained tiny UNet) writes pag.json,
the gradient grid and the alignment plot, with numbers the library recomputes; bad options fail in one line."""
import json

import pytest
import torch
from helpers import TINY_UNET_FLAGS, classifier_checkpoint
from PIL import Image

import diffaug_kernels as dk
from diffaug_kernels import cli, pag
from diffaug_kernels.commands import pag as pc
from diffaug_kernels.models import classifier
from diffaug_kernels.models.score import resolve_score_model

FLAGS = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_UNET_FLAGS.items()]


def argv(tmp_path, *more):
    a = classifier_checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1, seed=0)
    b = classifier_checkpoint(tmp_path / "b.pt", num_classes=10, in_chans=1, seed=1)
    return ["pag", "--classifier", f"plain={a}", "--classifier", f"da={b}", "--score-model", "random",
            "--score-config", "digits32", *[v for f in FLAGS for v in ("--score-flag", f)], "--times", "300,900",
            "--images", "6", "--grid-images", "2", "--eps", "0.5", "--pgd-images", "5", "--pgd-steps", "2",
            "--batch-size", "4", "--out", str(tmp_path / "out"), "--threads", "1", "--no-progress", *more]


def test_pag_command_end_to_end(tmp_path, capsys):
    assert cli.main(argv(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "Mean cosine with the Bayes direction" in text and "under L2 PGD" in text
    out = tmp_path / "out"
    res = json.loads((out / "pag.json").read_text())
    assert set(res["alignment"]) == {"plain", "da"} and set(res["robust_accuracy"]["da"]) == {"0", "0.5"}
    assert set(res["alignment"]["da"]["diffaug"]) == {"300", "900"}
    with Image.open(out / "pag_grid.png") as im:  # 2 digits x (2 classifiers + Bayes) rows, x + plain + 2 t
        assert im.format == "PNG" and im.height > 6 * 64 and im.width > 4 * 64
    with Image.open(out / "alignment_vs_t.png") as im:
        assert im.format == "PNG"

    # the numbers, recomputed with the library: the same random UNet (its weights follow --seed) and noise seeds
    torch.manual_seed(0)
    model, _ = resolve_score_model("random", "digits", "digits32", FLAGS, 1)
    sched = dk.NoiseSchedule.linear(1000)
    aug = dk.DiffAug(model, sched)
    train_x, train_y = dk.data.digits("train", 32, 1).tensors
    x, y = (v[:6] for v in dk.data.digits("test", 32, 1).tensors)
    clf = classifier.load_classifier(str(tmp_path / "b.pt"))
    batches = [(0, 4), (4, 6)]  # --batch-size 4: each batch's noise at t comes from seed + t
    g = torch.cat([pag.input_gradient(clf, x[lo:hi], y[lo:hi], augment=aug, t=900, seed=900) for lo, hi in batches])
    x_t = torch.cat([dk.forward_noise(x[lo:hi], 900, sched, seed=900) for lo, hi in batches])
    cos = pag.alignment(g, pag.bayes_direction(x_t, 900, y, train_x, train_y, sched))
    cos = cos[~torch.isnan(cos)]
    row = res["alignment"]["da"]["diffaug"]["900"]
    assert row["n"] == len(cos) > 0 and row["mean"] == pytest.approx(float(cos.mean()), abs=1e-4)
    with torch.no_grad():
        clean = float((clf(dk.data.digits("test", 32, 1).tensors[0][:5]).argmax(1)
                       == dk.data.digits("test", 32, 1).tensors[1][:5]).double().mean())
    assert res["robust_accuracy"]["da"]["0"] == clean
    assert res["robust_accuracy"]["da"]["0.5"] <= clean


def test_guidance_classifiers_are_aligned_at_x_t(tmp_path, capsys):
    """--guidance-classifier: a train-guidance checkpoint's d log p(y | x_t, t) / dx_t on the same x_t as the Bayes
    direction; the row of pag.json is the library's number, and the table and grid gain its rows."""
    ck_dir = tmp_path / "guide"
    assert cli.main(["train-guidance", "--kind", "noisy", "--channel_mult", "1,2", "--classifier_attention_resolutions",
                     "", "--batch-size", "4", "--steps", "2", "--eval-images", "4", "--eval-times", "0",
                     "--no-progress", "--out", str(ck_dir)]) == 0
    ck = sorted(ck_dir.glob("ckpt_*.pt"))[-1]
    assert cli.main(argv(tmp_path, "--guidance-classifier", f"noisy={ck}")) == 0
    text = capsys.readouterr().out
    assert "noisy (x_t)" in text
    res = json.loads((tmp_path / "out" / "pag.json").read_text())
    assert set(res["guidance_alignment"]["noisy"]) == {"300", "900"}

    net = dk.models.load_guidance_classifier(str(ck), "cpu")
    sched = dk.NoiseSchedule.linear(1000)
    train_x, train_y = dk.data.digits("train", 32, 1).tensors
    x, y = (v[:6] for v in dk.data.digits("test", 32, 1).tensors)
    x_t = torch.cat([dk.forward_noise(x[lo:hi], 300, sched, seed=300) for lo, hi in [(0, 4), (4, 6)]])
    xg = x_t.clone().requires_grad_(True)
    logp = torch.log_softmax(net(xg, torch.full((6,), 300)), 1).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(logp, xg)
    cos = pag.alignment(g, pag.bayes_direction(x_t, 300, y, train_x, train_y, sched))
    cos = cos[~torch.isnan(cos)]
    row = res["guidance_alignment"]["noisy"]["300"]
    assert row["n"] == len(cos) > 0 and row["mean"] == pytest.approx(float(cos.mean()), abs=1e-4)
    with pytest.raises(SystemExit, match="names must differ"):
        cli.main(argv(tmp_path, "--guidance-classifier", f"da={ck}"))


@pytest.mark.parametrize("more, msg", [(["--times", "300,1000"], "--times must lie in"),
                                       (["--eps", "a"], "--eps"), (["--times", "3,3"], "distinct")])
def test_bad_options_fail_in_one_line(tmp_path, capsys, more, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(argv(tmp_path, *more))
    err = capsys.readouterr().err
    assert e.value.code != 0
    assert msg in (str(e.value.code) + err)


def test_missing_classifier_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="diffaug pag: error: --classifier checkpoint not found"):
        cli.main(["pag", "--classifier", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o")])


def test_format_table_marks_times_without_a_bayes_direction():
    row = {"mean": None, "sem": None, "n": 0}
    res = {"settings": {"times": [10], "images": 3},
           "alignment": {"c": {"diffaug": {"10": row}, "plain": {"10": row}}},
           "robust_accuracy": {"c": {"0": 1.0, "0.5": 0.5}}}
    text = pc.format_table(res)
    assert "n/a" in text and "t=10 0 / 0" in text and "(of 3)" in text and "50.0" in text
