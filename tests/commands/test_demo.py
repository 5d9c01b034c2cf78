"""`diffaug demo --quick` end to end (tiny classifier, tiny image counts, an untrained tiny score model): every
piece runs, writes its files, and a second run reuses the trained classifiers and finished evaluations."""
import json

import torch
from PIL import Image

from diffaug_kernels import cli
from diffaug_kernels import robustness as ev
from diffaug_kernels.commands import demo
from diffaug_kernels.data import eval_sets
from diffaug_kernels.models import classifier


def test_demo_quick_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--score-model", "random", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "Top-1 accuracy" in text and "no DiffAug" in text and "DDA-SE" in text
    assert "UNTRAINED score model" in text  # the run says its numbers mean nothing
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] and set(res["accuracy"]) == {"no DiffAug", "DiffAug"}
    assert set(res["accuracy"]["DiffAug"]) == {"digits", "digits-c:gaussian_noise:5"}
    assert set(res["accuracy"]["DiffAug"]["digits"]) == {"Default", "DE", "DDA", "DDA-SE"}
    assert res["images"]["DiffAug"]["digits"] == {"Default": 16, "DE": 16, "DDA": 4, "DDA-SE": 4}
    assert len(res["entropy_vs_t"]["t"]) == len(res["entropy_vs_t"]["DiffAug"]) == 3
    # certification: both classifiers at the quick sigma, from the certify command's logs (2 digits each)
    assert set(res["certified_accuracy"]) == {"no-diffaug", "diffaug"} and res["certify_radii"][:2] == [0.0, 0.5]
    assert set(res["certified_accuracy"]["diffaug"]) == {"sigma 0.5", "best"}
    assert "DDS certification" in text and "certified accuracy at L2 radius 0.5" in text
    for name in ("no-diffaug", "diffaug"):
        rows = (out / "certify" / f"{name}__sigma_0.5.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"] and len(rows) == 3
        correct = [int(r.split("\t")[4]) for r in rows[1:]]
        assert res["certified_accuracy"][name]["sigma 0.5"][0] == sum(correct) / 2
    # perceptually aligned gradients: both classifiers, the quick times and eps, from the pag command's analysis
    assert set(res["pag"]["alignment"]) == {"no-diffaug", "diffaug"}
    assert set(res["pag"]["alignment"]["diffaug"]["diffaug"]) == {"300", "900"}
    assert set(res["pag"]["robust_accuracy"]["no-diffaug"]) == {"0", "0.5"}
    assert json.loads((out / "pag" / "pag.json").read_text())["robust_accuracy"] == res["pag"]["robust_accuracy"]
    assert "Mean cosine with the Bayes direction" in text and "accuracy under L2 PGD" in text
    # classifier guidance: with the untrained score model both guidance classifiers are trained here
    guide = res["guidance"]
    assert {k: (c["source"], c["steps"]) for k, c in guide["classifiers"].items()} == {"noisy": ("trained", 2),
                                                                                       "da": ("trained", 2)}
    assert set(guide["classifiers"]["da"]["accuracy_on_x_t"]) == {"0", "500"}
    assert set(guide["samples"]) == {"unguided", "noisy", "da"} and "Classifier guidance on the digits" in text
    assert (out / "guidance" / "noisy" / "ckpt_0000002.pt").is_file()
    for name in ("augmentation_grid.png", "entropy_vs_t.png", "certify/certified_accuracy.png", "pag/pag_grid.png",
                 "pag/alignment_vs_t.png", "guidance/unguided.png", "guidance/noisy.png", "guidance/da.png",
                 "guidance/guidance_grid.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert (out / "no-diffaug" / "checkpoint.pt").is_file() and (out / "diffaug" / "checkpoint.pt").is_file()
    # the reported Default accuracies, recomputed: each trained classifier on the evaluation's 16 images (the
    # harness's fixed subset of its own dataset builder's images, seed 0)
    for spec in eval_sets.parse_datasets(["digits", "digits-c:gaussian_noise:5"]):
        sub = ev.subset(eval_sets.build_dataset(spec, 32, 1, 0), 16, ev.stream_seed(0, "subset", spec.name))
        x = torch.stack([sub[i][0] for i in range(16)])
        y = torch.tensor([int(sub[i][1]) for i in range(16)])
        for cname, folder in (("no DiffAug", "no-diffaug"), ("DiffAug", "diffaug")):
            clf = classifier.load_classifier(str(out / folder / "checkpoint.pt"))
            with torch.no_grad():
                right = int((clf(x).argmax(1) == y).sum())
            assert res["accuracy"][cname][spec.name]["Default"] == right / 16, (cname, spec.name)

    assert cli.main(argv) == 0  # resumable: nothing is trained or evaluated again
    text2 = capsys.readouterr().out
    assert "already trained" in text2 and "done already" in text2
    assert json.loads((out / "results.json").read_text())["accuracy"] == res["accuracy"]

    ck = out / "no-diffaug" / "checkpoint.pt"  # damaged (truncated) in the output folder: trained again, no traceback
    ck.write_bytes(ck.read_bytes()[:1000])
    assert cli.main(argv) == 0
    text3 = capsys.readouterr().out
    assert "checkpoint.pt is truncated or damaged" in text3 and "retraining" in text3
    assert classifier.load_classifier(str(ck)) is not None


def test_guidance_part_with_the_shipped_classifiers(tmp_path):
    """Part 7 on the shipped score model takes the shipped guidance classifiers; its numbers are recomputed here
    from the library: the judge's accuracy on the guided samples and on x_t."""
    from diffaug_kernels import metrics, sampling
    from diffaug_kernels.commands import train_guidance as tg
    from diffaug_kernels.data import digits
    from diffaug_kernels.models.guidance import load_default_guidance_classifier
    from diffaug_kernels.ops import philox_normal

    s = dict(demo.QUICK)
    model, schedule, flags = demo.demo_score_model("default", str(tmp_path), 0)
    torch.manual_seed(0)
    judge = classifier.create_classifier("test_resnet", 10, 1).eval()
    x_test = digits("test", 32, 1).tensors[0][:40]
    g = demo._guidance(str(tmp_path / "guidance"), s, flags, model, schedule, judge, x_test, 0)
    assert {k: (c["source"], c["steps"]) for k, c in g["classifiers"].items()} == {"noisy": ("shipped", 500),
                                                                                   "da": ("shipped", 500)}
    assert "shipped classifiers" in g["table"] and json.loads((tmp_path / "guidance" / "guidance.json").read_text())
    da = load_default_guidance_classifier("da", score_model=model)
    acc = tg.noisy_accuracy(da, digits("test", 32, 1), schedule, s["guide_eval_times"], 0, 64, s["guide_eval_images"])
    assert g["classifiers"]["da"]["accuracy_on_x_t"] == {str(t): a for t, a in acc.items()}
    y = torch.arange(10).repeat(s["guide_per_label"])
    x_T = philox_normal((len(y), 1, 32, 32), ev.stream_seed(0, "guidance"), 0)
    x = sampling.ddim_sample(model, schedule, x_T, s["guide_ddim"], classifier=da, classifier_scale=s["guide_scale"],
                             y=y).clamp(-1, 1)
    with torch.no_grad():
        probs = torch.softmax(judge(x), 1)
    row = g["samples"]["da"]
    assert row["on_target"] == float((probs.argmax(1) == y).float().mean())
    assert abs(row["score"] - metrics.inception_score(probs.numpy(), splits=1)) < 1e-4
    assert row["frechet_distance"] > 0 and 0 <= row["coverage"] <= 1
    for name in ("unguided", "noisy", "da"):
        with Image.open(tmp_path / "guidance" / f"{name}.png") as im:
            assert im.format == "PNG"


def test_demo_missing_shipped_model_is_a_clear_error(tmp_path, monkeypatch):
    from diffaug_kernels import pretrained

    monkeypatch.setattr(pretrained, "DEFAULT_WEIGHTS", str(tmp_path / "absent.safetensors"))
    try:
        demo.demo_score_model("default", str(tmp_path), 0)
    except SystemExit as e:
        assert "absent.safetensors" in str(e) and "--score-model random" in str(e)
    else:
        raise AssertionError("expected SystemExit")


def test_demo_bad_corruption_fails_before_any_work(tmp_path, monkeypatch):
    """The data sets are parsed first: a typo in --corruptions costs nothing (no score model, no training)."""
    import pytest

    def boom(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(demo, "demo_score_model", boom)
    monkeypatch.setattr(demo, "_train", boom)
    for bad, msg in [("foo:5", "unknown corruption 'foo'"), ("gaussian_noise:9", "severity must be 1..5")]:
        with pytest.raises(SystemExit, match=msg):
            cli.main(["demo", "--out", str(tmp_path / "d"), "--corruptions", bad])
    assert not (tmp_path / "d").exists()
