"""dk.models.load_improved_diffusion: openai/improved-diffusion's UNet, key for key, against a reference written
here from its equations (not from this package's UNet): the parameter names and shapes its UNetModel constructor
makes for the CIFAR-10 model, its forward pass on random weights, the timestep rescaling, and the cosine
4000-step schedule against its closed form."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffaug_kernels as dk
from diffaug_kernels import pretrained
from diffaug_kernels.models import improved_diffusion as idf
from diffaug_kernels.utils import UsageError

CIFAR = idf.IMPROVED_DIFFUSION_CONFIGS["cifar10_uncond"]
CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}  # its create_model's table


# ----------------------------------------------------------------------------------------- the reference
def reference_shapes(cfg, in_ch=3) -> dict:
    """Every parameter improved-diffusion's UNetModel(...) makes for cfg, name -> shape, walked as its
    constructor walks (input blocks, middle block, output blocks, out)."""
    c, e = cfg.num_channels, 4 * cfg.num_channels
    mult = CHANNEL_MULT[cfg.image_size]
    attn_ds = {cfg.image_size // int(r) for r in cfg.attention_resolutions.split(",")}
    shapes = {}

    def linear(n, i, o):
        shapes.update({f"{n}.weight": (o, i), f"{n}.bias": (o,)})

    def conv(n, i, o, k=3, dims=2):
        shapes.update({f"{n}.weight": (o, i) + (k,) * dims, f"{n}.bias": (o,)})

    def norm(n, ch):
        shapes.update({f"{n}.weight": (ch,), f"{n}.bias": (ch,)})

    def res(n, i, o):
        norm(f"{n}.in_layers.0", i)
        conv(f"{n}.in_layers.2", i, o)
        linear(f"{n}.emb_layers.1", e, 2 * o if cfg.use_scale_shift_norm else o)
        norm(f"{n}.out_layers.0", o)
        conv(f"{n}.out_layers.3", o, o)
        if i != o:
            conv(f"{n}.skip_connection", i, o, k=1)

    def attn(n, ch):
        norm(f"{n}.norm", ch)
        conv(f"{n}.qkv", ch, 3 * ch, k=1, dims=1)
        conv(f"{n}.proj_out", ch, ch, k=1, dims=1)

    linear("time_embed.0", c, e)
    linear("time_embed.2", e, e)
    conv("input_blocks.0.0", in_ch, c)
    skips, ch, ds, b = [c], c, 1, 1
    for level, m in enumerate(mult):
        for _ in range(cfg.num_res_blocks):
            res(f"input_blocks.{b}.0", ch, m * c)
            ch = m * c
            if ds in attn_ds:
                attn(f"input_blocks.{b}.1", ch)
            skips.append(ch)
            b += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{b}.0.op", ch, ch)
            skips.append(ch)
            b, ds = b + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    b = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(cfg.num_res_blocks + 1):
            res(f"output_blocks.{b}.0", ch + skips.pop(), m * c)
            ch, j = m * c, 1
            if ds in attn_ds:
                attn(f"output_blocks.{b}.1", ch)
                j = 2
            if level and i == cfg.num_res_blocks:
                conv(f"output_blocks.{b}.{j}.conv", ch, ch)
                ds //= 2
            b += 1
    norm("out.0", ch)
    conv("out.2", c, in_ch * (2 if cfg.learn_sigma else 1))
    return shapes


def reference_forward(sd: dict, x, t, cfg):
    """improved-diffusion's GaussianDiffusion calling its UNetModel in eval mode: model(x, _scale_timesteps(t)),
    written as plain functions of the state_dict."""
    c, heads = cfg.num_channels, cfg.num_heads
    mult = CHANNEL_MULT[cfg.image_size]
    attn_ds = {cfg.image_size // int(r) for r in cfg.attention_resolutions.split(",")}
    ts = t.float() * (1000.0 / cfg.diffusion_steps) if cfg.rescale_timesteps else t.float()
    half = c // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    arg = ts[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], 1)

    def lin(h, n):
        return h @ sd[f"{n}.weight"].T + sd[f"{n}.bias"]

    def conv(h, n, stride=1):
        return F.conv2d(h, sd[f"{n}.weight"], sd[f"{n}.bias"], stride=stride, padding=1)

    def gn(h, n):
        return F.group_norm(h, 32, sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-5)

    def silu(h):
        return h * torch.sigmoid(h)

    emb = lin(silu(lin(emb, "time_embed.0")), "time_embed.2")

    def res(h, n):
        z = conv(silu(gn(h, f"{n}.in_layers.0")), f"{n}.in_layers.2")
        e = lin(silu(emb), f"{n}.emb_layers.1")[:, :, None, None]
        if cfg.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            z = gn(z, f"{n}.out_layers.0") * (1 + scale) + shift
        else:
            z = gn(z + e, f"{n}.out_layers.0")
        z = conv(silu(z), f"{n}.out_layers.3")
        if f"{n}.skip_connection.weight" in sd:
            skip_w = sd[f"{n}.skip_connection.weight"]
            h = F.conv2d(h, skip_w, sd[f"{n}.skip_connection.bias"])
        return h + z

    def attn(h, n):
        b, ch, hh, ww = h.shape
        flat = h.reshape(b, ch, -1)
        qkv = F.conv1d(gn(flat, f"{n}.norm"), sd[f"{n}.qkv.weight"], sd[f"{n}.qkv.bias"])
        qkv = qkv.reshape(b * heads, 3 * ch // heads, -1)  # heads first, then q, k, v within each head
        q, k, v = qkv.split(ch // heads, dim=1)
        d = ch // heads
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, ch, -1)
        out = F.conv1d(a, sd[f"{n}.proj_out.weight"], sd[f"{n}.proj_out.bias"])
        return (flat + out).reshape(b, ch, hh, ww)

    h = conv(x, "input_blocks.0.0")
    hs, ds, b = [h], 1, 1
    for level, _ in enumerate(mult):
        for _ in range(cfg.num_res_blocks):
            h = res(h, f"input_blocks.{b}.0")
            if ds in attn_ds:
                h = attn(h, f"input_blocks.{b}.1")
            hs.append(h)
            b += 1
        if level != len(mult) - 1:
            h = conv(h, f"input_blocks.{b}.0.op", stride=2)
            hs.append(h)
            b, ds = b + 1, ds * 2
    h = res(attn(res(h, "middle_block.0"), "middle_block.1"), "middle_block.2")
    b = 0
    for level, _ in reversed(list(enumerate(mult))):
        for i in range(cfg.num_res_blocks + 1):
            h = res(torch.cat([h, hs.pop()], 1), f"output_blocks.{b}.0")
            j = 1
            if ds in attn_ds:
                h, j = attn(h, f"output_blocks.{b}.1"), 2
            if level and i == cfg.num_res_blocks:
                h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"output_blocks.{b}.{j}.conv")
                ds //= 2
            b += 1
    return conv(silu(gn(h, "out.0")), "out.2")


def random_state(shapes: dict, seed=0) -> dict:
    """Random weights for every parameter (the zero-initialised output convs included), activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if len(shape) > 1:
            fan_in = math.prod(shape[1:])
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif "norm" in name or "layers.0" in name or name.startswith("out.0"):
            sd[name] = (1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[name] = 0.1 * torch.randn(shape, generator=g)
    return sd


# --------------------------------------------------------------------------------------------- the tests
def test_cifar10_state_dict_names_and_shapes_match_improved_diffusion():
    with torch.device("meta"):
        model = dk.models.create_improved_diffusion("cifar10_uncond")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = reference_shapes(CIFAR)
    assert got == want
    assert list(got) == list(want)  # the constructor's order, too
    assert sum(math.prod(s) for s in want.values()) == 52_546_438
    assert model.out_channels == 6 and model.dropout == 0.3 and model.timestep_scale == 0.25


def test_cifar10_forward_on_random_weights_matches_the_reference():
    torch.manual_seed(0)
    sd = random_state(reference_shapes(CIFAR))
    with torch.device("meta"):
        model = dk.models.create_improved_diffusion("cifar10_uncond")
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([7, 3999])  # integer t of the 4000-step schedule: the model sees 1.75 and 999.75
    with torch.no_grad():
        got = model(x, t)
        want = reference_forward(sd, x, t, CIFAR)
    assert got.shape == (2, 6, 32, 32)
    assert want.abs().mean() > 0.1  # the output is not dominated by zeros
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the scalar t of a whole batch, as DiffAug's denoise may pass it
        torch.testing.assert_close(model(x, 3999)[1:], want[1:], rtol=1e-4, atol=1e-4)


SMALL = CIFAR.replace(num_channels=32, num_res_blocks=1, attention_resolutions="8", num_heads=2)


@pytest.mark.parametrize("rescale", [True, False])
def test_small_config_and_timestep_rescaling(rescale):
    cfg = SMALL.replace(rescale_timesteps=rescale, learn_sigma=False, use_scale_shift_norm=not rescale)
    sd = random_state(reference_shapes(cfg), seed=2)
    model = dk.models.create_improved_diffusion(cfg)
    model.load_state_dict(sd, strict=True)
    model.eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 1234, 3999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_forward(sd, x, t, cfg), rtol=1e-4, atol=1e-4)


def test_cosine_4000_schedule_is_the_closed_form():
    T, s = 4000, 0.008
    sched = dk.NoiseSchedule.cosine(T)
    assert CIFAR.schedule().betas.equal(sched.betas)
    u = np.arange(T + 1, dtype=np.float64) / T
    abar = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1 - abar[1:] / abar[:-1], 0.999)  # improved-diffusion's betas_for_alpha_bar clip
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-12, atol=0)
    clipped = np.flatnonzero(betas == 0.999)
    assert clipped.tolist() == [T - 1]  # only the last step reaches the clip
    # unclipped, the product telescopes: alphas_cumprod[t] = abar((t + 1) / T) / abar(0)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy()[:-1], abar[1:-1] / abar[0], rtol=1e-9)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(abar[-2] / abar[0] * 0.001, rel=1e-9)


def test_load_improved_diffusion_checkpoint(tmp_path):
    cfg = SMALL
    sd = random_state(reference_shapes(cfg), seed=3)
    path = tmp_path / "cifar10_small.pt"
    torch.save(sd, path)
    model = dk.models.load_improved_diffusion(path, "cifar10_uncond", num_channels=32, num_res_blocks=1,
                                              attention_resolutions="8", num_heads=2)
    assert not model.training and model.prediction == "eps"
    assert model.improved_config.schedule().num_timesteps == 4000
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 2000])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_forward(sd, x, t, cfg), rtol=1e-4, atol=1e-4)
    # DiffAug takes it with its own schedule: t drawn over the whole 4000 steps; learned sigma's 2C channels
    aug = dk.DiffAug(model, model.improved_config.schedule(), prediction=model.prediction)
    assert aug.t_range == (0, 4000)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    out, tt = aug(x0, seed=5, return_t=True)
    x_t = dk.forward_noise(x0, tt, aug.schedule, seed=5)
    with torch.no_grad():
        eps = reference_forward(sd, x_t, tt, cfg)[:, :3]
    abar = aug.schedule.alphas_cumprod[tt].float().view(-1, 1, 1, 1)
    want = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        dk.models.load_improved_diffusion(tmp_path / "gone.pt")
    path = tmp_path / "small.pt"
    torch.save(random_state(reference_shapes(SMALL)), path)
    with pytest.raises(ValueError, match=r"small\.pt does not match"):
        dk.models.load_improved_diffusion(path, "cifar10_uncond")  # the full-size network
    with pytest.raises(ValueError, match="unknown improved-diffusion config"):
        dk.models.load_improved_diffusion(path, "cifar100")
    with pytest.raises(ValueError, match="unknown improved-diffusion flags"):
        dk.models.load_improved_diffusion(path, "cifar10_uncond", num_head_channels=64)


def test_score_model_resolution(tmp_path):
    flags = ["num_channels=32", "num_res_blocks=1", "attention_resolutions=8", "num_heads=2"]
    sd = random_state(reference_shapes(SMALL), seed=4)
    path = tmp_path / "cifar10_small.pt"
    torch.save(sd, path)
    model, schedule = pretrained.resolve_score_model(str(path), "cifar10:/nowhere", "cifar10_uncond", flags)
    assert isinstance(model, idf.ImprovedDiffusionUNet) and schedule.num_timesteps == 4000
    assert not any(p.requires_grad for p in model.parameters()) and model.prediction == "eps"
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([123])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_forward(sd, x, t, SMALL), rtol=1e-4, atol=1e-4)
    model, schedule = pretrained.resolve_score_model("random", "digits", "cifar10_uncond", flags, channels=1)
    assert model.in_channels == 1 and model.out_channels == 2 and schedule.num_timesteps == 4000
    with pytest.raises(UsageError, match="not an improved-diffusion flag"):
        pretrained.resolve_score_model(str(path), "digits", "cifar10_uncond", ["resblock_updown=true"])
    with pytest.raises(UsageError, match=r"cifar10_small\.pt"):
        pretrained.resolve_score_model(str(path), "digits", "cifar10_uncond", [])
