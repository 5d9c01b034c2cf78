"""dk.robustness, the evaluation harness: DE predictions, the modes' counts, OOD feature scores and metrics,
subsets, progress. Tiny everything: a random 2-level ADM UNet, timm's test_resnet, a few 16x16 images."""
import json

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_FLAGS, NearestMean, classifier_checkpoint, expected_counts, image_folder_tree

import diffaug_kernels as dk
from diffaug_kernels import robustness as ev
from diffaug_kernels import utils
from diffaug_kernels.data import eval_sets
from diffaug_kernels.models import classifier


def test_de_predict_matches_diffaug_ensemble():
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=16, in_channels=1, **TINY_UNET_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    clfs = {n: classifier.create_classifier("test_resnet", 10, 1).eval() for n in ("a", "b")}
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    times = (0, 100, 400)
    got = ev.de_predict(clfs, aug, x, times, seed=5, max_batch=4)
    for n, clf in clfs.items():
        ref = dk.diffaug_ensemble(clf, aug, x, times=times, seed=5, max_batch=4)
        torch.testing.assert_close(got[n][0], ref, rtol=1e-5, atol=1e-6)
        assert got[n][1].shape == ref.shape


def test_de_predict_keeps_broken_logits_broken():
    """A classifier whose logits are NaN for one image: DE's mean logits (the energy score's input) stay NaN for
    that image, as its mean softmax does, instead of NaN turning into 0 (a made-up finite energy and a valid-
    looking AUROC); +inf stays +inf; the other images are untouched."""
    class Broken(torch.nn.Module):
        def forward(self, x):
            z = x.flatten(1)[:, :3] * 5
            return torch.cat([z[:1] * float("nan"), z[1:2].clamp(max=0) + torch.tensor([float("inf"), 0, 0]), z[2:]])

    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=16, in_channels=1, **TINY_UNET_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    (p, z), = ev.de_predict({"c": Broken()}, aug, x, (0, 100), seed=0).values()
    assert torch.isnan(z[0]).all() and torch.isnan(p[0]).all()
    assert z[1, 0] == float("inf") and torch.isfinite(z[1, 1:]).all()
    assert torch.isfinite(z[2]).all() and torch.isfinite(dk.ood.energy(z[2:])).all()
    assert torch.isnan(dk.ood.energy(z[:1])).all()


def test_ood_feature_scores_are_dk_ood_on_the_penultimate_features(tmp_path):
    """The command's ReAct / ASH-S / SCALE scores, recomputed here from the classifier's own pooled features and fc
    layer with dk.ood and numpy's percentile; a classifier without a linear head gets MSP / energy only."""
    data = image_folder_tree(tmp_path / "id", n=4)
    far = image_folder_tree(tmp_path / "far", n=4, seed=1, invert=True)
    clf = classifier.load_classifier(classifier_checkpoint(tmp_path / "a.pt", seed=0))
    odd = classifier.load_classifier(classifier_checkpoint(tmp_path / "b.pt", seed=1))
    odd.net.fc = torch.nn.Sequential(odd.net.fc, torch.nn.Identity())  # no nn.Linear head any more
    cfg = ev.EvalConfig(modes=("Default",), batch_size=3, image_size=16, progress=False, react_percentile=80,
                        ash_percentile=70, scale_percentile=60)
    logs = []
    id_spec, ood_spec = eval_sets.parse_datasets([data, far])
    res = ev.run_ood([("a", clf), ("b", odd)], None, id_spec, [ood_spec], cfg, str(tmp_path / "out"), logs.append)
    assert any("[b] ReAct / ASH / SCALE skipped" in m and "nn.Linear" in m for m in logs)
    assert set(res["b"]["far"]) == {"Default/msp", "Default/energy"}

    def feats(spec):
        ds = eval_sets.build_dataset(spec, 16, 3, cfg.seed)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            return clf.penultimate(x).float()

    f_id, f_ood = feats(id_spec), feats(ood_spec)
    assert f_id.shape == (8, clf.net.num_features) and (f_id >= 0).all()
    thr = float(np.percentile(f_id.numpy().ravel(), 80))
    w, b = clf.net.fc.weight.detach(), clf.net.fc.bias.detach()
    saved = json.loads((tmp_path / "out" / "ood.json").read_text())
    assert saved["react_threshold"]["a"] == pytest.approx(thr, rel=1e-6)
    for name, f in (("id", f_id), ("far", f_ood)):
        with np.load(tmp_path / "out" / f"a__{name}.scores.npz") as z:
            np.testing.assert_allclose(z["Default/react"], dk.ood.react(f, w, b, thr).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(z["Default/ash"], dk.ood.ash(f, w, b, 70).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(z["Default/scale"], dk.ood.scale(f, w, b, 60).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(z["Default/energy"], dk.ood.energy(f @ w.T + b).numpy(), rtol=1e-5, atol=1e-5)
    for k in ("react", "ash", "scale"):
        with np.load(tmp_path / "out" / "a__id.scores.npz") as zi, \
                np.load(tmp_path / "out" / "a__far.scores.npz") as zo:
            assert res["a"]["far"][f"Default/{k}"]["auroc"] == pytest.approx(dk.ood.auroc(zi[f"Default/{k}"],
                                                                                          zo[f"Default/{k}"]))

    # another ReAct percentile: a new threshold, and the OOD set's cached react scores are not reused
    cfg.react_percentile = 50
    ev.run_ood([("a", clf)], None, id_spec, [ood_spec], cfg, str(tmp_path / "out"), logs.append)
    thr2 = float(np.percentile(f_id.numpy().ravel(), 50))
    with np.load(tmp_path / "out" / "a__far.scores.npz") as z:
        np.testing.assert_allclose(z["Default/react"], dk.ood.react(f_ood, w, b, thr2).numpy(), rtol=1e-5, atol=1e-5)


def test_feature_scores_need_logits_that_are_the_linear_head_of_the_features(tmp_path):
    clf = classifier.load_classifier(classifier_checkpoint(tmp_path / "a.pt"))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert ev.feature_head_check(clf, x) is None
    forward = clf.net.forward
    clf.net.forward = lambda v: 2 * forward(v)  # something after the head: the features would not explain it
    assert "not its linear head" in ev.feature_head_check(clf, x)
    assert "no penultimate features" in ev.feature_head_check(clf.net, x)


def test_ood_metrics_of_nan_scores_are_reported_not_raised():
    m = ev.detection_metrics(np.array([1.0, np.nan]), np.array([0.0, 0.5]))
    assert m == {"auroc": None, "fpr95": None, "non_finite": 1}
    assert "n/a (1 NaN scores)" in ev.format_ood_table({"c": {"d": {"Default/ash": m}}})


def test_harness_digits_c_in_process():
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=32, in_channels=1, **TINY_UNET_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    clf = NearestMean().eval()
    cfg = ev.EvalConfig(modes=ev.MODES, batch_size=8, max_images=8, de_times=(0, 250), image_size=32,
                        dda_steps=10, dda_depth=3, progress=False)
    specs = eval_sets.parse_datasets(["digits", "digits-c:contrast:5"])
    res = ev.run([("c", clf)], aug, specs, cfg, log=lambda m: None)
    assert set(res["results"]["c"]) == {"digits", "digits-c:contrast:5"}
    assert res["results"]["c"]["digits"]["n"] == {"Default": 8, "DE": 8, "DDA": 8, "DDA-SE": 8}
    assert "digits-c:contrast:5" in res["table"]

    # the numbers: the same 8 images (the harness's fixed subset of its own dataset builder's images), each mode
    # recomputed with torch argmax, dk.diffaug_ensemble and dk.dda.dda_se_predict
    got = {}
    for spec in specs:
        ds = eval_sets.build_dataset(spec, 32, 1, cfg.seed)
        sub = ev.subset(ds, 8, ev.stream_seed(cfg.seed, "subset", spec.name))
        x = torch.stack([sub[i][0] for i in range(8)])
        y = torch.tensor([int(sub[i][1]) for i in range(8)])
        rec = res["results"]["c"][spec.name]
        got[spec.name] = want = expected_counts(clf, aug, spec, x, y, cfg)
        assert rec["correct"] == want, spec.name
        assert rec["acc"] == {m: want[m] / 8 for m in ev.MODES}, spec.name
    # and they tell the modes apart (else the checks above could not see a mode scored as another): Default on
    # the clean set is not 4 of 8 (counting its wrong answers would show), DE differs from Default on the
    # corrupted set and DDA-SE from DDA on the clean one
    assert got["digits"]["Default"] == 6
    assert got["digits-c:contrast:5"]["DE"] != got["digits-c:contrast:5"]["Default"]
    assert got["digits"]["DDA-SE"] != got["digits"]["DDA"]


def test_subset_refuses_a_non_positive_count():
    ds = dk.data.digits("test", 8, 1)
    with pytest.raises(utils.UsageError, match="positive integer"):
        ev.subset(ds, -300, 0)
    with pytest.raises(utils.UsageError, match="positive integer"):
        ev.subset(ds, 0, 0)
    assert len(ev.subset(ds, 5, 0)) == 5 and ev.subset(ds, 10**6, 0) is ds
    cfg = ev.EvalConfig(modes=("Default",), max_images=-3, progress=False)
    with pytest.raises(utils.UsageError, match="max_images must be a positive integer"):
        ev.evaluate_dataset(NearestMean().eval(), None, ds, ("Default",), cfg)


def test_dda_step_note_redraws_the_bar_at_most_every_few_seconds():
    class Bar:
        def __init__(self):
            self.postfix, self.redraws = None, 0

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s
            self.redraws += refresh

        def refresh(self):
            self.redraws += 1

    slow, fast = Bar(), Bar()
    progress_slow, progress_fast = utils.Progress(25, bar=False), utils.Progress(25, bar=False)
    progress_slow.bar, progress_fast.bar = slow, fast  # the tqdm bar a terminal would show
    note_slow, note_fast = ev.step_note(progress_slow, every_s=3600), ev.step_note(progress_fast, every_s=0)
    for i in range(1, 26):
        note_slow(i, 25)
        note_fast(i, 25)
    assert slow.postfix == fast.postfix == "DDA step 25/25 of this batch"
    assert slow.redraws == 0 and fast.redraws == 25
