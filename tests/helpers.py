"""Shared strategies, comparison rules and stand-in models and files of the tests."""
import os
import subprocess
import sys

import numpy as np
import torch
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import robustness as ev
from diffaug_kernels.models import classifier

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]


@st.composite
def image_batches(draw, max_b=4, max_c=4, max_hw=11, layouts=LAYOUTS, lo=-1.0, hi=1.0):
    """A random [B, C, H, W] tensor in one of several memory layouts (values are fresh each draw)."""
    B, C = draw(st.integers(1, max_b)), draw(st.integers(1, max_c))
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    layout = draw(st.sampled_from(layouts))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return make_layout(x.to(dtype), layout), layout


def make_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense but permuted: H and W swapped in memory
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "strided":  # not dense: every other column of a wider tensor
        wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Size of one unit in the last place of dtype at |x| (normal range; subnormals floored)."""
    m = MANTISSA[dtype]
    e = torch.floor(torch.log2(x.abs().double().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - m)


def assert_matches(out, ref, atol32=1e-5, mag=None):
    """float32/64: |out - ref| <= atol32 (+ 4 float32 ulps of `mag`, the size of the summed terms when a
    formula cancels large terms); float16/bfloat16: within one ulp of the output dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert not torch.isnan(out).any(), "NaN in output (an element was not written)"
    o, r = out.double(), ref.double()
    tol = torch.full_like(r, atol32)
    if mag is not None:
        tol = tol + 4 * 2.0**-23 * mag.double()
    if out.dtype in MANTISSA:
        tol = tol + ulp(r, out.dtype) * 1.0001
    bad = (o - r).abs() > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements differ; worst "
                           f"{float(((o - r).abs() - tol).max()):.3g} beyond tolerance")


def tweedie_magnitude(schedule, x, m, t, prediction, normalize, C):
    """|A x| + |B m| (times the normalisation scale): the size of the terms a float32 tweedie result is rounded
    at, for assert_matches's mag (on t's device)."""
    a, b = schedule.x0_coefficients(prediction, device=t.device, dtype=torch.float64)
    a, b = a[t].view(-1, 1, 1, 1), b[t].view(-1, 1, 1, 1)
    mag = (a * x.double()).abs() + (b * m[:, :C].double()).abs()
    if normalize is not None:
        mag = mag / torch.tensor(normalize[1], dtype=torch.float64, device=t.device).view(1, -1, 1, 1)
    return mag


class TinyEps(nn.Module):
    """A stand-in score model: a conv over x_t with a time embedding, learned-sigma style 2C outputs."""

    def __init__(self, C=3, learn_sigma=True):
        super().__init__()
        self.conv = nn.Conv2d(C, 2 * C if learn_sigma else C, 3, padding=1)
        self.temb = nn.Embedding(1000, 2 * C if learn_sigma else C)

    def forward(self, x, t, y=None):
        h = self.conv(x) + self.temb(t)[:, :, None, None]
        return h if y is None else h + y[:, None, None, None].to(h.dtype)


TINY_UNET_FLAGS = dict(num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                  resblock_updown=False)


# ------------------------------------------------------------------------------------------------ the harness
def image_folder_tree(root, n=3, seed=0, invert=False):
    rng = np.random.RandomState(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            a = (rng.rand(20, 20, 3) * 255).astype(np.uint8)
            if cls == "dog":
                a = a // 2
            Image.fromarray(255 - a if invert else a).save(root / cls / f"{i}.png")
    return str(root)


def classifier_checkpoint(path, num_classes=2, in_chans=3, seed=0, fit=None):
    """A random test_resnet checkpoint; fit=ROOT (a 2-class image_folder_tree tree) sets its final layer to separate the
    two classes' mean penultimate features at 16x16, so it is right on every clean image of ROOT (and its
    accuracy changes when the images do: the modes' counts then differ)."""
    torch.manual_seed(seed)
    clf = classifier.create_classifier("test_resnet", num_classes, in_chans)
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
    torch.save({"format": classifier.CHECKPOINT_FORMAT, "model": clf.net.state_dict(), "model_name": "test_resnet",
                "num_classes": num_classes, "in_chans": in_chans, "normalize": None}, path)
    return str(path)


def expected_counts(clf, aug, spec, x, y, cfg):
    """Each mode's number of right answers, recomputed with the package's own prediction functions (torch argmax,
    dk.diffaug_ensemble, dk.dda.dda_se_predict) and the harness's seeding: batches of cfg.batch_size, per-batch
    seeds _derive(seed, 'de' | 'dda', dataset, batch), DDA on the fixed random subset _derive(seed, 'dda-subset',
    dataset) of cfg.dda_max_images images."""
    n = len(y)
    mask = torch.zeros(n, dtype=torch.bool)
    cap = n if cfg.dda_max_images is None else min(cfg.dda_max_images, n)
    g = torch.Generator().manual_seed(ev.stream_seed(cfg.seed, "dda-subset", spec.name))
    mask[torch.randperm(n, generator=g)[:cap]] = True
    got = dict.fromkeys(ev.MODES, 0)
    for b, s in enumerate(range(0, n, cfg.batch_size)):
        xb, yb, m = x[s:s + cfg.batch_size], y[s:s + cfg.batch_size], mask[s:s + cfg.batch_size]
        with torch.no_grad():
            got["Default"] += int((clf(xb).argmax(1) == yb).sum())
            p = dk.diffaug_ensemble(clf, aug, xb, times=cfg.de_times, seed=ev.stream_seed(cfg.seed, "de", spec.name, b),
                                    max_batch=cfg.batch_size)
            got["DE"] += int((p.argmax(1) == yb).sum())
        if m.any():
            se, p_a, _ = dk.dda.dda_se_predict(clf, aug, aug.schedule, xb[m], return_components=True,
                                               steps=cfg.dda_steps, depth=cfg.dda_depth, down_factor=cfg.dda_down,
                                               guidance_scale=ev.default_dda_scale(xb.shape),
                                               seed=ev.stream_seed(cfg.seed, "dda", spec.name, b),
                                               prediction=aug.prediction, clip=aug.clip)
            got["DDA"] += int((p_a.argmax(1) == yb[m]).sum())
            got["DDA-SE"] += int((se.argmax(1) == yb[m]).sum())
    return got


class NearestMean(torch.nn.Module):
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


class CodeMarker:
    """Unpickling this runs code (open(path, "w")): the file it leaves shows that a loader ran code from data."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def ncm_checkpoint(path, size=8):
    """A 10-class grey timm test_resnet whose last layer picks the nearest class mean of its size x size training
    digits' features: right on some test digits, not all, and its answers on noisy ones vary with the noise."""
    torch.manual_seed(0)
    clf = classifier.create_classifier("test_resnet", 10, 1).eval()
    x, y = dk.data.digits("train", size, 1).tensors
    with torch.no_grad():
        f = clf.penultimate(x)
        m = torch.stack([f[y == k].mean(0) for k in range(10)])
        clf.net.fc.weight.copy_(m)
        clf.net.fc.bias.copy_(-(m ** 2).sum(1) / 2)
    torch.save({"format": classifier.CHECKPOINT_FORMAT, "model": clf.net.state_dict(), "model_name": "test_resnet",
                "num_classes": 10, "in_chans": 1, "normalize": None}, path)
    return str(path)


# ------------------------------------------------------------------------------------------ the command line
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli_subprocess(*argv, timeout=300):
    """`python -m diffaug_kernels ARGV` in a fresh process, as a user runs it: (exit status, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "diffaug_kernels", *argv], capture_output=True, text=True,
                       env=CLI_ENV, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def torchrun_cmd(*args):
    """`torchrun --nproc_per_node=2 -m diffaug_kernels ARGS` (gloo on the CPU); --max is written --max-images, as
    under torchrun it must be."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "diffaug_kernels", *["--max-images" if a == "--max" else a for a in args]]


def torchrun(*args, timeout=180):
    """(exit status, stdout, stderr) of torchrun_cmd(ARGS)."""
    r = subprocess.run(torchrun_cmd(*args), capture_output=True, text=True, env=CLI_ENV, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_failure(rc, stderr, *fragments):
    """A failed command: non-zero status, no traceback, and its last stderr line says all of fragments."""
    assert rc != 0 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert all(f in last for f in fragments), stderr[-3000:]
