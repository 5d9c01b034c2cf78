"""`diffaug sample` (commands/sample.py): its samples.npz is dk.sampling's output for the same per-batch Philox keys,
quantised as guided-diffusion's sample scripts do; guidance by a train-guidance checkpoint changes the images and
writes the labels; the grid has a row per label; errors are one line. A tiny 16x16 score export."""
import numpy as np
import pytest
import torch
from helpers import assert_one_line_failure, cli_subprocess
from PIL import Image

import diffaug_kernels as dk
from diffaug_kernels import cli, pretrained
from diffaug_kernels.commands import train_guidance
from diffaug_kernels.models import ADMConfig, create_adm_unet, load_guidance_classifier
from diffaug_kernels.models.score import export_safetensors
from diffaug_kernels.robustness import stream_seed


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny score export, and a noisy and a DA guidance classifier trained 2 steps on 16x16 digits with it."""
    d = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    cfg = ADMConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                    in_channels=1)
    score = export_safetensors(create_adm_unet(**cfg), str(d / "tiny.safetensors"), cfg, "linear", 1000,
                               dtype="float32")
    out = {"score": str(score)}
    for kind in ("noisy", "da"):
        s = train_guidance.train(kind=kind, score_model=str(score), image_size=16, channel_mult="1,2",
                                 classifier_attention_resolutions="", steps=2, batch_size=4, eval_times=(),
                                 out=str(d / kind), progress=False)
        out[kind] = s["checkpoint"]
    return out


def quantise(x):
    """guided-diffusion's image_sample.py: ((x + 1) * 127.5).clamp(0, 255).to(uint8), NCHW -> NHWC."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def expected(score_path, sampler, steps, num, batch, seed=0, classifier=None, y=None, scale=1.0, eta=0.0,
             dtype=None):
    """What the command should write, from dk.sampling called here batch by batch."""
    model, sched = pretrained.load_score_model(score_path)
    chunks = []
    for b, s in enumerate(range(0, num, batch)):
        n, key = min(batch, num - s), stream_seed(seed, "sample", b)
        kw = dict(classifier=classifier, y=None if y is None else y[s:s + n], classifier_scale=scale, dtype=dtype)
        if sampler == "ddim":
            x_T = dk.philox_normal((n, 1, 16, 16), key, 0)
            x = dk.sampling.ddim_sample(model, sched, x_T, steps, eta=eta, seed=key, **kw)
        else:
            x = dk.sampling.ddpm_sample(model, sched, (n, 1, 16, 16), steps, seed=key, **kw)
        chunks.append(quantise(x))
    return np.concatenate(chunks)


def _sample(files, out, *argv):
    assert cli.main(["sample", "--score-model", files["score"], "--out", str(out), "--no-progress", *argv]) == 0
    return np.load(out / "samples.npz")


@pytest.mark.parametrize("sampler,eta,dtype", [("ddim", 0.0, "float32"), ("ddim", 0.5, "float32"),
                                               ("ddpm", 0.0, "float32"), ("ddim", 0.0, "bfloat16")])
def test_unguided_npz_is_dk_sampling(files, tmp_path, sampler, eta, dtype):
    got = _sample(files, tmp_path, "--sampler", sampler, "--steps", "3", "--num", "5", "--batch", "3",
                  "--eta", str(eta), "--seed", "7", "--dtype", dtype)
    assert got.files == ["arr_0"] and got["arr_0"].dtype == np.uint8 and got["arr_0"].shape == (5, 16, 16, 1)
    want = expected(files["score"], sampler, 3, 5, 3, seed=7, eta=eta,
                    dtype=None if dtype == "float32" else getattr(torch, dtype))
    np.testing.assert_array_equal(got["arr_0"], want)
    assert len(np.unique(got["arr_0"])) > 2
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "sample.json").is_file()


@pytest.mark.parametrize("kind,sampler", [("noisy", "ddim"), ("da", "ddpm")])
def test_guided_npz_is_dk_sampling_and_differs(files, tmp_path, kind, sampler):
    args = ["--sampler", sampler, "--steps", "3", "--num", "5", "--batch", "3"]
    got = _sample(files, tmp_path / "g", *args, "--classifier", files[kind], "--classifier-scale", "30",
                  "--labels", "0,1")
    assert got.files == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(got["arr_1"], [0, 1, 0, 1, 0])
    clf = load_guidance_classifier(files[kind])
    want = expected(files["score"], sampler, 3, 5, 3, classifier=clf, y=torch.tensor([0, 1, 0, 1, 0]), scale=30.0)
    np.testing.assert_array_equal(got["arr_0"], want)
    plain = _sample(files, tmp_path / "p", *args)["arr_0"]
    assert (got["arr_0"] != plain).mean() > 0.05
    # one row per label in the grid: two rows, against one row of 3 (and a partial one) unguided
    g, p = Image.open(tmp_path / "g" / "grid.png"), Image.open(tmp_path / "p" / "grid.png")
    assert g.height == p.height and g.width > p.width  # the labels' margin, 8 columns


def test_random_labels_are_seeded_and_in_range(files, tmp_path):
    a = _sample(files, tmp_path / "a", "--steps", "2", "--num", "6", "--batch", "6", "--classifier", files["noisy"])
    b = _sample(files, tmp_path / "b", "--steps", "2", "--num", "6", "--batch", "6", "--classifier", files["noisy"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    g = torch.Generator().manual_seed(stream_seed(0, "labels"))
    np.testing.assert_array_equal(a["arr_1"], torch.randint(0, 10, (6,), generator=g).numpy())


def test_clear_errors(files, tmp_path):
    base = ["sample", "--score-model", files["score"], "--out", str(tmp_path), "--num", "2", "--steps", "2"]
    with pytest.raises(SystemExit, match="give --classifier"):
        cli.main([*base, "--labels", "1"])
    with pytest.raises(SystemExit, match=r"--labels \[12\] lie outside the classifier's classes 0..9"):
        cli.main([*base, "--classifier", files["noisy"], "--labels", "1,12"])
    with pytest.raises(SystemExit, match="--steps ddim3000: .*no integer stride"):
        cli.main([*base[:-1], "ddim3000"])
    with pytest.raises(SystemExit, match="the classifier takes 16x16 images of 1 channels, not 32x32x1"):
        cli.main([*base, "--classifier", files["noisy"], "--image-size", "32"])
    with pytest.raises(SystemExit, match="guidance classifier checkpoint not found"):
        cli.main([*base, "--classifier", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit, match="--eta is DDIM's"):
        cli.main([*base, "--sampler", "ddpm", "--eta", "0.5"])
    assert not (tmp_path / "samples.npz").exists()
    rc, _, err = cli_subprocess(*base, "--classifier", files["score"])
    assert_one_line_failure(rc, err, "diffaug sample", "is not a train-guidance checkpoint")
