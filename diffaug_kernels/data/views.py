"""The views of a training image that the classifier recipe trains on: the clean view, DiffAug's input, and two
AugMix draws (timm's AugMix) for the Jensen-Shannon loss."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..utils import UsageError

# The AugMix op list of the AugMix paper's code (google-research/augmix, `augmentations`), which the DiffAug
# authors' AugMix+DiffAug script uses: timm's AugMix ops without the four that overlap ImageNet-C's corruptions
# (colour, contrast, brightness, sharpness); --augmix-all-ops keeps them (that code's --all-ops).
AUGMIX_IMAGENET_C_OPS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")


def augmix_transform(config: str = "augmix-m1-w3", channels: int = 3, all_ops: bool = False):
    """timm's AugMix (augment_and_mix_transform: PIL image -> PIL image). The default config is the AugMix
    paper's code defaults that the DiffAug authors train with: severity 1 (timm magnitude 1, drawn uniformly
    per op), width 3, depth 1-3 at random, Dirichlet/Beta(1); without all_ops, the ImageNet-C-overlapping ops
    are left out. The fill colour of geometric ops is timm's ImageNet mean for RGB, black (the digits
    background) for grey."""
    from timm.data.auto_augment import augment_and_mix_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN

    fill = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN) if channels == 3 else 0
    try:
        tf = augment_and_mix_transform(config, dict(img_mean=fill))
    except (AssertionError, ValueError) as e:
        raise UsageError(f"--augmix-config {config!r} is not a timm AugMix config "
                         f"(like augmix-m1-w3, augmix-m3-w3-d1): {e}") from None
    if not all_ops:
        tf.ops = [op for op in tf.ops if op.name not in AUGMIX_IMAGENET_C_OPS]
    return tf


def _augmix_tensor(tf, x: Tensor) -> Tensor:
    """AugMix of a [C, H, W] image in [-1, 1]: -> uint8 PIL (lossless for 8-bit sources) -> tf -> [-1, 1]."""
    from PIL import Image

    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = Image.fromarray(u8[0].numpy(), "L") if u8.shape[0] == 1 else Image.fromarray(
        u8.permute(1, 2, 0).numpy(), "RGB")
    out = torch.from_numpy(np.asarray(tf(img), dtype=np.uint8).copy())
    out = out[None] if out.dim() == 2 else out.permute(2, 0, 1)
    return out.float() / 127.5 - 1


class TrainViews(Dataset):
    """The views of each training image that train_step takes, as the DiffAug authors' scripts build them:
    ({"x": the clean (randomly cropped) view, "x_da": DiffAug's input, "augmix": (two independent AugMix
    draws of x)}, label). x_da is there when the base dataset yields (crop, centre crop) pairs (ImageFolder
    trees with centre_view=True); without it DiffAug takes x. "augmix" is there when augmix is a transform."""

    def __init__(self, base: Dataset, augmix=None):
        self.base, self.augmix = base, augmix

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        views = {}
        if isinstance(x, (tuple, list)):
            x, views["x_da"] = x
        views["x"] = x
        if self.augmix is not None:
            views["augmix"] = (_augmix_tensor(self.augmix, x), _augmix_tensor(self.augmix, x))
        return views, y
