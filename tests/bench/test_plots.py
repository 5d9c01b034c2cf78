"""dk.bench.plots: the augmentation grid and the entropy-vs-t plot."""

import numpy as np
import torch
from helpers import TINY_UNET_FLAGS
from PIL import Image

import diffaug_kernels as dk
from diffaug_kernels.bench import plots
from diffaug_kernels.models import classifier


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
    unet = dk.models.create_adm_unet(image_size=16, in_channels=1, **TINY_UNET_FLAGS).eval()
    aug = dk.DiffAug(unet, dk.NoiseSchedule.linear(1000))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    g = plots.augmentation_grid(aug, x, str(tmp_path / "g.png"))
    with Image.open(g) as im:
        assert im.format == "PNG"
        W, H = im.size
    cell = 16 * 4 + 2  # 16 px upscaled x4 (to >= 64 px) + padding
    assert W == 9 * cell + 2 and H == 16 + 3 * cell + 2  # original + 8 times; header row
    net = classifier.create_classifier("test_resnet", 10, 1).eval()

    def clf(v):
        return 30 * net(v)  # sharper than the untrained net's near-uniform softmax: entropies well apart

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
