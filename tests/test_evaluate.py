"""dk.corruptions, dk.evaluate (the Default / DE / DDA / DDA-SE harness, its dataset readers, JSON + resume, OOD)
and dk.plots. Tiny everything: a random 2-level ADM UNet, timm's test_resnet, a few 16x16 images."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import diffaug_kernels as dk
from diffaug_kernels import cli, corruptions as C, evaluate as ev, plots
from diffaug_kernels import train_classifier as tc

TINY_FLAGS = dict(num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                  resblock_updown=False)


# ------------------------------------------------------------------------------------------------ corruptions
def _digits(n=8):
    return dk.data.digits("test", 32, 1).tensors[0][:n]


@pytest.mark.parametrize("name", C.CORRUPTIONS)
@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (2, 3, 20, 24), (3, 16, 16)])
def test_corruption_shape_range_determinism(name, shape):
    x = torch.rand(*shape) * 2 - 1
    for sev in (1, 5):
        a = C.corrupt(x, name, sev, seed=3)
        assert a.shape == x.shape and a.dtype == x.dtype
        assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
        torch.testing.assert_close(C.corrupt(x, name, sev, seed=3), a, rtol=0, atol=0)
    if name.endswith("noise"):  # random corruptions: another seed, other noise
        assert not torch.equal(C.corrupt(x, name, 3, seed=4), C.corrupt(x, name, 3, seed=3))


def _hf_energy(x):  # high-frequency energy: mean squared horizontal + vertical differences
    return float(((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean())


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_corruption_severity_is_monotonic(preset):
    x = _digits(16)
    xr = torch.rand(4, 3, 32, 32) * 1.6 - 0.8

    def series(f, name, inp=x):
        return [f(C.corrupt(inp, name, s, seed=0, preset=preset), inp) for s in C.SEVERITIES]

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "jpeg_compression"):
        v = series(mse, name)
        assert all(b >= a for a, b in zip(v, v[1:])), (name, v)  # more severe: further from the clean image
        assert v[0] > 0
    for name in ("gaussian_blur", "defocus_blur"):
        v = series(lambda a, b: _hf_energy(a), name)
        assert all(b <= a * 1.0001 for a, b in zip(v, v[1:])), (name, v)  # more severe: smoother
        assert v[-1] < _hf_energy(x)
    v = series(lambda a, b: float(a.std()), "contrast")
    assert all(b < a for a, b in zip(v, v[1:])) and v[0] < float(x.std())
    for inp in (x, xr):  # pixelate: further from the clean image with every severity (it was not, before BOX)
        v = series(lambda a, b: float((a - b).abs().mean()), "pixelate", inp)
        assert all(b > a for a, b in zip(v, v[1:])), v
    for inp in (x, xr):  # grey and RGB (HSV value)
        v = series(lambda a, b: float(a.mean()), "brightness", inp)
        assert all(b > a for a, b in zip(v, v[1:])) and v[0] > float(inp.mean())


def test_per_image_seeds_use_the_whole_seed():
    x = torch.rand(3, 8, 8) * 2 - 1
    out = {s: C.corrupt_image(x, "gaussian_noise", 3, s, 5) for s in (0, 7, 2**32, 2**32 + 7, 2**64, -1, 2**32 - 1)}
    assert len({o.numpy().tobytes() for o in out.values()}) == len(out)
    torch.testing.assert_close(C.corrupt_image(x, "gaussian_noise", 3, 7, 5), out[7], rtol=0, atol=0)


def test_pixelate_is_pils_box_resize_and_contrast_is_per_channel():
    """pixelate = PIL's BOX resize down and up (the reference's), here checked on 8-bit images within the
    reference's own intermediate rounding; contrast takes each channel's own mean (a flat colour is unchanged)."""
    from PIL import Image

    x = (torch.rand(2, 3, 32, 32) * 255).round() / 127.5 - 1
    got = C.corrupt(x, "pixelate", 3, preset="cifar")  # c = 0.85: 32 -> 27 -> 32, not an integer factor
    for img, out in zip(x, got):
        im = Image.fromarray(((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
        ref = np.asarray(im.resize((27, 27), Image.BOX).resize((32, 32), Image.BOX), dtype=np.float32)
        ref = torch.from_numpy(ref.copy()).permute(2, 0, 1) / 127.5 - 1
        assert (out - ref).abs().max() <= 3 / 255
    flat = torch.tensor([0.8, -0.8, 0.0]).view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()
    torch.testing.assert_close(C.corrupt(flat, "contrast", 5, preset="imagenet"), flat)


def test_pixelate_constant_blocks_and_errors():
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    p = C.corrupt(x, "pixelate", 5, preset="imagenet")  # 64 -> 16 -> 64: 4x4 constant blocks
    blocks = p.reshape(1, 1, 16, 4, 16, 4)
    assert torch.allclose(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="preset"):
        C.corrupt(x, "contrast", 1, preset="mnist")


def test_corrupted_dataset_is_per_image_deterministic():
    base = dk.data.digits("test", 32, 1)
    ds = C.CorruptedDataset(base, "gaussian_noise", 5, seed=1)
    a = torch.stack([ds[i][0] for i in range(4)])
    b = torch.stack([ds[i][0] for i in (3, 2, 1, 0)]).flip(0)  # order does not matter
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ds[0][1] == base[0][1] and not torch.equal(ds[0][0], base[0][0])


# ------------------------------------------------------------------------------------------------ dataset readers
def test_cifar10c_npy_layout(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, size=(5 * 6, 32, 32, 3), dtype=np.uint8)
    y = np.tile(np.arange(6) % 10, 5)
    np.save(tmp_path / "fog.npy", x)
    np.save(tmp_path / "contrast.npy", x[::-1].copy())
    np.save(tmp_path / "labels.npy", y)
    ds = ev.CIFAR10C(str(tmp_path), "fog", severity=3)
    assert len(ds) == 6
    img, lab = ds[2]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and lab == y[14]
    torch.testing.assert_close(img, torch.from_numpy(x[14]).permute(2, 0, 1).float() / 127.5 - 1)
    specs = ev.parse_datasets([f"cifar10-c:{tmp_path}:all:2"])
    assert [d.name for d in specs] == ["cifar10-c:contrast:2", "cifar10-c:fog:2"]
    assert specs[0].group == "cifar10-c@2"
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        ev.CIFAR10C(str(tmp_path), "snow")
    with pytest.raises(FileNotFoundError, match="not found"):
        ev.parse_datasets([f"cifar10-c:{tmp_path}/nope"])
    # arrays that are not CIFAR-10-C's are refused, not scaled into nonsense
    for name, arr in (("float", x.astype(np.float32) / 255), ("small", x[:, :16, :16])):
        np.save(tmp_path / f"{name}.npy", arr)
        with pytest.raises(ev.EvalError, match="uint8|32, 32, 3"):
            ev.CIFAR10C(str(tmp_path), name)
    np.save(tmp_path / "labels.npy", y + 5)
    with pytest.raises(ev.EvalError, match="labels 0..9"):
        ev.CIFAR10C(str(tmp_path), "fog")


def test_parse_datasets_and_errors(tmp_path):
    names = [d.name for d in ev.parse_datasets(["digits", "digits-c:contrast:2", "digits-c:pixelate"])]
    assert names == ["digits", "digits-c:contrast:2", "digits-c:pixelate:5"]
    assert len(ev.parse_datasets(["digits-c:all:1"])) == len(C.CORRUPTIONS)
    (spec,) = ev.parse_datasets(["digits-c:gaussian_blur:3:imagenet"])
    ds = ev.build_dataset(spec, 32, 1)
    torch.testing.assert_close(ds[0][0], C.corrupt_image(dk.data.digits("test")[0][0], "gaussian_blur", 3, 0, 0,
                                                         "imagenet"))
    with pytest.raises(ev.EvalError, match="preset"):
        ev.parse_datasets(["digits-c:contrast:2:mnist"])
    for sev in ("1", "5"):
        for corr in ("fog", "blur/zoom_blur"):
            (tmp_path / "inc" / corr / sev / "n01440764").mkdir(parents=True)
    got = ev.parse_datasets([f"imagenet-c:{tmp_path / 'inc'}:5"])
    assert sorted(d.name for d in got) == ["imagenet-c:fog:5", "imagenet-c:zoom_blur:5"]
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        ev.parse_datasets([str(tmp_path / "missing")])
    with pytest.raises(ev.EvalError, match="unknown corruption"):
        ev.parse_datasets(["digits-c:fog:3"])
    with pytest.raises(ev.EvalError, match="unknown mode"):
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
    lmap, allowed = ev.label_map(ds, 1000)
    assert lmap.tolist() == [5, 900] and allowed.tolist() == [5, 900]
    z = ev._restrict(torch.zeros(1, 1000), allowed)
    assert torch.isinf(z).sum() == 998
    with pytest.raises(ev.EvalError, match="2 classes"):
        ev.label_map(ds, 10)


# ------------------------------------------------------------------------------------------------ the harness
def _folder(root, n=3, seed=0, invert=False):
    rng = np.random.RandomState(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            a = (rng.rand(20, 20, 3) * 255).astype(np.uint8)
            if cls == "dog":
                a = a // 2
            Image.fromarray(255 - a if invert else a).save(root / cls / f"{i}.png")
    return str(root)


def _checkpoint(path, num_classes=2, in_chans=3, seed=0, fit=None):
    """A random test_resnet checkpoint; fit=ROOT (a 2-class _folder tree) sets its final layer to separate the
    two classes' mean penultimate features at 16x16, so it is right on every clean image of ROOT (and its
    accuracy changes when the images do: the modes' counts then differ)."""
    torch.manual_seed(seed)
    clf = tc.create_classifier("test_resnet", num_classes, in_chans)
    if fit is not None:
        ds = dk.data.image_folder(fit, 16)
        x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
        with torch.no_grad():
            f = clf.eval().penultimate(x)
            m0, m1 = f[y == 0].mean(0), f[y == 1].mean(0)
            d, mid = m1 - m0, (m0 + m1) / 2
            clf.net.fc.weight.copy_(torch.stack([-d, d]))
            clf.net.fc.bias.copy_(torch.stack([d @ mid, -(d @ mid)]))
            assert torch.equal(clf(x).argmax(1), y)
    torch.save({"format": tc.CHECKPOINT_FORMAT, "model": clf.net.state_dict(), "model_name": "test_resnet",
                "num_classes": num_classes, "in_chans": in_chans, "normalize": None}, path)
    return str(path)


def test_de_predict_matches_diffaug_ensemble():
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=16, in_channels=1, **TINY_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    clfs = {n: tc.create_classifier("test_resnet", 10, 1).eval() for n in ("a", "b")}
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
    unet = dk.models.create_adm_unet(image_size=16, in_channels=1, **TINY_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    (p, z), = ev.de_predict({"c": Broken()}, aug, x, (0, 100), seed=0).values()
    assert torch.isnan(z[0]).all() and torch.isnan(p[0]).all()
    assert z[1, 0] == float("inf") and torch.isfinite(z[1, 1:]).all()
    assert torch.isfinite(z[2]).all() and torch.isfinite(dk.ood.energy(z[2:])).all()
    assert torch.isnan(dk.ood.energy(z[:1])).all()


def _expected_counts(clf, aug, spec, x, y, cfg):
    """Each mode's number of right answers, recomputed with the package's own prediction functions (torch argmax,
    dk.diffaug_ensemble, dk.dda.dda_se_predict) and the harness's seeding: batches of cfg.batch_size, per-batch
    seeds _derive(seed, 'de' | 'dda', dataset, batch), DDA on the fixed random subset _derive(seed, 'dda-subset',
    dataset) of cfg.dda_max_images images."""
    n = len(y)
    mask = torch.zeros(n, dtype=torch.bool)
    cap = n if cfg.dda_max_images is None else min(cfg.dda_max_images, n)
    g = torch.Generator().manual_seed(ev._derive(cfg.seed, "dda-subset", spec.name))
    mask[torch.randperm(n, generator=g)[:cap]] = True
    got = dict.fromkeys(ev.MODES, 0)
    for b, s in enumerate(range(0, n, cfg.batch_size)):
        xb, yb, m = x[s:s + cfg.batch_size], y[s:s + cfg.batch_size], mask[s:s + cfg.batch_size]
        with torch.no_grad():
            got["Default"] += int((clf(xb).argmax(1) == yb).sum())
            p = dk.diffaug_ensemble(clf, aug, xb, times=cfg.de_times, seed=ev._derive(cfg.seed, "de", spec.name, b),
                                    max_batch=cfg.batch_size)
            got["DE"] += int((p.argmax(1) == yb).sum())
        if m.any():
            se, p_a, _ = dk.dda.dda_se_predict(clf, aug, aug.schedule, xb[m], return_components=True,
                                               steps=cfg.dda_steps, depth=cfg.dda_depth, down_factor=cfg.dda_down,
                                               guidance_scale=ev.default_dda_scale(xb.shape),
                                               seed=ev._derive(cfg.seed, "dda", spec.name, b),
                                               prediction=aug.prediction, clip=aug.clip)
            got["DDA"] += int((p_a.argmax(1) == yb[m]).sum())
            got["DDA-SE"] += int((se.argmax(1) == yb[m]).sum())
    return got


def test_harness_folder_all_modes_json_resume_and_ood(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    ood = _folder(tmp_path / "ood", seed=1, invert=True)
    a, b = _checkpoint(tmp_path / "a.pt", seed=0, fit=data), _checkpoint(tmp_path / "b.pt", seed=1)
    # the score model is a saved random UNet, so this test can load the very model the command used
    torch.manual_seed(0)
    unet_path = str(tmp_path / "unet.pt")
    torch.save(dk.models.ADM_CONFIGS["digits32"].replace(**TINY_FLAGS, in_channels=3).create().state_dict(), unet_path)
    score_flags = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_FLAGS.items()]
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
    (spec,) = ev.parse_datasets([data])
    ds = ev.build_dataset(spec, 16, 3)
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
    aug = ev.load_score(unet_path, "digits32", score_flags, "linear", "folder", 3)
    cfg = ev.EvalConfig(batch_size=4, dda_max_images=2, de_times=(0, 300), dda_steps=10, dda_depth=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the command's --device auto
    for cname, path in (("a", a), ("second", b)):
        r = json.loads((out / f"{cname}__data.json").read_text())
        want = _expected_counts(tc.load_classifier(path, dev), aug.to(dev), spec, x.to(dev), y.to(dev), cfg)
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
    data, other = _folder(tmp_path / "d1" / "data"), _folder(tmp_path / "d2" / "data", seed=3, invert=True)
    a, b = _checkpoint(tmp_path / "a.pt", seed=0, fit=data), _checkpoint(tmp_path / "b.pt", seed=1)
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
    fresh = ev.run([("c", tc.load_classifier(b))], None, ev.parse_datasets([data]),
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
    spec = ev.parse_datasets([data])[0]
    assert cfg.pair_settings("DE", "c", spec) != ev.EvalConfig(batch_size=8).pair_settings("DE", "c", spec)
    assert cfg.pair_settings("Default", "c", spec) == ev.EvalConfig(batch_size=8).pair_settings("Default", "c", spec)


def test_evaluate_refuses_what_would_fail_later_in_one_line(tmp_path, capsys):
    """--out naming a file, and an image size the score model cannot halve, are one line each; a file in --out
    that is valid JSON but not a result is recomputed, not trusted."""
    ck = _checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
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
    a = _checkpoint(tmp_path / "a.pt")
    with pytest.raises(ev.EvalError, match="also as file names"):
        ev.parse_classifiers([f"a b={a}", f"a_b={a}"])


def test_image_size_follows_the_classifiers(tmp_path, capsys):
    """Without --image-size the digits are made at the size the classifier was trained at (its checkpoint's
    args), not at 32; OOD folders do not change it; classifiers trained at different sizes need --image-size."""
    def ck(path, size, data="digits"):
        p = _checkpoint(path, num_classes=10, in_chans=1)
        c = torch.load(p, weights_only=True)
        c["args"] = {"data": data, "image_size": size}
        torch.save(c, p)
        return p

    c16, c24, cdef = ck(tmp_path / "c16.pt", 16), ck(tmp_path / "c24.pt", 24), ck(tmp_path / "cd.pt", None)
    assert tc.load_classifier(c16).trained_image_size == 16 and tc.load_classifier(cdef).trained_image_size == 32
    ood = _folder(tmp_path / "ood")
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


def test_ood_feature_scores_are_dk_ood_on_the_penultimate_features(tmp_path):
    """The command's ReAct / ASH-S / SCALE scores, recomputed here from the classifier's own pooled features and fc
    layer with dk.ood and numpy's percentile; a classifier without a linear head gets MSP / energy only."""
    data = _folder(tmp_path / "id", n=4)
    far = _folder(tmp_path / "far", n=4, seed=1, invert=True)
    clf = tc.load_classifier(_checkpoint(tmp_path / "a.pt", seed=0))
    odd = tc.load_classifier(_checkpoint(tmp_path / "b.pt", seed=1))
    odd.net.fc = torch.nn.Sequential(odd.net.fc, torch.nn.Identity())  # no nn.Linear head any more
    cfg = ev.EvalConfig(modes=("Default",), batch_size=3, image_size=16, progress=False, react_percentile=80,
                        ash_percentile=70, scale_percentile=60)
    logs = []
    id_spec, ood_spec = ev.parse_datasets([data, far])
    res = ev.run_ood([("a", clf), ("b", odd)], None, id_spec, [ood_spec], cfg, str(tmp_path / "out"), logs.append)
    assert any("[b] ReAct / ASH / SCALE skipped" in m and "nn.Linear" in m for m in logs)
    assert set(res["b"]["far"]) == {"Default/msp", "Default/energy"}

    def feats(spec):
        ds = ev.build_dataset(spec, 16, 3, cfg.seed)
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
        with np.load(tmp_path / "out" / "a__id.scores.npz") as zi, np.load(tmp_path / "out" / "a__far.scores.npz") as zo:
            assert res["a"]["far"][f"Default/{k}"]["auroc"] == pytest.approx(dk.ood.auroc(zi[f"Default/{k}"],
                                                                                          zo[f"Default/{k}"]))

    # another ReAct percentile: a new threshold, and the OOD set's cached react scores are not reused
    cfg.react_percentile = 50
    ev.run_ood([("a", clf)], None, id_spec, [ood_spec], cfg, str(tmp_path / "out"), logs.append)
    thr2 = float(np.percentile(f_id.numpy().ravel(), 50))
    with np.load(tmp_path / "out" / "a__far.scores.npz") as z:
        np.testing.assert_allclose(z["Default/react"], dk.ood.react(f_ood, w, b, thr2).numpy(), rtol=1e-5, atol=1e-5)


def test_feature_scores_need_logits_that_are_the_linear_head_of_the_features(tmp_path):
    clf = tc.load_classifier(_checkpoint(tmp_path / "a.pt"))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert ev.feature_head_check(clf, x) is None
    forward = clf.net.forward
    clf.net.forward = lambda v: 2 * forward(v)  # something after the head: the features would not explain it
    assert "not its linear head" in ev.feature_head_check(clf, x)
    assert "no penultimate features" in ev.feature_head_check(clf.net, x)


def test_ood_metrics_of_nan_scores_are_reported_not_raised():
    m = ev._metrics(np.array([1.0, np.nan]), np.array([0.0, 0.5]))
    assert m == {"auroc": None, "fpr95": None, "non_finite": 1}
    assert "n/a (1 NaN scores)" in ev.format_ood_table({"c": {"d": {"Default/ash": m}}})


class _NearestMean(torch.nn.Module):
    """A 10-class digits classifier with known behaviour: logits = -||x - mu_k||^2 / temp (up to a per-image
    constant) for the class means mu_k of the 32x32 grey training digits, as one 32x32 convolution (the harness
    reads the input channels from the first nn.Conv2d)."""

    def __init__(self, temp=50.0):
        super().__init__()
        x, y = dk.data.digits("train", 32, 1).tensors
        mu = torch.stack([x[y == k].mean(0) for k in range(10)])
        self.conv = torch.nn.Conv2d(1, 10, 32)
        with torch.no_grad():
            self.conv.weight.copy_(2 * mu / temp)
            self.conv.bias.copy_(-(mu ** 2).sum((1, 2, 3)) / temp)
        self.num_classes = 10

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_harness_digits_c_in_process():
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=32, in_channels=1, **TINY_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    clf = _NearestMean().eval()
    cfg = ev.EvalConfig(modes=ev.MODES, batch_size=8, max_images=8, de_times=(0, 250), image_size=32,
                        dda_steps=10, dda_depth=3, progress=False)
    specs = ev.parse_datasets(["digits", "digits-c:contrast:5"])
    res = ev.run([("c", clf)], aug, specs, cfg, log=lambda m: None)
    assert set(res["results"]["c"]) == {"digits", "digits-c:contrast:5"}
    assert res["results"]["c"]["digits"]["n"] == {"Default": 8, "DE": 8, "DDA": 8, "DDA-SE": 8}
    assert "digits-c:contrast:5" in res["table"]

    # the numbers: the same 8 images (the harness's fixed subset of its own dataset builder's images), each mode
    # recomputed with torch argmax, dk.diffaug_ensemble and dk.dda.dda_se_predict
    got = {}
    for spec in specs:
        sub = ev._subset(ev.build_dataset(spec, 32, 1, cfg.seed), 8, ev._derive(cfg.seed, "subset", spec.name))
        x = torch.stack([sub[i][0] for i in range(8)])
        y = torch.tensor([int(sub[i][1]) for i in range(8)])
        rec = res["results"]["c"][spec.name]
        got[spec.name] = want = _expected_counts(clf, aug, spec, x, y, cfg)
        assert rec["correct"] == want, spec.name
        assert rec["acc"] == {m: want[m] / 8 for m in ev.MODES}, spec.name
    # and they tell the modes apart (else the checks above could not see a mode scored as another): Default on
    # the clean set is not 4 of 8 (counting its wrong answers would show), DE differs from Default on the
    # corrupted set and DDA-SE from DDA on the clean one
    assert got["digits"]["Default"] == 6
    assert got["digits-c:contrast:5"]["DE"] != got["digits-c:contrast:5"]["Default"]
    assert got["digits"]["DDA-SE"] != got["digits"]["DDA"]


def test_evaluate_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        cli.main(["evaluate", "--classifier", str(tmp_path / "none.pt"), "--modes", "Default"])
    ck = _checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    with pytest.raises(SystemExit, match="neither a known name"):
        cli.main(["evaluate", "--classifier", ck, "--modes", "Default", "--datasets", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="unknown mode"):
        cli.main(["evaluate", "--classifier", ck, "--modes", "TTA"])
    with pytest.raises(SystemExit, match=r"--ash-percentile must be in \[0, 100\)"):
        cli.main(["evaluate", "--classifier", ck, "--modes", "Default", "--ash-percentile", "100"])
    # one in-distribution set, named: a pattern naming several, or none, is refused (it used the first one)
    data = _folder(tmp_path / "data")
    for ids, want in (("digits-c:all:3", "names 10 data sets"), (" ", "names 0 data sets")):
        with pytest.raises(SystemExit, match=want):
            cli.main(["evaluate", "--classifier", ck, "--datasets", data, "--ood-datasets", data,
                      "--id-dataset", ids, "--no-progress"])
    # a percentile that keeps none of the classifier's penultimate features is refused before any pass over the
    # data (it failed with a traceback after the whole ID pass), for ASH-S and SCALE alike
    n = tc.load_classifier(ck).linear_head().weight.shape[1]
    for flag in ("--ash-percentile", "--scale-percentile"):
        p = 100 * (n - 0.4) / n  # k = n - round(n - 0.4) = 0
        with pytest.raises(SystemExit, match=f"{flag} {p} keeps none of .*'s {n} penultimate features") as e:
            cli.main(["evaluate", "--classifier", ck, "--datasets", "digits", "--ood-datasets", data, "--modes",
                      "Default", "--image-size", "16", "--out", str(tmp_path / "o"), "--no-progress", flag, str(p)])
        assert "\n" not in str(e.value) and not os.listdir(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ plots
def test_plots_write_valid_pngs(tmp_path):
    p = plots.plot_lines({"a": ([0, 500, 999], [0.1, 1.2, 2.0]), "b": ([0, 500, 999], [0.2, 0.5, 1.0])},
                         str(tmp_path / "e.png"), title="t", xlabel="t", ylabel="H", hline=(2.3, "uniform"),
                         use_matplotlib=False)
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (640, 420)
        assert len(set(im.convert("RGB").getdata())) > 4  # something was drawn
    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=16, in_channels=1, **TINY_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    g = plots.augmentation_grid(aug, x, str(tmp_path / "g.png"))
    with Image.open(g) as im:
        assert im.format == "PNG"
        W, H = im.size
    cell = 16 * 4 + 2  # 16 px upscaled x4 (to >= 64 px) + padding
    assert W == 9 * cell + 2 and H == 16 + 3 * cell + 2  # original + 8 times; header row
    net = tc.create_classifier("test_resnet", 10, 1).eval()
    clf = lambda v: 30 * net(v)  # sharper than the untrained net's near-uniform softmax: entropies well apart
    times = (0, 999)
    ent = plots.entropy_vs_t({"c": clf}, aug, x, times=times, batch_size=2, seed=7)
    assert len(ent["c"]) == 2 and all(0 <= v <= np.log(10) + 1e-4 for v in ent["c"])
    # recomputed: the mean entropy of softmax(clf(DiffAug(x, t))) over the images, with entropy_vs_t's seeds
    # (seed + 1000 k + s for the k-th time and the batch starting at image s: here batches [0, 2) and [2, 3))
    want = []
    with torch.no_grad():
        for k, t in enumerate(times):
            x0 = torch.cat([aug(x[s:s + 2], t=t, seed=7 + 1000 * k + s) for s in (0, 2)])
            p = torch.softmax(clf(x0).float(), -1)
            want.append(float(-(p * p.log()).sum(-1).mean()))
        p_raw = torch.softmax(clf(x).float(), -1)
        h_raw = float(-(p_raw * p_raw.log()).sum(-1).mean())
    np.testing.assert_allclose(ent["c"], want, rtol=1e-5)
    assert abs(want[1] - want[0]) > 0.03  # t matters
    assert all(abs(w - h_raw) > 1e-4 * h_raw for w in want)  # the raw images are not what is classified, even at t=0


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
    ck = _checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(tc, "load_classifier", no_load)
    monkeypatch.setattr(tc, "load_score_model", no_load)
    with pytest.raises(SystemExit, match=msg) as e:
        cli.main(["evaluate", "--classifier", ck, "--no-progress", *argv])
    assert "\n" not in str(e.value)


def test_evaluate_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    ck = _checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tc, "load_classifier", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
        cli.main(["evaluate", "--classifier", ck, "--device", "cuda"])


@pytest.mark.parametrize("argv, msg", [
    (["--modes", "DE", "--de-times", "0,1000"], r"--de-times must lie in \[0, 1000\).*\[1000\]"),
    (["--modes", "DDA", "--dda-steps", "2000"], r"--dda-steps 2000: cannot take 2000 steps"),
])
def test_evaluate_options_checked_against_the_schedule_before_any_data(tmp_path, monkeypatch, argv, msg):
    ck = _checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    monkeypatch.setattr(ev, "build_dataset", lambda *a, **k: pytest.fail("a dataset was built"))
    flags = [v for k, val in TINY_FLAGS.items() for v in ("--score-flag", f"{k}={str(val).lower()}")]
    with pytest.raises(SystemExit, match=msg):
        cli.main(["evaluate", "--classifier", ck, "--score-model", "random", "--score-config", "digits32", *flags,
                  "--no-progress", *argv])


def test_subset_refuses_a_non_positive_count():
    ds = dk.data.digits("test", 8, 1)
    with pytest.raises(ev.EvalError, match="positive integer"):
        ev._subset(ds, -300, 0)
    with pytest.raises(ev.EvalError, match="positive integer"):
        ev._subset(ds, 0, 0)
    assert len(ev._subset(ds, 5, 0)) == 5 and ev._subset(ds, 10**6, 0) is ds
    cfg = ev.EvalConfig(modes=("Default",), max_images=-3, progress=False)
    with pytest.raises(ev.EvalError, match="max_images must be a positive integer"):
        ev.evaluate_dataset(_NearestMean().eval(), None, ds, ("Default",), cfg)


def test_grey_classifier_on_rgb_folder_and_cifar(tmp_path):
    """A 1-channel classifier on RGB sets (ImageFolder, CIFAR-10): the images are turned grey (torchvision's
    Grayscale luma), not fed as 3 channels to a 1-channel conv."""
    from torchvision.transforms.functional import rgb_to_grayscale

    data = _folder(tmp_path / "data")
    (spec,) = ev.parse_datasets([data])
    rgb, grey = ev.build_dataset(spec, 16, 3), ev.build_dataset(spec, 16, 1)
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
    (cspec,) = ev.parse_datasets([f"cifar10:{tmp_path}"])
    x, y = ev.build_dataset(cspec, 32, 1)[0]
    assert x.shape == (1, 32, 32) and int(y) == 3
    with pytest.raises(ev.EvalError, match="4-channel"):
        ev.build_dataset(spec, 16, 4)
    # the whole command with a 1-channel classifier on the RGB folder
    ck = _checkpoint(tmp_path / "g.pt", num_classes=2, in_chans=1)
    assert cli.main(["evaluate", "--classifier", ck, "--datasets", data, "--modes", "Default", "--image-size", "16",
                     "--no-progress"]) == 0


def test_unreadable_image_names_the_file(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    bad = tmp_path / "data" / "dog" / "9.png"
    bad.write_bytes(b"not a png")
    ck = _checkpoint(tmp_path / "a.pt")
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
    ck = _checkpoint(tmp_path / "a.pt", num_classes=10, in_chans=1)
    for path, want in ((text, "is not a train_classifier checkpoint"), (listed, "it holds a list")):
        with pytest.raises(SystemExit, match=want) as e:
            cli.main(["evaluate", "--classifier", str(path), "--modes", "Default"])
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(tc.UsageError, match="not a train_classifier checkpoint"):
        tc.load_classifier(str(text))
    for path in (text, fake_st):
        with pytest.raises(SystemExit, match="is not a score-model checkpoint") as e:
            cli.main(["evaluate", "--classifier", ck, "--modes", "DE", "--score-model", str(path), "--score-config",
                      "digits32"])
        assert str(path) in str(e.value) and "\n" not in str(e.value)


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
    note_slow, note_fast = ev._step_note(slow, every_s=3600), ev._step_note(fast, every_s=0)
    for i in range(1, 26):
        note_slow(i, 25)
        note_fast(i, 25)
    assert slow.postfix == fast.postfix == "DDA step 25/25 of this batch"
    assert slow.redraws == 0 and fast.redraws == 25
