"""`diffaug train-classifier` (commands/train_classifier.py): the DiffAug loss step,
checkpoint/resume, torchrun (gloo), clear errors.

Tiny everything: digits at 16x16, timm's test_resnet, a random ADM UNet (32 channels, one level, no
attention), batches of 8, a handful of steps, one thread per process.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import diffaug_kernels as dk
from diffaug_kernels import cli, pretrained, utils
from diffaug_kernels.commands import train_classifier as tc
from diffaug_kernels.data import digits
from diffaug_kernels.data import views as train_views
from diffaug_kernels.models import classifier


def train_main(argv):
    """The train-classifier command on an argv, as `python -m diffaug_kernels train-classifier ...` runs it."""
    return cli.main(["train-classifier", *argv])


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "python", "train_classifier.py")
TINY_UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                 in_channels=1)
TINY_ARGS = ["--data", "digits", "--image-size", "16", "--model", "test_resnet", "--batch-size", "8",
             "--limit-train", "32", "--limit-val", "16", "--threads", "1", "--log-interval", "1",
             "--score-model", "random", "--score-config", "digits32",
             "--score-flag", "num_channels=32", "--score-flag", "num_res_blocks=1", "--score-flag", "channel_mult=1",
             "--score-flag", "attention_resolutions=", "--score-flag", "resblock_updown=false"]


def _read_log(out):
    with open(os.path.join(out, tc.LOG_NAME)) as f:
        return [json.loads(line) for line in f]


def _ckpt(out):
    return torch.load(os.path.join(out, tc.CHECKPOINT_NAME), map_location="cpu", weights_only=True)


def test_one_diffaug_step_trains_the_classifier_not_the_unet():
    torch.manual_seed(0)
    # the UNet's parameters are left requiring grad: train_step itself must keep gradients out of it
    unet = dk.models.create_adm_unet(**TINY_UNET).eval()
    assert all(p.requires_grad for p in unet.parameters())
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000), t_range=(0, 1000))
    clf = classifier.create_classifier("test_resnet", num_classes=10, in_chans=1)
    x, y = digits("train", size=16, channels=1)[:8]
    assert x.shape == (8, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
    clf_before = copy.deepcopy(clf)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    gen = torch.Generator().manual_seed(1)

    # the paper's loss, computed by hand on the same x0_hat (same generator state, same classifier state)
    x0_hat, t, _ = tc.diffaug_batch(aug, x, torch.Generator().set_state(gen.get_state()))
    assert x0_hat.shape == x.shape and not torch.equal(x0_hat, x) and x0_hat.abs().max() <= 1
    ref = copy.deepcopy(clf).train()
    logits = ref(torch.cat([x, x0_hat]))
    expected = F.cross_entropy(logits[:8], y) + F.cross_entropy(logits[8:], y)

    res = tc.train_step(clf, aug, x, y, opt, gen)
    assert torch.isfinite(res["loss"]) and torch.allclose(res["loss"], expected, atol=1e-5)
    assert torch.equal(res["t"], t) and 0 <= int(t.min()) and int(t.max()) < 1000
    assert res["stats"][4] == 8
    changed = {n for (n, a), b in zip(clf.named_parameters(), clf_before.parameters()) if not torch.equal(a, b)}
    # the stem and the head move (inside residual blocks timm zero-inits the last norm, so the first step
    # leaves the convs before it alone)
    first, last = next(iter(dict(clf.named_parameters()))), list(dict(clf.named_parameters()))[-1]
    assert first in changed and last in changed and len(changed) >= 8, sorted(changed)
    assert all(p.grad is not None for p in clf.parameters()), "the classifier's loss was backpropagated"
    assert all(p.grad is None for p in unet.parameters()), "no gradient reaches the score model"
    assert not x0_hat.requires_grad and all(p.requires_grad for p in unet.parameters())
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())


def test_checkpoint_and_resume_continue_exactly(tmp_path, capsys):
    # 32 samples / batch 8 = 4 steps per epoch; 10 steps cross two epoch ends and stop mid-epoch.
    common = TINY_ARGS + ["--steps", "10", "--save-every", "2"]
    straight, chunked = str(tmp_path / "straight"), str(tmp_path / "chunked")
    assert train_main(common + ["--out", straight]) == 0
    assert train_main(common + ["--out", chunked, "--stop-at-step", "3"]) == 0
    ck = _ckpt(chunked)
    assert (ck["global_step"], ck["epoch"], ck["step_in_epoch"]) == (3, 0, 3)
    assert ck["writer_rank"] == 0 and ck["world_size"] == 1 and ck["args"]["steps"] == 10
    assert set(ck) >= {"model", "optimizer", "scheduler", "rng", "args", "epoch_stats"}
    capsys.readouterr()
    assert train_main(common + ["--out", chunked, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out

    a, b = _ckpt(straight), _ckpt(chunked)
    assert a["global_step"] == b["global_step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 10
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    log_a, log_b = strip(_read_log(straight)), strip(_read_log(chunked))
    assert log_a == log_b, "the interrupted run logs the same epochs and numbers as the straight one"
    assert [r.get("epoch") for r in log_a[:-1]] == [0, 1, 2] and log_a[-1]["final"]
    assert 0 <= log_a[-1]["val_acc_clean"] <= 1 and 0 <= log_a[-1]["val_acc_diffaug"] <= 1

    # the saved classifier loads on its own (timm keys + normalisation)
    clf = classifier.load_classifier(os.path.join(straight, tc.CHECKPOINT_NAME))
    assert clf(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_resume_of_an_older_checkpoint_does_not_warn_about_unchanged_settings(tmp_path, capsys):
    """A checkpoint written before t_range defaulted to None and before --augmix-all-ops (and with 5 epoch
    sums) resumes with the same options and no warning: the settings are compared as they act."""
    out = str(tmp_path / "run")
    common = TINY_ARGS + ["--steps", "4", "--out", out]
    assert train_main(common + ["--stop-at-step", "2"]) == 0
    path = os.path.join(out, tc.CHECKPOINT_NAME)
    ck = torch.load(path, weights_only=False)
    ck["args"]["t_range"] = [0, 1000]
    ck["args"]["augmix_config"] = "augmix-m3-w3-d1"
    del ck["args"]["augmix_all_ops"]
    ck["epoch_stats"] = ck["epoch_stats"][:5]
    torch.save(ck, path)
    capsys.readouterr()
    assert train_main(common + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "warning: resuming with different" not in text, text
    assert train_main(common + ["--resume", "--t-range", "0,500"]) == 0
    assert "different t_range" in capsys.readouterr().out


def test_torchrun_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           *TINY_ARGS, "--steps", "3", "--out", out, "--debug-noise"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("train_classifier:") == 1 and p.stdout.count("final val accuracy") == 1, p.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "debug_noise_rank0.json", "debug_noise_rank1.json",
                                       "log.jsonl"]
    ck = _ckpt(out)
    assert ck["world_size"] == 2 and ck["writer_rank"] == 0 and len(ck["rng"]) == 2 and ck["global_step"] == 3
    recs = _read_log(out)
    epochs = [r["epoch"] for r in recs if "final" not in r]
    assert epochs == sorted(set(epochs)) and sum("final" in r for r in recs) == 1, "one writer: no duplicates"
    assert recs[0]["train_n"] == 32, "epoch sums are over both ranks (2 x 2 steps x 8)"
    assert recs[-1]["val_n"] == 16, "the val shards add up to the whole val set"
    noise = [json.load(open(os.path.join(out, f"debug_noise_rank{r}.json"))) for r in (0, 1)]
    assert [n["rank"] for n in noise] == [0, 1]
    assert noise[0]["t_hash"] != noise[1]["t_hash"] and noise[0]["seed"] != noise[1]["seed"], \
        "the ranks draw different DiffAug noise"


@pytest.mark.parametrize("flag,spec", [("--data", "{}"), ("--data", "cifar10:{}"), ("--val-data", "{}")])
def test_missing_data_path_is_a_clear_error(tmp_path, flag, spec):
    spec = spec.format(tmp_path / "nope")
    argv = TINY_ARGS + ["--steps", "1", flag, spec]  # the last --data wins
    if flag == "--data":
        argv += ["--image-size", "32"]  # CIFAR-10 is 32x32
    with pytest.raises(FileNotFoundError, match="nope"):
        tc.train(tc.build_parser().parse_args(argv))
    with pytest.raises(SystemExit) as e:
        train_main(argv)
    msg = str(e.value)
    assert msg.startswith("diffaug train-classifier: error:") and "not found" in msg and "nope" in msg, msg


def test_augmix_views_and_normalisation():
    base = digits("test", size=16, channels=1)
    tf = train_views.augmix_transform("augmix-m1-w3", channels=1)
    # the AugMix code's op list: timm's ops minus the four that overlap ImageNet-C; --augmix-all-ops keeps them
    names = {op.name for op in tf.ops}
    assert len(names) == 9 and not names & set(train_views.AUGMIX_IMAGENET_C_OPS) and {"Rotate", "ShearX"} <= names
    assert set(train_views.AUGMIX_IMAGENET_C_OPS) <= {op.name for op in train_views.augmix_transform(all_ops=True).ops}
    assert (tf.width, tf.depth, tf.alpha) == (3, -1, 1.0) and all(op.magnitude == 1 for op in tf.ops)
    ds = train_views.TrainViews(base, tf)
    views, y = ds[0]
    assert set(views) == {"x", "augmix"} and y == base[0][1] and torch.equal(views["x"], base[0][0])
    a1, a2 = views["augmix"]
    for a in (a1, a2):
        assert a.shape == (1, 16, 16) and a.dtype == torch.float32 and -1 <= a.min() and a.max() <= 1
    assert not torch.equal(a1, a2), "two independent AugMix draws"
    rgb = train_views.TrainViews(digits("test", size=16, channels=3), train_views.augmix_transform(channels=3))
    assert rgb[0][0]["augmix"][0].shape == (3, 16, 16)
    with pytest.raises(utils.UsageError, match="--augmix-config"):
        train_views.augmix_transform("randaug-m9")

    mean, std = classifier.parse_normalize("imagenet", 3)
    clf = classifier.NormalizedClassifier(torch.nn.Identity(), (mean, std))
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    expected = ((x + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(clf(x), expected, atol=1e-6)
    assert classifier.parse_normalize("identity", 1) is None and len(classifier.parse_normalize("imagenet", 1)[0]) == 1
    with pytest.raises(utils.UsageError, match="--normalize"):
        classifier.parse_normalize("0.5,0.5:0.5", 3)


def _jsd(logits):
    """AugMix's consistency term by its definition: the mean over views of KL(p_view || p_mixture)."""
    probs = [F.softmax(v, dim=1) for v in logits]
    mix = torch.stack(probs).mean(0)
    return sum((p * (p.log() - mix.log())).sum(1).mean() for p in probs) / len(probs)


class _Recorder(torch.nn.Module):
    """A linear classifier that keeps the batch it was given (no batch norm: train() changes nothing)."""

    def __init__(self, c, hw, k=10):
        super().__init__()
        self.lin = torch.nn.Linear(c * hw * hw, k)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.lin(x.flatten(1))


def test_augmix_step_is_the_authors_objective():
    """--augmix with DiffAug (the authors' diffaugmix.py): one batch [x, augmix 1, augmix 2, DiffAug(x_da)],
    loss = CE(x) + 12 JSD(x, augmix 1, augmix 2) + CE(x0_hat); DiffAug takes x_da, not x, when given."""
    torch.manual_seed(0)
    aug = dk.DiffAug(dk.models.create_adm_unet(**TINY_UNET).eval(), dk.NoiseSchedule.linear(1000))
    x, y = digits("train", size=16, channels=1)[:4]
    a1, a2, x_da = (torch.rand_like(x) * 2 - 1 for _ in range(3))
    clf = _Recorder(1, 16)
    ref = copy.deepcopy(clf)
    gen = torch.Generator().manual_seed(3)
    res = tc.train_step(clf, aug, x, y, torch.optim.SGD(clf.parameters(), lr=0.1), gen, x_da=x_da, augmix=[a1, a2])
    x0_hat = aug(x_da, t=res["t"], seed=res["seed"])
    assert torch.equal(clf.seen, torch.cat([x, a1, a2, x0_hat]))
    lc, l1, l2, ld = ref(clf.seen).split(4)
    jsd = _jsd([lc, l1, l2])
    expected = F.cross_entropy(lc, y) + 12 * jsd + F.cross_entropy(ld, y)
    assert jsd > 1e-4 and torch.allclose(res["loss"], expected, atol=1e-5), (res["loss"], expected)
    s = res["stats"]
    assert torch.allclose(s[5].float(), 4 * (F.cross_entropy(lc, y) + 12 * jsd).detach() - s[0].float(), atol=1e-4)
    assert torch.allclose(s[1].float(), 4 * F.cross_entropy(ld, y).detach(), atol=1e-5)

    # AugMix alone (--augmix --no-diffaug): AugMix's own objective, three views
    clf = _Recorder(1, 16)
    ref = copy.deepcopy(clf)
    res = tc.train_step(clf, None, x, y, torch.optim.SGD(clf.parameters(), lr=0.1), augmix=[a1, a2])
    lc, l1, l2 = ref(torch.cat([x, a1, a2])).split(4)
    assert torch.allclose(res["loss"], F.cross_entropy(lc, y) + 12 * _jsd([lc, l1, l2]), atol=1e-5)
    with pytest.raises(ValueError, match="two views"):
        tc.train_step(clf, None, x, y, torch.optim.SGD(clf.parameters(), lr=0.1), augmix=[a1])


def _folder(root, n=4, size=20):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(root, "train", c))
        for i in range(n):
            px = (torch.rand(size, size + 6, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(os.path.join(root, "train", c, f"{i}.png"))
    return str(root)


def test_folder_training_feeds_diffaug_the_centre_crop(tmp_path):
    """ImageFolder training data as the authors' scripts make it: x is a random resized crop + flip, DiffAug's
    x_da the resize + centre crop (the evaluation transform) of the same image; --no-diffaug leaves x_da out."""
    root = _folder(tmp_path / "imgs")
    args = tc.build_parser().parse_args(["--data", root, "--image-size", "16", "--no-val"])
    train, _, channels, size, k = tc.build_datasets(args)
    centre = dk.data.image_folder(os.path.join(root, "train"), 16, train=False)
    assert (channels, size, k, len(train)) == (3, 16, 2, 8) and isinstance(train, train_views.TrainViews)
    views, y = train[5]
    assert set(views) == {"x", "x_da"} and y == centre[5][1]
    assert torch.equal(views["x_da"], centre[5][0]) and views["x"].shape == (3, 16, 16)
    assert not torch.equal(views["x"], views["x_da"]), "the clean view is a random crop"
    plain = tc.build_datasets(tc.build_parser().parse_args(["--data", root, "--image-size", "16", "--no-val",
                                                            "--no-diffaug"]))[0]
    assert plain[5][0].shape == (3, 16, 16)  # a plain (x, y) dataset
    both = tc.build_datasets(tc.build_parser().parse_args(["--data", root, "--image-size", "16", "--no-val",
                                                           "--augmix"]))[0]
    assert set(both[0][0]) == {"x", "x_da", "augmix"}


def test_augmix_training_run_on_a_folder(tmp_path):
    """The whole command with --augmix and DiffAug on an ImageFolder tree: the loader's dict batches reach
    train_step, and the log has the JSD term."""
    root = _folder(tmp_path / "imgs")
    out = str(tmp_path / "run")
    unet = ["--score-model", "random", "--score-config", "digits32", "--score-flag", "num_channels=32",
            "--score-flag", "num_res_blocks=1", "--score-flag", "channel_mult=1", "--score-flag",
            "attention_resolutions=", "--score-flag", "in_channels=3", "--score-flag", "image_size=16"]
    assert train_main(["--data", root, "--image-size", "16", "--model", "test_resnet", "--batch-size", "4",
                    "--steps", "2", "--no-val", "--threads", "1", "--workers", "0", "--augmix", "--out", out,
                    *unet]) == 0
    rec = _read_log(out)[0]
    assert rec["train_n"] == 8 and rec["train_loss_jsd"] > 0
    assert rec["train_loss"] == pytest.approx(rec["train_loss_clean"] + rec["train_loss_diffaug"]
                                              + rec["train_loss_jsd"])


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    """load_classifier, --resume and a score-model file that is not a checkpoint: a UsageError naming the file
    (torch's weights-only unpickler alone says KeyError: 101)."""
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"\x80\x02garbage")
    broken = tmp_path / "broken.pt"
    torch.save({"format": classifier.CHECKPOINT_FORMAT, "model_name": "test_resnet"}, broken)
    with pytest.raises(utils.UsageError, match=r"notes.pt is not a train_classifier checkpoint \(neither"):
        classifier.load_classifier(str(text))
    with pytest.raises(utils.UsageError, match=r"garbled.pt is not a train_classifier checkpoint "
                                               r"\(torch.load\(weights_only=True\) refused it: "):
        classifier.load_classifier(str(garbled))
    with pytest.raises(utils.UsageError, match=r"broken.pt is a broken train_classifier checkpoint \(missing entry"):
        classifier.load_classifier(str(broken))
    with pytest.raises(utils.UsageError, match="notes.pt is not a score-model checkpoint"):
        pretrained.resolve_score_model(str(text), "digits")
    with pytest.raises(utils.UsageError, match=r"garbled.pt is not a guided-diffusion checkpoint \(torch.load"):
        pretrained.resolve_score_model(str(garbled), "digits")
    with pytest.raises(SystemExit) as e:
        train_main(TINY_ARGS + ["--steps", "1", "--resume", str(text), "--out", str(tmp_path / "o")])
    assert "notes.pt is not a train_classifier checkpoint" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra, msg", [
    (["--t-range", "5,2000"], "reaches past the score model's schedule"),
    (["--t-range", "9,3"], "0 <= lo < hi"),
    (["--backend", "gpu"], "invalid choice: 'gpu'"),
    (["--lr", "-1"], "--lr: must be a finite number > 0"),
    (["--min-lr", "nan"], "--min-lr: must be a finite number >= 0"),
])
def test_bad_options_are_one_line_in_a_subprocess(tmp_path, extra, msg):
    """What a user types wrong is one line on stderr and a non-zero exit, never a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "diffaug_kernels", "train-classifier", *TINY_ARGS, "--steps", "1",
                        "--out", str(tmp_path / "o"), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_resume_with_another_model_is_one_line(tmp_path):
    """A checkpoint of another architecture is refused before its state_dict is loaded into the wrong network."""
    out = str(tmp_path / "o")
    assert train_main(TINY_ARGS + ["--steps", "1", "--out", out]) == 0
    with pytest.raises(SystemExit) as e:
        train_main(TINY_ARGS + ["--steps", "2", "--out", out, "--resume", "--model", "resnet10t"])
    assert "holds a test_resnet" in str(e.value) and "resnet10t" in str(e.value) and "\n" not in str(e.value)


def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path):
    """A run that goes on past its last checkpoint and is resumed from it trains those steps again: log.jsonl keeps
    one record per step, the new ones."""
    import shutil

    common = TINY_ARGS + ["--steps", "10", "--save-every", "100", "--out", str(tmp_path / "o")]
    assert train_main(common + ["--stop-at-step", "4"]) == 0
    shutil.copy(tmp_path / "o" / tc.CHECKPOINT_NAME, tmp_path / "at4.pt")
    assert train_main(common + ["--resume"]) == 0  # on to step 10, logging steps 8 and 10
    shutil.copy(tmp_path / "at4.pt", tmp_path / "o" / tc.CHECKPOINT_NAME)  # as if the later saves were lost
    assert train_main(common + ["--resume"]) == 0
    straight = TINY_ARGS + ["--steps", "10", "--save-every", "100", "--out", str(tmp_path / "s")]
    assert train_main(straight) == 0
    steps = [r["step"] for r in _read_log(str(tmp_path / "o")) if "step" in r]
    assert steps == [r["step"] for r in _read_log(str(tmp_path / "s")) if "step" in r], steps  # as if unbroken

