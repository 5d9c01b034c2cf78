"""dk.data.corruptions: the ImageNet-C / CIFAR-10-C corruptions, per-image deterministic, monotonic in severity."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffaug_kernels as dk
from diffaug_kernels.data import corruptions as C


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
    for inp in (x, xr):  # pixelate: further from the clean image with every severity (nearest-neighbour is not)
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
