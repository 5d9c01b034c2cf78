"""Common corruptions (ImageNet-C / CIFAR-10-C style, Hendrycks & Dietterich, ICLR 2019), applied on the fly to
[-1, 1] image tensors, severities 1..5, deterministic under a seed.

Why not the maintained package: ``imagecorruptions`` (the pip package of the benchmark's code) installs, but
its functions import OpenCV, scikit-image and Wand/ImageMagick, none of which this package may depend on. So
the corruptions that need none of them are re-implemented here in torch (and PIL, which torchvision already
brings, for JPEG). Each follows the benchmark's formula on [0, 1] images with its published constants:

=================  ==========================================  =============================================
name               ImageNet-C constants (``preset="imagenet"``)  CIFAR-10-C constants (``preset="cifar"``)
=================  ==========================================  =============================================
gaussian_noise     sigma .08 .12 .18 .26 .38                     .04 .06 .08 .09 .10
shot_noise         Poisson(x * c) / c, c = 60 25 12 5 3          500 250 100 75 50
impulse_noise      salt & pepper amount .03 .06 .09 .17 .27      .01 .02 .03 .05 .07
speckle_noise      x + x * N(0, c), c = .15 .2 .35 .45 .6        .06 .1 .12 .16 .2
gaussian_blur      sigma 1 2 3 4 6                               .4 .6 .7 .8 1
defocus_blur       disk radius, alias sigma (3,.1) (4,.5)        (.3,.4) (.4,.5) (.5,.6) (1,.2) (1.5,.1)
                   (6,.5) (8,.5) (10,.5)
contrast           (x - mean) * c + mean, c = .4 .3 .2 .1 .05    .75 .5 .4 .3 .15
brightness         HSV value + c, c = .1 .2 .3 .4 .5             .05 .1 .15 .2 .3
pixelate           box down to c * size, back up: .6 .5 .4 .3    .95 .9 .85 .75 .65
                   .25
jpeg_compression   JPEG quality 25 18 15 10 7                    80 65 58 50 40
=================  ==========================================  =============================================

``preset=None`` picks "cifar" for images smaller than 64 pixels a side (CIFAR-10, the 32x32 digits) and
"imagenet" otherwise, as the two benchmarks do.

Departures from the reference code (results are close in distribution, not bit-identical): the noise comes
from torch's generator, not numpy's global one; blurs are torch convolutions with edge-replicating
(gaussian_blur, skimage's mode="nearest") or reflecting (defocus_blur, OpenCV's BORDER_REFLECT_101) padding;
the defocus alias blur is folded into one kernel; pixelate resizes with PIL's BOX both ways as the reference
does, but on float images (no 8-bit rounding in between); grey images get
brightness as value + c (for one channel HSV's value is the pixel). The reference saves corrupted images as
8-bit files (np.uint8 truncates; ImageNet-C's are JPEG at quality 85 besides); ``quantize=True`` rounds to 8
bits like them, to the nearest level (default False, except JPEG, which is 8-bit by nature).
Left out: glass/motion/zoom blur, snow, frost, fog, spatter, elastic_transform, saturate (they need OpenCV,
ImageMagick or texture files); read the released ImageNet-C / CIFAR-10-C files for those.
"""
from __future__ import annotations

import io
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corrupt_image", "CorruptedDataset", "preset_for"]

SEVERITIES = (1, 2, 3, 4, 5)

# name -> {preset: five constants}
_CONSTANTS: Dict[str, Dict[str, tuple]] = {
    "gaussian_noise": {"imagenet": (.08, .12, .18, .26, .38), "cifar": (.04, .06, .08, .09, .10)},
    "shot_noise": {"imagenet": (60, 25, 12, 5, 3), "cifar": (500, 250, 100, 75, 50)},
    "impulse_noise": {"imagenet": (.03, .06, .09, .17, .27), "cifar": (.01, .02, .03, .05, .07)},
    "speckle_noise": {"imagenet": (.15, .2, .35, .45, .6), "cifar": (.06, .1, .12, .16, .2)},
    "gaussian_blur": {"imagenet": (1, 2, 3, 4, 6), "cifar": (.4, .6, .7, .8, 1)},
    "defocus_blur": {"imagenet": ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5)),
                     "cifar": ((.3, .4), (.4, .5), (.5, .6), (1, .2), (1.5, .1))},
    "contrast": {"imagenet": (.4, .3, .2, .1, .05), "cifar": (.75, .5, .4, .3, .15)},
    "brightness": {"imagenet": (.1, .2, .3, .4, .5), "cifar": (.05, .1, .15, .2, .3)},
    "pixelate": {"imagenet": (.6, .5, .4, .3, .25), "cifar": (.95, .9, .85, .75, .65)},
    "jpeg_compression": {"imagenet": (25, 18, 15, 10, 7), "cifar": (80, 65, 58, 50, 40)},
}
PRESETS = ("imagenet", "cifar")


def preset_for(size: int) -> str:
    """The benchmark whose constants suit images of this side: 'cifar' below 64 pixels, else 'imagenet'."""
    return "cifar" if size < 64 else "imagenet"


# ------------------------------------------------------------------------------------------- helpers (on [0, 1])
def _conv_same(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Depthwise 2-D convolution of x [B, C, H, W] with one [k, k] kernel, 'same' size, padding `mode`."""
    k = kernel.shape[-1]
    p = k // 2
    C = x.shape[1]
    H, W = x.shape[-2:]
    if mode == "reflect" and p >= min(H, W):  # reflection needs pad < size: fall back to replicating the edge
        mode = "replicate"
    xp = F.pad(x, (p, p, p, p), mode=mode)
    w = kernel.to(x.dtype).expand(C, 1, k, k)
    return F.conv2d(xp, w, groups=C)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> Tensor:
    r = max(1, int(truncate * sigma + 0.5))  # scipy/skimage's radius
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The benchmark's defocus kernel: a disk of `radius` (normalised), smoothed by a Gaussian of alias_blur
    (OpenCV's 3x3 kernel for radius <= 8, else 5x5), the two folded into one kernel."""
    if radius <= 8:
        L, ksize = np.arange(-8, 8 + 1), 3
    else:
        L, ksize = np.arange(-radius, radius + 1), 5
    X, Y = np.meshgrid(L, L)
    disk = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    h = ksize // 2
    g1 = np.exp(-0.5 * (np.arange(-h, h + 1) / alias_blur) ** 2)
    g1 /= g1.sum()
    kern = torch.from_numpy(disk)[None, None]
    g = torch.from_numpy(np.outer(g1, g1))[None, None]
    out = F.conv2d(F.pad(kern, (h, h, h, h)), g)[0, 0]
    # trim all-zero borders (small radii): same result, faster convolution
    nz = torch.nonzero(out > 0)
    lo = int(min(nz[:, 0].min(), nz[:, 1].min()))
    c = out.shape[0] // 2
    r = max(c - lo, 1)
    return out[c - r:c + r + 1, c - r:c + r + 1]


def _gaussian_noise(x, c, g):
    return x + c * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _shot_noise(x, c, g):
    return torch.poisson(x.clamp_min(0) * c, generator=g) / c


def _impulse_noise(x, amount, g):
    u = torch.rand(x.shape, generator=g, dtype=x.dtype)
    salt = torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.5  # skimage's s&p: half salt, half pepper
    hit = u < amount
    return torch.where(hit, salt.to(x.dtype), x)


def _speckle_noise(x, c, g):
    return x + x * c * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _gaussian_blur(x, sigma, g):
    return _conv_same(x, _gaussian_kernel(float(sigma)), "replicate")


def _defocus_blur(x, c, g):
    return _conv_same(x, _disk_kernel(*c), "reflect")


def _contrast(x, c, g):
    mean = x.mean(dim=(2, 3), keepdim=True)  # per channel, as the reference's np.mean(x, axis=(0, 1)) on HxWxC
    return (x - mean) * c + mean


def _brightness(x, c, g):
    if x.shape[1] == 1:
        return x + c
    v = x.amax(dim=1, keepdim=True)  # HSV value; H and S fixed <=> RGB scaled by v_new / v
    v_new = (v + c).clamp(0, 1)
    safe = torch.where(v > 0, v, torch.ones_like(v))
    return torch.where(v > 0, x * (v_new / safe), v_new.expand_as(x))


def _pixelate(x, c, g):
    """PIL's BOX resize down to c * size and back up, as the reference, on 32-bit float ("F") images: no 8-bit
    rounding in between. (BOX weights input pixels by their overlap; for a non-integer factor that is not
    nearest-neighbour, which makes the severities non-monotonic.)"""
    from PIL import Image

    H, W = x.shape[-2:]
    small = (max(1, int(W * c)), max(1, int(H * c)))  # PIL sizes are (width, height)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for ch in range(x.shape[1]):
            img = Image.fromarray(x[b, ch].numpy().astype(np.float32), "F")
            img = img.resize(small, Image.BOX).resize((W, H), Image.BOX)
            out[b, ch] = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).to(x.dtype)
    return out


def _jpeg(x, quality, g):
    from PIL import Image

    out = []
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    for img in u8:
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr, "L" if img.shape[0] == 1 else "RGB").save(buf, "JPEG", quality=int(quality))
        buf.seek(0)
        dec = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.uint8).copy())
        out.append(dec[None] if dec.dim() == 2 else dec.permute(2, 0, 1))
    return torch.stack(out).to(x.device, x.dtype) / 255


_FUNCS: Dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise, "gaussian_blur": _gaussian_blur, "defocus_blur": _defocus_blur,
    "contrast": _contrast, "brightness": _brightness, "pixelate": _pixelate, "jpeg_compression": _jpeg,
}
CORRUPTIONS = tuple(_FUNCS)


# ------------------------------------------------------------------------------------------------- public
def corrupt(x: Tensor, name: str, severity: int, seed: int = 0, preset: Optional[str] = None,
            quantize: bool = False) -> Tensor:
    """The corruption `name` at `severity` (1..5) of x: [B, C, H, W] or [C, H, W] in [-1, 1] -> the same shape,
    dtype and device, in [-1, 1]. Random corruptions draw from torch.Generator().manual_seed(seed) (on the CPU),
    so the same (x, name, severity, seed) gives the same output. preset: 'imagenet' | 'cifar' | None (by size).
    quantize=True rounds to 8 bits like the benchmark's saved files."""
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() not in (3, 4):
        raise ValueError("x must be a floating-point tensor [B, C, H, W] or [C, H, W] in [-1, 1]")
    single = x.dim() == 3
    xb = x[None] if single else x
    if preset is None:
        preset = preset_for(min(xb.shape[-2:]))
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS} or None, got {preset!r}")
    c = _CONSTANTS[name][preset][int(severity) - 1]
    g = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    dev, dtype = xb.device, xb.dtype
    u = ((xb.detach().cpu().to(torch.float32 if dtype != torch.float64 else dtype) + 1) / 2).clamp(0, 1)
    out = _FUNCS[name](u, c, g).clamp(0, 1)
    if quantize:
        out = (out * 255).round() / 255
    out = (out * 2 - 1).to(dev, dtype)
    return out[0] if single else out


def corrupt_image(x: Tensor, name: str, severity: int, seed: int, index: int, preset: Optional[str] = None) -> Tensor:
    """One image [C, H, W] corrupted with a seed derived from (seed, index): independent of the batching."""
    seed = int(seed)
    words = [seed & 0xFFFFFFFF, int(index)]
    if not 0 <= seed < 2**32:  # the rest of the seed, so 2**32 + s differs from s (seeds in [0, 2**32) as before)
        words += [(seed >> 32) & 0xFFFFFFFF, (seed >> 64) & 0xFFFFFFFF, int(seed < 0)]
    s = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return corrupt(x, name, severity, seed=s, preset=preset)


class CorruptedDataset(torch.utils.data.Dataset):
    """A dataset of (image [C, H, W] in [-1, 1], label) with `name` at `severity` applied on the fly; image i is
    corrupted with a seed derived from (seed, i), so every run (and every DataLoader order) sees the same
    corrupted set."""

    def __init__(self, base, name: str, severity: int, seed: int = 0, preset: Optional[str] = None):
        if name not in _FUNCS:
            raise ValueError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
        self.base, self.name, self.severity, self.seed, self.preset = base, name, int(severity), int(seed), preset

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return corrupt_image(x, self.name, self.severity, self.seed, i, self.preset), y


def _self_check() -> None:  # pragma: no cover - a quick manual look: python -m diffaug_kernels.corruptions
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for n in CORRUPTIONS:
        print(n, [round(float((corrupt(x, n, s) - x).abs().mean()), 3) for s in SEVERITIES])


if __name__ == "__main__":  # pragma: no cover
    _self_check()
