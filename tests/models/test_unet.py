"""The ADM UNet (diffaug_kernels.models): guided-diffusion state_dict compatibility, options, attention math,
autocast, channels_last, torch.compile, checkpoint loading."""
import importlib.util
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import diffaug_kernels.models as M
from diffaug_kernels.models.unet import (
    AttentionBlock,
    GroupNorm32,
    ResBlock,
    Upsample,
    attention,
    cat_channels,
    group_norm_nhwc,
)


# ------------------------------------------------------------------------ expected guided-diffusion keys
def guided_diffusion_shapes(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False,
                            class_cond=False, attention_resolutions="16", resblock_updown=False,
                            use_scale_shift_norm=False, in_channels=3, num_classes=1000, **_ignored):
    """Every state_dict key and shape of guided-diffusion's create_model(...) UNetModel, in registration
    order, written out from its construction loops (unet.py / script_util.py / nn.py), independently of
    diffaug_kernels' code. Attention heads, dropout and the attention order do not change parameters."""
    if channel_mult == "":
        channel_mult = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4)}[image_size]
    else:
        channel_mult = tuple(int(c) for c in channel_mult.split(","))
    attn_ds = {image_size // int(r) for r in attention_resolutions.split(",")}
    emb = 4 * num_channels
    out = OrderedDict()

    def linear(name, fan_out, fan_in):
        out[f"{name}.weight"], out[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)

    def conv(name, cout, cin, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resblock(p, cin, cout):  # in_layers: GN, SiLU, conv; emb_layers: SiLU, linear; out_layers: GN, SiLU, drop, conv
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        linear(f"{p}.emb_layers.1", 2 * cout if use_scale_shift_norm else cout, emb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def attention(p, c):  # norm, qkv = conv1d(c, 3c, 1), proj_out = conv1d(c, c, 1)
        norm(f"{p}.norm", c)
        out[f"{p}.qkv.weight"], out[f"{p}.qkv.bias"] = (3 * c, c, 1), (3 * c,)
        out[f"{p}.proj_out.weight"], out[f"{p}.proj_out.bias"] = (c, c, 1), (c,)

    linear("time_embed.0", emb, num_channels)
    linear("time_embed.2", emb, emb)
    if class_cond:
        out["label_emb.weight"] = (num_classes, emb)
    ch = first = int(channel_mult[0] * num_channels)
    conv("input_blocks.0.0", ch, in_channels, 3)
    chans, ds, n = [ch], 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{n}.0", ch, int(mult * num_channels))
            ch = int(mult * num_channels)
            if ds in attn_ds:
                attention(f"input_blocks.{n}.1", ch)
            chans.append(ch)
            n += 1
        if level < len(channel_mult) - 1:
            if resblock_updown:
                resblock(f"input_blocks.{n}.0", ch, ch)
            else:
                conv(f"input_blocks.{n}.0.op", ch, ch, 3)
            chans.append(ch)
            ds, n = ds * 2, n + 1
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(num_res_blocks + 1):
            cout = int(num_channels * channel_mult[level])
            resblock(f"output_blocks.{n}.0", ch + chans.pop(), cout)
            ch, j = cout, 1
            if ds in attn_ds:
                attention(f"output_blocks.{n}.1", ch)
                j = 2
            if level and i == num_res_blocks:
                if resblock_updown:
                    resblock(f"output_blocks.{n}.{j}", ch, ch)
                else:
                    conv(f"output_blocks.{n}.{j}.conv", ch, ch, 3)
                ds //= 2
            n += 1
    norm("out.0", ch)
    conv("out.2", (2 if learn_sigma else 1) * in_channels, first, 3)
    return out


def meta_model(**flags):
    with torch.device("meta"):
        return M.create_adm_unet(**flags)


def shapes_of(model):
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


# Other published guided-diffusion / improved-diffusion shapes, to cover the non-updown, no-scale-shift and
# fractional-multiplier paths too.
EXTRA_CONFIGS = {
    "imagenet128_cond": dict(image_size=128, num_channels=256, num_res_blocks=2, num_heads=4,
                             attention_resolutions="32,16,8", resblock_updown=True, use_scale_shift_norm=True,
                             learn_sigma=True, class_cond=True),
    "imagenet512_cond": dict(image_size=512, num_channels=256, num_res_blocks=2, num_head_channels=64,
                             attention_resolutions="32,16,8", resblock_updown=True, use_scale_shift_norm=True,
                             learn_sigma=True, class_cond=True),
    "plain64": dict(image_size=64, num_channels=128, num_res_blocks=3, num_heads=4, attention_resolutions="16,8",
                    learn_sigma=True, use_scale_shift_norm=False, resblock_updown=False),
}


@pytest.mark.parametrize("name", ["imagenet256_uncond", "imagenet64_cond", "digits32", *EXTRA_CONFIGS])
def test_state_dict_keys_and_shapes_match_guided_diffusion(name):
    flags = dict(M.ADM_CONFIGS[name]) if name in M.ADM_CONFIGS else EXTRA_CONFIGS[name]
    model = meta_model(**flags)
    got, want = shapes_of(model), guided_diffusion_shapes(**flags)
    assert list(got) == list(want), (set(got) ^ set(want))
    assert got == want
    assert not list(model.buffers())  # nothing beyond guided-diffusion's parameters


def test_imagenet256_uncond_known_keys_and_count():
    sd = shapes_of(meta_model(**M.ADM_CONFIGS["imagenet256_uncond"]))
    assert sd["input_blocks.0.0.weight"] == (256, 3, 3, 3)
    assert sd["time_embed.0.weight"] == (1024, 256) and sd["time_embed.2.weight"] == (1024, 1024)
    assert sd["input_blocks.3.0.in_layers.2.weight"] == (256, 256, 3, 3)  # down ResBlock (resblock_updown)
    assert "input_blocks.9.1.qkv.weight" not in sd  # 32x32: no attention
    assert sd["input_blocks.10.1.qkv.weight"] == (1536, 512, 1)  # 32x32 -> first attention at 32
    assert sd["middle_block.1.qkv.weight"] == (3072, 1024, 1)
    assert sd["middle_block.1.proj_out.weight"] == (1024, 1024, 1)
    assert sd["middle_block.0.emb_layers.1.weight"] == (2048, 1024)  # scale-shift: 2 * out_channels
    assert sd["output_blocks.0.0.in_layers.0.weight"] == (2048,)
    assert sd["output_blocks.0.0.skip_connection.weight"] == (1024, 2048, 1, 1)
    assert sd["output_blocks.2.2.in_layers.2.weight"] == (1024, 1024, 3, 3)  # up ResBlock after attention
    assert sd["output_blocks.17.0.skip_connection.weight"] == (256, 512, 1, 1)
    assert sd["out.0.weight"] == (256,)
    assert sd["out.2.weight"] == (6, 256, 3, 3)
    assert "label_emb.weight" not in sd
    assert len(sd) == 566
    # 552,814,086 elements: the count of guided-diffusion's create_model for this config (cross-checked
    # elsewhere against the checkpoint's size, 2,211,383,297 bytes = 4 * 552,814,086 + pickle overhead).
    assert sum(math.prod(s) for s in sd.values()) == 552_814_086


def test_imagenet64_cond_known_keys_and_count():
    model = meta_model(**M.ADM_CONFIGS["imagenet64_cond"])
    sd = shapes_of(model)
    assert sd["input_blocks.0.0.weight"] == (192, 3, 3, 3)
    assert sd["label_emb.weight"] == (1000, 768)  # nn.Embedding(num_classes, time_embed_dim = 4 * 192)
    assert "input_blocks.3.1.qkv.weight" not in sd  # 64x64: no attention
    assert sd["input_blocks.5.1.qkv.weight"] == (1152, 384, 1)  # 32x32 (ds 2) after the first downsample
    assert sd["input_blocks.4.0.in_layers.2.weight"] == (192, 192, 3, 3)  # down ResBlock
    assert sd["middle_block.1.qkv.weight"] == (2304, 768, 1)
    assert sd["output_blocks.15.0.skip_connection.weight"] == (192, 384, 1, 1)
    assert sd["out.2.weight"] == (6, 192, 3, 3)
    assert len(model.output_blocks) == 16 and len(model.input_blocks) == 16
    heads = {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {6, 9, 12}  # 384/64, 576/64, 768/64 (no attention at 64x64, where width is 192)
    assert all(m.use_new_attention_order for m in model.modules() if isinstance(m, AttentionBlock))
    # 295,904,454 = the sum over the guided-diffusion enumeration above (the ADM paper rounds it to 296M).
    assert sum(math.prod(s) for s in sd.values()) == 295_904_454


def test_config_parsing():
    for size, mult in ((512, (0.5, 1, 1, 2, 2, 4, 4)), (256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)),
                       (64, (1, 2, 3, 4)), (32, (1, 2, 2, 2)), (28, (1, 2, 2)), (16, (1, 2, 2)), (8, (1, 2))):
        assert M.default_channel_mult(size) == mult
    m = meta_model(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                   attention_resolutions="16,8")
    assert m.channel_mult == (1, 2, 2) and set(m.attention_resolutions) == {2, 4}
    assert m.out_channels == 3 and m.num_classes is None
    m = meta_model(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True, in_channels=1,
                   class_cond=True, num_classes=10)
    assert m.out_channels == 2 and m.label_emb.weight.shape == (10, 128)
    assert M.ADM_CONFIGS["digits32"]["in_channels"] == 1
    assert isinstance(M.ADM_CONFIGS["digits32"].replace(in_channels=3).create(), M.ADMUNet)
    with pytest.raises(ValueError, match="image_size"):
        meta_model(image_size=48, num_channels=32, num_res_blocks=1)
    with pytest.raises(ValueError, match="multiple of 32"):
        meta_model(image_size=32, num_channels=48, num_res_blocks=1)
    with pytest.raises(ValueError, match="num_head_channels"):
        meta_model(image_size=32, num_channels=32, num_res_blocks=1, num_head_channels=48)
    with pytest.raises(ValueError, match="channel_mult"):
        meta_model(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,x")


# ------------------------------------------------------------------------------------------ tiny models
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
            num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)


def randomize(model, seed=0):
    """Random weights everywhere (guided-diffusion zero-initialises output convs, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return model


def tiny(seed=0, **overrides):
    return randomize(M.create_adm_unet(**{**TINY, **overrides}), seed).eval()


def inputs(model, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.in_channels, 16, 16, generator=g)
    t = torch.tensor([3, 700][:b] + [10] * max(0, b - 2))
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.num_classes else None
    return x, t, y


OPTIONS = {
    "default": {},
    "learn_sigma": dict(learn_sigma=True),
    "class_cond": dict(class_cond=True, num_classes=7),
    "new_attention_order": dict(use_new_attention_order=True),
    "no_updown": dict(resblock_updown=False),
    "no_scale_shift": dict(use_scale_shift_norm=False),
    "num_heads": dict(num_head_channels=-1, num_heads=4, num_heads_upsample=2),
    "dropout": dict(dropout=0.3),
    "grayscale": dict(in_channels=1, learn_sigma=True),
    "three_levels": dict(channel_mult="1,1,2", attention_resolutions="8,4", num_res_blocks=2),
    "fp16_torso": dict(use_fp16=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_shape_and_dtype(option):
    model = tiny(**OPTIONS[option])
    x, t, y = inputs(model)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, model.out_channels, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if option == "fp16_torso":  # float16 torso under autocast, float32 out
        ref = randomize(M.create_adm_unet(**TINY)).eval()
        with torch.no_grad():
            expect = ref(x, t)
        assert (out - expect).abs().max() <= 0.05 * expect.abs().max()


def test_options_change_the_model():
    x, t, _ = inputs(tiny())
    with torch.no_grad():
        legacy = tiny()(x, t)
        new = tiny(use_new_attention_order=True)(x, t)
        drop = tiny(dropout=0.5).train()
        a, b = drop(x, t), drop(x, t)
    assert not torch.allclose(legacy, new)  # same weights, different head split
    assert not torch.allclose(a, b)  # dropout is active in train mode
    with torch.no_grad():
        assert torch.equal(tiny(dropout=0.5)(x, t), tiny(dropout=0.5)(x, t))  # and off in eval


def test_timesteps_forms_and_class_labels():
    model = tiny()
    x, _, _ = inputs(model)
    with torch.no_grad():
        ref = model(x, torch.tensor([5, 5]))
        assert torch.equal(model(x, 5), ref)
        assert torch.equal(model(x, torch.tensor(5)), ref)
        assert torch.equal(model(x, torch.tensor([5.0])), ref)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, 5, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        model(x[:, :1], 5)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[..., :15], 5)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.tensor([1, 2, 3]))

    cond = tiny(class_cond=True, num_classes=7)
    with pytest.raises(ValueError, match="class-conditional"):
        cond(x, 5)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        cond(x, 5, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        cond(x, 5, torch.tensor([1, 2, 3]))
    with torch.no_grad():
        assert not torch.allclose(cond(x, 5, torch.tensor([1, 2])), cond(x, 5, torch.tensor([3, 4])))


def test_channels_last_and_bf16_autocast():
    model = tiny(class_cond=True, num_classes=7)
    x, t, y = inputs(model)
    with torch.no_grad():
        ref = model(x, t, y)
        cl_model = tiny(class_cond=True, num_classes=7).to(memory_format=torch.channels_last)
        out_cl = cl_model(x.contiguous(memory_format=torch.channels_last), t, y)
        torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = cl_model(x.contiguous(memory_format=torch.channels_last), t, y)
    assert out_bf.dtype == torch.bfloat16 and out_bf.shape == ref.shape
    assert (out_bf.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_groupnorm_computes_in_float32():
    model = tiny()
    norm = model.middle_block[0].in_layers[0]
    h = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = norm(h)
    assert out.dtype == torch.bfloat16
    ref = F.group_norm(h.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = tiny(class_cond=True, num_classes=7, use_new_attention_order=True)
    x, t, y = inputs(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x, t + 100, y), model(x, t + 100, y), rtol=1e-5, atol=1e-5)
        # bf16 autocast + channels_last: the same graph, no break
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = compiled(x, t, y), model(x, t, y)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_gradient_checkpointing_same_values_and_grads():
    a, b = tiny(), tiny(use_checkpoint=True)
    x, t, _ = inputs(a)
    a.train(), b.train()
    out_a, out_b = a(x, t), b(x, t)
    torch.testing.assert_close(out_a, out_b)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


# ----------------------------------------------------------------------- math against plain references
def reference_attention_block(block, x, new_order):
    """guided-diffusion's AttentionBlock math with a plain softmax(Q K^T / sqrt(d)) V."""
    b, c, hh, ww = x.shape
    heads, d = block.num_heads, c // block.num_heads
    xs = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(xs, 32, block.norm.weight, block.norm.bias, block.norm.eps),
                   block.qkv.weight, block.qkv.bias)  # [B, 3C, T]
    if new_order:  # split q, k, v first, then heads
        q, k, v = (z.reshape(b * heads, d, -1) for z in qkv.chunk(3, dim=1))
    else:  # split heads first, then q, k, v
        q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (xs + F.conv1d(a, block.proj_out.weight, block.proj_out.bias)).reshape(b, c, hh, ww)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_matches_softmax_reference(new_order, heads):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=heads, use_new_attention_order=new_order)
    randomize(block)
    x = torch.randn(2, 64, 4, 6)
    with torch.no_grad():
        ref = reference_attention_block(block, x, new_order)
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), ref,
                                   rtol=1e-5, atol=1e-5)
        if heads > 1:  # the two layouts really differ
            other = reference_attention_block(block, x, not new_order)
            assert not torch.allclose(other, ref, atol=1e-3)


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("updown", ["", "up", "down"])
def test_resblock_matches_reference(scale_shift, updown):
    torch.manual_seed(0)
    block = randomize(ResBlock(32, 40, 0.0, out_channels=32 if updown else 64,
                               use_scale_shift_norm=scale_shift, up=updown == "up", down=updown == "down"))
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 40)
    il, el, ol = block.in_layers, block.emb_layers, block.out_layers
    h = F.silu(F.group_norm(x, 32, il[0].weight, il[0].bias))
    if updown == "up":
        h, xs = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0, mode="nearest")
    elif updown == "down":
        h, xs = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    else:
        xs = x
    h = F.conv2d(h, il[2].weight, il[2].bias, padding=1)
    e = F.linear(F.silu(emb), el[1].weight, el[1].bias)[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, 32, ol[0].weight, ol[0].bias) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 32, ol[0].weight, ol[0].bias)
    h = F.conv2d(F.silu(h), ol[3].weight, ol[3].bias, padding=1)
    skip = xs if updown else F.conv2d(xs, block.skip_connection.weight, block.skip_connection.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), skip + h, rtol=1e-5, atol=1e-5)


def test_timestep_embedding():
    t = torch.tensor([0.0, 1.0, 999.0, 12.5])
    emb = M.timestep_embedding(t, 9)
    half = 4
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin(), torch.zeros(4, 1)], dim=1))


# ---------------------------------------------------------------------------------------------- loading
def test_load_guided_diffusion_round_trip(tmp_path):
    flags = {**TINY, "class_cond": True, "num_classes": 7, "learn_sigma": True}
    src = tiny(**{k: v for k, v in flags.items() if k not in TINY or TINY[k] != v})
    x, t, y = inputs(src)
    torch.save(src.state_dict(), tmp_path / "model.pt")
    loaded = M.load_guided_diffusion(tmp_path / "model.pt", **flags)
    assert not loaded.training and not any(p.is_meta for p in loaded.parameters())
    assert all(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), src(x, t, y))

    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = M.load_guided_diffusion(str(tmp_path / "model.safetensors"), M.ADMConfig(**flags))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), src(x, t, y))

    # strict: the wrong flags are refused, in one line that says what differs
    with pytest.raises(ValueError, match=r"does not match.*2 of another shape \(e.g. out.2.weight \(6, 32, 3, 3\) vs "
                                         r"\(3, 32, 3, 3\)\)"):
        M.load_guided_diffusion(tmp_path / "model.pt", **{**flags, "learn_sigma": False})
    with pytest.raises(FileNotFoundError, match="not found"):
        M.load_guided_diffusion(tmp_path / "nope.pt", **flags)
    with pytest.raises(TypeError, match="config name or the flags"):
        M.load_guided_diffusion(tmp_path / "model.pt")
    torch.save({"model": src.state_dict()}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat state_dict"):
        M.load_guided_diffusion(tmp_path / "nested.pt", **flags)


def test_load_named_config(tmp_path):
    src = M.ADM_CONFIGS["digits32"].create()
    torch.save(src.state_dict(), tmp_path / "digits.pt")
    loaded = M.load_guided_diffusion(tmp_path / "digits.pt", "digits32")
    assert loaded.in_channels == 1 and loaded.config == M.ADM_CONFIGS["digits32"]
    with pytest.raises(ValueError, match="unknown config"):
        M.load_guided_diffusion(tmp_path / "digits.pt", "digits64")


# ------------------------------------------------------------------------------------- attention backend
@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_requested_but_missing():
    with pytest.raises(ImportError, match="xformers"):
        M.create_adm_unet(**TINY, attention_backend="xformers")
    with pytest.raises(ImportError, match="xformers"):
        tiny().set_attention_backend("xformers")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_on_cpu_tensors_is_a_clear_error():
    net = M.create_adm_unet(**TINY, attention_backend="xformers").eval()
    x = torch.randn(2, 3, TINY["image_size"], TINY["image_size"])
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        net(x, torch.tensor([1, 2]))


@pytest.mark.parametrize("stats", ["channel", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_group_norm_nhwc_is_group_norm(dtype, compiled, stats):
    """The channels_last group norm gives F.group_norm's float32 result (any scale), and stays channels_last.
    The channels of a group have different means and spreads, so per-channel statistics merged without the
    spread of the channel means (or with unequal weights) would be far off; a large common offset checks
    the merge does not cancel catastrophically."""
    g = torch.Generator().manual_seed(3)
    spread = torch.rand(1, 64, 1, 1, generator=g) * 4
    for offset in (2.0, 300.0):
        x = torch.randn(3, 64, 9, 7, generator=g) * spread + torch.randn(1, 64, 1, 1, generator=g) * 3 + offset
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
        fn = torch.compile(group_norm_nhwc, fullgraph=True) if compiled else group_norm_nhwc
        got = fn(x, 32, w, b, 1e-5, stats)
        want = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="stats must be"):
        group_norm_nhwc(x, 32, w, b, 1e-5, "pixel")


def test_compiled_gpu_group_norm_keeps_channels_last(monkeypatch):
    """Traced for a GPU (fake CUDA tensors here), aten's group norm returns NCHW for a channels_last input (the
    layout copies in an H200 profile of bench-model --profile); GroupNorm32 then takes group_norm_nhwc and stays
    channels_last."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        norm = GroupNorm32(32, 64, device="cuda")
        x = torch.empty(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert not norm(x).is_contiguous(memory_format=torch.channels_last)  # eager: aten's kernel
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        y = norm(x)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        xc = x.contiguous()  # NCHW inputs keep aten's group norm
        assert norm(xc).is_contiguous()
        # what inductor lowers: aten's group norm decomposes with a clone (the layout copy); this path has none
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        def copies(fn):
            graph = make_fx(fn, decomposition_table=select_decomp_table())(x).graph
            return [str(n.target) for n in graph.nodes if n.op == "call_function" and "clone" in str(n.target)]

        assert copies(norm) == []
        assert copies(lambda v: F.group_norm(v.float(), 32, norm.weight, norm.bias, norm.eps)) != []


def test_gpu_group_norm_statistics_follow_nhwc_stats(monkeypatch):
    """Traced for a GPU (fake CUDA tensors), GroupNorm32 reduces per channel by default (faster on an
    H100) and group-wise when an instance says nhwc_stats="group" (bench-model --candidates times the two in one
    run); deleting the instance's attribute restores the default. Both give the group norm
    (test_group_norm_nhwc_is_group_norm)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def reductions(norm, x):
        graph = make_fx(norm)(x).graph
        return [(len(n.args[0].meta["val"].shape), list(n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else [])))
                for n in graph.nodes if n.op == "call_function" and "var_mean" in str(n.target)]

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        norm = GroupNorm32(32, 64, device="cuda")
        x = torch.empty(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert reductions(norm, x) == [(3, [1])]  # [B, HW, C] over the pixels
        norm.nhwc_stats = "group"
        assert reductions(norm, x) == [(4, [1, 3])]  # [B, HW, G, C/G] over pixels and the group's channels
        del norm.nhwc_stats
        assert reductions(norm, x) == [(3, [1])]


def test_cat_channels_is_cat_and_keeps_channels_last_on_the_compiled_gpu_path(monkeypatch):
    """cat_channels is torch.cat along channels for every layout. Traced for a GPU (fake CUDA tensors, compiling),
    channels_last inputs are concatenated as 2-D [pixels, channels] rows of their NHWC memory, a cat inductor
    gives a row-major (so NHWC) buffer (with the plain 4-D cat, torch 2.11's inductor gives the skip-connection cat
    an NCHW buffer that the next group norm gathers across; tools/inductor_layouts.py shows it without a
    GPU), and the result is a channels_last view of it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 6, 5, 3, generator=g)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = cat_channels(a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt))
        assert torch.equal(got, torch.cat([a, b], 1))
    assert torch.equal(cat_channels(a, b.contiguous(memory_format=torch.channels_last)), torch.cat([a, b], 1))

    def cats(fn, *xs):
        graph = make_fx(fn)(*xs).graph
        return [(n.args[1], n.meta["val"].is_contiguous()) for n in graph.nodes
                if n.op == "call_function" and "cat" in str(n.target)]

    with FakeTensorMode():
        ac, bc = (torch.empty(2, c, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
                  for c in (4, 6))
        assert cats(cat_channels, ac, bc) == [(1, False)]  # eager: torch.cat along channels
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert cats(cat_channels, ac, bc) == [(1, True)]  # [N*H*W, C] rows, cat along the channels
        graph = make_fx(cat_channels)(ac, bc).graph
        assert [n.meta["val"].dim() for n in graph.nodes if "cat" in str(n.target)] == [2]
        out = cat_channels(ac, bc)
        assert out.shape == (2, 10, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
        assert cats(cat_channels, ac.contiguous(), bc.contiguous()) == [(1, True)]  # NCHW inputs: plain cat


def test_upsampling_keeps_the_dtype_under_cuda_autocast(monkeypatch):
    """CUDA autocast runs nearest upsampling in float32. Upsample casts back (exactly: nearest copies values), so
    an up ResBlock under bf16 autocast returns bf16; a float32 result would make the residual sum and the
    skip-connection cat after it float32, twice the bytes through the norms of each output level's first
    block (tools/inductor_layouts.py's trace shows it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), torch.device("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        x = torch.empty(2, 32, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        block = ResBlock(32, 16, 0.0, up=True, use_scale_shift_norm=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert F.interpolate(x, scale_factor=2, mode="nearest").dtype == torch.float32  # autocast's rule
            assert Upsample(32, False)(x).dtype == torch.bfloat16
            y = block(x, torch.empty(2, 16))
            assert y.dtype == torch.bfloat16 and y.shape == (2, 32, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g).to(torch.bfloat16)
    assert torch.equal(Upsample(3, False)(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


@pytest.mark.parametrize("fixed", [True, False])
def test_compiled_gpu_unet_has_no_group_norm_layout_copies(monkeypatch, fixed):
    """The whole UNet traced for a GPU as inductor sees it (fake CUDA tensors, channels_last, inductor's
    decompositions): no copy turns a channels_last activation into NCHW. With aten's group norm (fixed=False,
    the eager path forced) every group norm adds one, which is what the test is there to catch."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    flags = {**TINY, "num_res_blocks": 2, "resblock_updown": True, "use_scale_shift_norm": True}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: fixed)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        net = M.create_adm_unet(**flags).eval()
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight = torch.nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))
        x = torch.empty(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        graph = make_fx(net, decomposition_table=select_decomp_table())(x, torch.zeros(2, dtype=torch.long)).graph

    def to_nchw(n):
        if n.op != "call_function" or "clone" not in str(n.target):
            return False
        src, out = n.args[0].meta["val"], n.meta["val"]
        return (src.dim() == 4 and src.shape[0] == 2 and min(src.shape[2:]) > 1 and not src.is_contiguous()
                and src.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous())

    norms = sum(isinstance(m, GroupNorm32) for m in net.modules())
    copies = sum(map(to_nchw, graph.nodes))
    assert copies == (0 if fixed else norms), (copies, norms)


def test_xformers_without_kernels_is_a_clear_error(monkeypatch):
    """An xformers whose CUDA kernels did not load (a wheel for another torch) raises NotImplementedError with
    a long list; attention() says what happened instead. A stand-in module and fake CUDA tensors run it here."""
    import sys
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_kernel(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    ops = types.SimpleNamespace(memory_efficient_attention=no_kernel)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    with FakeTensorMode():
        q = torch.empty(1, 16, 1, 32, device="cuda")
        with pytest.raises(RuntimeError, match="no kernel for these inputs") as info:
            attention(q, q, q, backend="xformers")
    assert isinstance(info.value.__cause__, NotImplementedError)


@pytest.mark.parametrize("stats", ["group", "channel"])
def test_the_compiled_gpu_paths_give_the_eager_unet_on_the_cpu(monkeypatch, stats):
    """The UNet's compiled-GPU code paths (group_norm_nhwc with either statistics, cat_channels) taken on the CPU
    here, compiled by inductor, against the eager UNet: the same outputs, so the GPU run only has to confirm
    them (test_compiled_unet_on_gpu_equals_eager)."""
    import diffaug_kernels.models.unet as U

    torch._dynamo.reset()
    net = tiny(num_res_blocks=2).eval()
    x, t, _ = inputs(net, b=2)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = net(x, t)
        taken = []

        def anywhere(*xs):  # the GPU condition without "not on the CPU"
            ok = torch.compiler.is_compiling() and all(
                v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
                for v in xs)
            taken.append(ok)
            return ok

        monkeypatch.setattr(U, "_compiled_gpu_nhwc", anywhere)
        monkeypatch.setattr(GroupNorm32, "nhwc_stats", stats)
        got = torch.compile(net, fullgraph=True)(x, t)
    assert taken.count(True) >= 2 * len(net.output_blocks)  # taken while tracing: every cat, and the norms
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_compiled_unet_on_gpu_equals_eager(monkeypatch):
    """Compiled for a GPU on channels_last inputs, the norms take group_norm_nhwc: the same outputs as eager
    (float32 without TF32, and under bf16 autocast)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    net = tiny(use_new_attention_order=True).cuda()
    x, t, _ = inputs(net, b=4)
    x, t = x.cuda().contiguous(memory_format=torch.channels_last), t.cuda()
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = compiled(x, t).float(), net(x, t).float()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale, float((got - want).abs().max() / scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_attention_equals_sdpa_on_gpu(dtype):
    xops = pytest.importorskip("xformers.ops")
    q = torch.randn(1, 16, 1, 32, device="cuda", dtype=dtype)
    try:
        xops.memory_efficient_attention(q, q, q)
    except NotImplementedError:  # e.g. 0.0.35 (a CUDA 12 build) beside a CUDA 13 torch 2.11: its kernels do not load
        with pytest.raises(RuntimeError, match="no kernel for these inputs"):
            attention(q, q, q, backend="xformers")
        pytest.skip("xformers is installed but its CUDA kernels did not load (python -m xformers.info); "
                    "its error is wrapped in a clear one (checked), the attention path itself is not tested")
    net = tiny().cuda()  # random weights everywhere: the attention output is not zeroed
    x = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], device="cuda")
    t = torch.tensor([10, 500], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        ref = net(x, t).float()
        got = net.set_attention_backend("xformers")(x, t).float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_unknown_attention_backend():
    with pytest.raises(ValueError, match="attention_backend"):
        M.create_adm_unet(**TINY, attention_backend="flash")


def fused_twin(model, flags, **kw):
    """model's twin with fused_norm=True, its state_dict loaded strictly (the same keys)."""
    fused = M.create_adm_unet(**{**TINY, **flags}, fused_norm=True, **kw).eval()
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)
    return fused


@pytest.mark.parametrize("flags", [{}, dict(use_scale_shift_norm=False, resblock_updown=False, class_cond=True,
                                            num_classes=5)])
def test_fused_norm_equals_unfused(flags):
    """create_adm_unet(fused_norm=True): every ResBlock's norm + (scale-shift +) SiLU and the output's as
    dk.group_norm_silu, equal to the unfused UNet on random weights, eager and compiled (fullgraph)."""
    torch._dynamo.reset()
    model = tiny(**flags)
    fused = fused_twin(model, flags)
    x, t, y = inputs(model)
    with torch.no_grad():
        want = model(x, t, y)
        torch.testing.assert_close(fused(x, t, y), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, t, y), want, rtol=1e-5, atol=1e-5)
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = fused(xc, t, y), model(xc, t, y)
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05 * ref.abs().max().item())
        assert torch.equal(fused.set_fused_norm(False)(x, t, y), want)


def test_fused_norm_unet_through_the_triton_kernel(monkeypatch):
    """The fused UNet with group_norm_silu on its Triton kernel (the interpreter on CPU tensors; "auto" takes it
    as on a GPU): outputs and every parameter's gradient equal the unfused UNet's, eager and compiled."""
    from diffaug_kernels.ops import dispatch

    if not dispatch.usable("triton", torch.device("cpu")):
        pytest.skip("Triton does not run on CPU tensors here")
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton",))
    kernel, calls = dispatch.kernels("triton").group_norm_silu_out, []
    monkeypatch.setattr(dispatch.kernels("triton"), "group_norm_silu_out", lambda *a: calls.append(1) or kernel(*a))
    torch._dynamo.reset()
    model = tiny().train()
    fused = fused_twin(model, {}).train()
    x, t, _ = inputs(model)

    def loss_and_grads(m, f):
        m.zero_grad()
        loss = f(x, t).square().mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}

    want_loss, want = loss_and_grads(model, model)
    for f in (fused, torch.compile(fused, fullgraph=True, backend="aot_eager")):
        calls.clear()
        loss, grads = loss_and_grads(fused, f)
        assert len(calls) == 2 * 10 + 1  # the two norms of each of its 10 ResBlocks and the output norm
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for k in want:
            torch.testing.assert_close(grads[k], want[k], rtol=1e-4, atol=1e-5 * want[k].abs().max().item() + 1e-7)
