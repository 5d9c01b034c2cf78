"""train-classifier's data recipes (data/recipes.py): +Synth (--extra-data), DeepAugment (--deepaugment, with and
without --augmix) and fine-tuning (--init-from), on digits stand-ins: a small ImageFolder of scikit-learn digits
written here, and distorted copies of it with the same file names."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffaug_kernels import cli
from diffaug_kernels.commands import train_classifier as tc
from diffaug_kernels.data import recipes
from diffaug_kernels.data import views as train_views
from diffaug_kernels.models import classifier
from diffaug_kernels.utils import UsageError

CLASSES = ("0", "1", "2")
UNET = ["--score-model", "random", "--score-config", "digits32", "--score-flag", "num_channels=32",
        "--score-flag", "num_res_blocks=1", "--score-flag", "channel_mult=1", "--score-flag",
        "attention_resolutions=", "--score-flag", "image_size=16"]
RUN = ["--image-size", "16", "--model", "test_resnet", "--batch-size", "4", "--steps", "2", "--no-val",
       "--threads", "1", "--workers", "0", "--log-interval", "1"]


def digits_folder(root, classes=CLASSES, per_class=3, offset=0):
    """scikit-learn digits as an RGB ImageFolder of 20x20 PNGs: root/<digit>/<i>.png."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        os.makedirs(os.path.join(root, c))
        idx = np.flatnonzero(d.target == int(c))[offset:offset + per_class]
        for i, j in enumerate(idx):
            a = np.kron(d.images[j] / 16 * 255, np.ones((2, 2)))  # 16x16, then 2 pixels of border
            a = np.pad(a, 2).astype(np.uint8)
            Image.fromarray(np.stack([a] * 3, -1)).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


def distorted_copy(src, dst, fn, ext=".png"):
    """Every image of src through fn, at the same relative path in dst (the extension may change)."""
    for dirpath, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            out = os.path.join(dst, os.path.splitext(rel)[0] + ext)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            Image.fromarray(fn(np.asarray(Image.open(os.path.join(dirpath, name))))).save(out)
    return str(dst)


def invert(a):
    return 255 - a


def shift(a):
    return np.roll(a, 3, axis=1)


@pytest.fixture
def stand_ins(tmp_path):
    train = digits_folder(tmp_path / "digits")
    return {"train": train, "edsr": distorted_copy(train, tmp_path / "edsr", invert),
            "cae": distorted_copy(train, tmp_path / "cae", shift, ext=".jpg"), "tmp": tmp_path}


def parse(*argv):
    return tc.build_parser().parse_args(list(argv))


def train_main(argv):
    return cli.main(["train-classifier", *argv])


# ------------------------------------------------------------------------------------------------ +Synth
def test_extra_data_joins_the_training_set_by_class_name(stand_ins, tmp_path):
    # the synthetic set has two of the three classes, listed in another order than the training set's indices
    synth = digits_folder(tmp_path / "synth", classes=("2", "0"), per_class=2, offset=5)
    train, _, channels, size, k = tc.build_datasets(parse("--data", stand_ins["train"], "--image-size", "16",
                                                          "--no-val", "--extra-data", synth))
    assert (channels, size, k, len(train)) == (3, 16, 3, 9 + 4) and isinstance(train, train_views.TrainViews)
    union = train.base
    extra = union.datasets[1]
    for j, (path, _) in enumerate(extra.samples):  # the label is the training set's index of the folder's name
        views, y = train[9 + j]
        assert set(views) == {"x", "x_da"} and y == CLASSES.index(os.path.basename(os.path.dirname(path)))
        assert type(y) is int
    sampler = tc.EpochSampler(train, 0, 1, seed=0)
    sampler.set_epoch(0)
    assert sorted(sampler) == list(range(13))  # one uniform shuffle of the union
    # with the digits (no class folders) the names are "0" .. "9", and the images turn grey at the data's size
    dig, _, channels, _, k = tc.build_datasets(parse("--data", "digits", "--image-size", "16", "--no-val",
                                                     "--limit-train", "5", "--extra-data", synth))
    assert (channels, k, len(dig)) == (1, 10, 9)
    x, y = dig[5]
    assert x.shape == (1, 16, 16) and x.min() >= -1 and x.max() <= 1 and y in (0, 2)


def test_extra_data_run(stand_ins, tmp_path):
    synth = digits_folder(tmp_path / "synth", classes=CLASSES, per_class=1, offset=7)
    out = str(tmp_path / "run")
    assert train_main(["--data", stand_ins["train"], "--extra-data", synth, "--out", out, *RUN, *UNET]) == 0
    assert os.path.isfile(os.path.join(out, tc.CHECKPOINT_NAME))
    ck = torch.load(os.path.join(out, tc.CHECKPOINT_NAME), map_location="cpu", weights_only=True)
    assert ck["args"]["extra_data"] == synth


def test_extra_data_errors_name_the_folders(stand_ins, tmp_path):
    odd = digits_folder(tmp_path / "odd", classes=("0", "7"), per_class=1)
    with pytest.raises(UsageError, match=r"(?s)odd.*\['7'\].*digits"):
        tc.build_datasets(parse("--data", stand_ins["train"], "--no-val", "--extra-data", odd))
    with pytest.raises(SystemExit, match=r"--extra-data folder not found: .*nowhere"):
        train_main(["--data", stand_ins["train"], "--extra-data", str(tmp_path / "nowhere"), *RUN, *UNET])
    (tmp_path / "flat").mkdir()
    with pytest.raises(UsageError, match=r"flat is not an ImageFolder tree"):
        tc.build_datasets(parse("--data", stand_ins["train"], "--no-val", "--extra-data", str(tmp_path / "flat")))


# ------------------------------------------------------------------------------------------------ DeepAugment
def test_deepaugment_views_pair_by_relative_path(stand_ins):
    args = parse("--data", stand_ins["train"], "--image-size", "16", "--no-val",
                 "--deepaugment", f"{stand_ins['edsr']},{stand_ins['cae']}")
    train, _, _, _, k = tc.build_datasets(args)
    assert isinstance(train, recipes.DeepAugmentViews) and len(train) == 9 and k == 3
    for j, (path, y) in enumerate(train.folder.samples):
        rel = os.path.splitext(os.path.relpath(path, stand_ins["train"]))[0]
        assert os.path.relpath(train.partners[0][j], stand_ins["edsr"]) == rel + ".png"
        assert os.path.relpath(train.partners[1][j], stand_ins["cae"]) == rel + ".jpg"
        views, label = train[j]
        assert set(views) == {"x", "deepaugment", "x_da"} and label == y and len(views["deepaugment"]) == 2
    # the EDSR view is the inverted image: its centre crop is the negative of the clean one's (ToTensor of 255 - a)
    centre = train.centre
    clean, edsr = (centre(train.folder.loader(p)) for p in (train.folder.samples[4][0], train.partners[0][4]))
    torch.testing.assert_close(edsr, -clean, atol=1e-6, rtol=0)
    batch = torch.utils.data.default_collate([train[0], train[1]])
    assert [v.shape for v in batch[0]["deepaugment"]] == [(2, 3, 16, 16)] * 2


class _Linear(torch.nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 16 * 16, k)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.lin(x.flatten(1))


def test_deepaugment_step_sums_the_four_cross_entropies():
    """diffda.py: one batch [clean, EDSR, CAE, DiffAug(x_da)], loss = the sum of their four CEs."""
    import diffaug_kernels as dk

    torch.manual_seed(0)
    unet = dk.models.create_adm_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1",
                                     attention_resolutions="").eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    x, e, c, x_da = (torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(4))
    y = torch.tensor([0, 1, 2, 1])
    clf = _Linear()
    ref = copy.deepcopy(clf)
    gen = torch.Generator().manual_seed(3)
    res = tc.train_step(clf, aug, x, y, torch.optim.SGD(clf.parameters(), lr=0.1), gen, x_da=x_da,
                        deepaugment=[e, c])
    x0_hat = aug(x_da, t=res["t"], seed=res["seed"])
    assert torch.equal(clf.seen, torch.cat([x, e, c, x0_hat]))
    lx, le, lc, ld = ref(clf.seen).split(4)
    ces = [F.cross_entropy(v, y) for v in (lx, le, lc, ld)]
    torch.testing.assert_close(res["loss"], sum(ces), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["stats"][6].float(), 4 * (ces[1] + ces[2]).detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(res["stats"][1].float(), 4 * ces[3].detach(), atol=1e-4, rtol=0)


def test_deepaugment_runs_with_and_without_augmix(stand_ins):
    da = f"{stand_ins['edsr']},{stand_ins['cae']}"
    out = str(stand_ins["tmp"] / "run")
    assert train_main(["--data", stand_ins["train"], "--deepaugment", da, "--out", out, *RUN, *UNET]) == 0
    import json

    with open(os.path.join(out, tc.LOG_NAME)) as f:
        rec = json.loads(f.readline())
    assert rec["train_loss_deepaugment"] > 0
    assert rec["train_loss"] == pytest.approx(rec["train_loss_clean"] + rec["train_loss_diffaug"]
                                              + rec["train_loss_deepaugment"], rel=1e-5)
    # with --augmix (diffda_augmix.py): clean, EDSR and CAE images as one dataset three times as long
    train = tc.build_datasets(parse("--data", stand_ins["train"], "--image-size", "16", "--no-val", "--augmix",
                                    "--deepaugment", da))[0]
    assert isinstance(train, train_views.TrainViews) and isinstance(train.base, recipes.DeepAugmentSources)
    assert len(train) == 27
    views, y = train[9 + 4]  # the EDSR copy of clean image 4
    assert set(views) == {"x", "x_da", "augmix"} and y == train.base.folder.samples[4][1]
    clean = train.base.centre(train.base.folder.loader(train.base.folder.samples[4][0]))
    torch.testing.assert_close(views["x_da"], clean)  # DiffAug takes the clean image's centre crop
    out2 = str(stand_ins["tmp"] / "run-augmix")
    assert train_main(["--data", stand_ins["train"], "--deepaugment", da, "--augmix", "--out", out2, "--limit-train",
                       "4", *RUN, *UNET]) == 0


def test_deepaugment_errors_come_before_training(stand_ins):
    tmp = stand_ins["tmp"]
    gap = distorted_copy(stand_ins["train"], tmp / "gap", invert)
    os.remove(os.path.join(gap, "1", "2.png"))
    out = str(tmp / "never")
    with pytest.raises(SystemExit, match=r"gap: 1 of the 9 training images .* no counterpart .*1/2\.\*"):
        train_main(["--data", stand_ins["train"], "--deepaugment", f"{gap},{stand_ins['cae']}", "--out", out,
                    *RUN, *UNET])
    assert not os.path.exists(out)
    surplus = distorted_copy(stand_ins["train"], tmp / "surplus", invert)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(os.path.join(surplus, "2", "99.png"))
    with pytest.raises(UsageError, match=r"surplus: 1 images have no training image .*99\.png"):
        tc.build_datasets(parse("--data", stand_ins["train"], "--no-val", "--deepaugment",
                                f"{stand_ins['edsr']},{surplus}"))
    with pytest.raises(UsageError, match="two folders"):
        tc.build_datasets(parse("--data", stand_ins["train"], "--no-val", "--deepaugment", stand_ins["edsr"]))
    with pytest.raises(UsageError, match=r"--deepaugment folder not found: .*absent"):
        tc.build_datasets(parse("--data", stand_ins["train"], "--no-val", "--deepaugment",
                                f"{stand_ins['edsr']},{tmp / 'absent'}"))
    with pytest.raises(UsageError, match="must be an ImageFolder tree"):
        tc.build_datasets(parse("--data", "digits", "--no-val", "--deepaugment",
                                f"{stand_ins['edsr']},{stand_ins['cae']}"))
    with pytest.raises(UsageError, match="give one of them"):
        tc.build_datasets(parse("--data", stand_ins["train"], "--no-val", "--extra-data", stand_ins["edsr"],
                                "--deepaugment", f"{stand_ins['edsr']},{stand_ins['cae']}"))


# ------------------------------------------------------------------------------------------------ --init-from
def test_init_from_fine_tunes_a_checkpoint(stand_ins):
    tmp = stand_ins["tmp"]
    first = str(tmp / "first")
    assert train_main(["--data", stand_ins["train"], "--no-diffaug", "--out", first, *RUN]) == 0
    ck = torch.load(os.path.join(first, tc.CHECKPOINT_NAME), map_location="cpu", weights_only=True)
    tuned = str(tmp / "tuned")
    assert train_main(["--data", stand_ins["train"], "--no-diffaug", "--init-from",
                       os.path.join(first, tc.CHECKPOINT_NAME), "--lr", "1e-12", "--weight-decay", "0",
                       "--momentum", "0", "--out", tuned, *RUN]) == 0
    after = torch.load(os.path.join(tuned, tc.CHECKPOINT_NAME), map_location="cpu", weights_only=True)["model"]
    torch.manual_seed(0)  # the run's own initialisation (--seed 0), which --init-from replaces
    init = dict(classifier.create_classifier("test_resnet", 3, 3).net.named_parameters())
    assert any(not torch.equal(p, ck["model"][name]) for name, p in init.items())
    for name in init:  # with lr 1e-12 the fine-tuned weights are the checkpoint's
        torch.testing.assert_close(after[name], ck["model"][name], atol=1e-8, rtol=0)

    # a torchvision-style checkpoint: {"state_dict": ...} with DataParallel's "module." prefixes
    wrapped = tmp / "wrapped.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ck["model"].items()}, "epoch": 3}, wrapped)
    net = classifier.create_classifier("test_resnet", 3, 3).net
    tc.load_init_weights(net, str(wrapped), "test_resnet")
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck["model"][k])
    with pytest.raises(UsageError, match=r"wrapped\.pth\.tar does not fit the test_resnet .*of another shape"):
        tc.load_init_weights(classifier.create_classifier("test_resnet", 5, 3).net, str(wrapped), "test_resnet")
    with pytest.raises(UsageError, match="holds a test_resnet, not the --model resnet10t"):
        tc.load_init_weights(net, os.path.join(first, tc.CHECKPOINT_NAME), "resnet10t")
    torch.save({"epoch": 3}, tmp / "empty.pt")
    with pytest.raises(UsageError, match=r"empty\.pt holds no classifier state_dict"):
        tc.load_init_weights(net, str(tmp / "empty.pt"), "test_resnet")
    with pytest.raises(SystemExit, match="gone.pt"):
        train_main(["--data", stand_ins["train"], "--no-diffaug", "--init-from", str(tmp / "gone.pt"), *RUN])


# ------------------------------------------------------------------------------------------------ score models
def test_training_takes_improved_diffusion_and_diffusers_score_models(stand_ins):
    """--score-model resolution hands the loop an improved-diffusion UNet (t over its 4000 steps) and a diffusers
    folder unchanged."""
    import json

    tmp = stand_ins["tmp"]
    out = str(tmp / "improved")
    assert train_main(["--data", stand_ins["train"], "--out", out, "--debug-noise", *RUN, "--score-model", "random",
                       "--score-config", "cifar10_uncond", "--score-flag", "num_channels=32", "--score-flag",
                       "num_res_blocks=1", "--score-flag", "attention_resolutions=8"]) == 0
    with open(os.path.join(out, "debug_noise_rank0.json")) as f:
        t = json.load(f)["t"]
    assert max(t) >= 1000 and max(t) < 4000  # drawn over the model's own 4000-step schedule
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp / "pipe")
    out = str(tmp / "diffusers")
    assert train_main(["--data", stand_ins["train"], "--out", out, *RUN, "--score-model", str(tmp / "pipe")]) == 0
    ck = torch.load(os.path.join(out, tc.CHECKPOINT_NAME), map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2
