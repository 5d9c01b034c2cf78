"""Guidance classifiers: guided-diffusion's EncoderUNetModel key for key (names and shapes written down here from
its module structure), the pooling heads against float64 re-implementations, the checkpoint loader, and the
DA-classifier's concatenation rule and gradients."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffaug_kernels as dk
from diffaug_kernels.models import (
    CLASSIFIER_CONFIGS,
    DAClassifier,
    EncoderUNet,
    create_adm_unet,
    create_classifier,
    load_guided_classifier,
)
from diffaug_kernels.models import unet as unet_module
from diffaug_kernels.models.unet import ResBlock


# ------------------------------------------------------------------------------- expected state_dicts
def resblock_keys(prefix, cin, cout, emb, scale_shift):
    k = {f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
         f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
         f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * cout, emb),
         f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * cout,),
         f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
         f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)}
    if cin != cout:
        k |= {f"{prefix}.skip_connection.weight": (cout, cin, 1, 1), f"{prefix}.skip_connection.bias": (cout,)}
    return k


def attention_keys(prefix, ch):
    return {f"{prefix}.norm.weight": (ch,), f"{prefix}.norm.bias": (ch,), f"{prefix}.qkv.weight": (3 * ch, ch, 1),
            f"{prefix}.qkv.bias": (3 * ch,), f"{prefix}.proj_out.weight": (ch, ch, 1), f"{prefix}.proj_out.bias": (ch,)}


def expected_classifier(image_size, width, depth, attention_res, mult, pool="attention", updown=True,
                        scale_shift=True, in_ch=3, out=1000, head_ch=64):
    """guided-diffusion's EncoderUNetModel parameter names and shapes, from its constructor read by hand."""
    emb = 4 * width
    k = {"time_embed.0.weight": (emb, width), "time_embed.0.bias": (emb,),
         "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}
    ch = int(mult[0] * width)
    k |= {"input_blocks.0.0.weight": (ch, in_ch, 3, 3), "input_blocks.0.0.bias": (ch,)}
    block, ds, feats = 1, 1, [ch]
    rates = [image_size // r for r in attention_res]
    for level, m in enumerate(mult):
        for _ in range(depth):
            k |= resblock_keys(f"input_blocks.{block}.0", ch, int(m * width), emb, scale_shift)
            ch = int(m * width)
            if ds in rates:
                k |= attention_keys(f"input_blocks.{block}.1", ch)
            block, feats = block + 1, feats + [ch]
        if level != len(mult) - 1:
            if updown:
                k |= resblock_keys(f"input_blocks.{block}.0", ch, ch, emb, scale_shift)
            else:
                k |= {f"input_blocks.{block}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{block}.0.op.bias": (ch,)}
            block, ds, feats = block + 1, ds * 2, feats + [ch]
    k |= resblock_keys("middle_block.0", ch, ch, emb, scale_shift)
    k |= attention_keys("middle_block.1", ch)
    k |= resblock_keys("middle_block.2", ch, ch, emb, scale_shift)
    feats.append(ch)
    if pool == "attention":
        k |= {"out.0.weight": (ch,), "out.0.bias": (ch,),
              "out.2.positional_embedding": (ch, (image_size // ds) ** 2 + 1),
              "out.2.qkv_proj.weight": (3 * ch, ch, 1), "out.2.qkv_proj.bias": (3 * ch,),
              "out.2.c_proj.weight": (out, ch, 1), "out.2.c_proj.bias": (out,)}
    elif pool == "adaptive":
        k |= {"out.0.weight": (ch,), "out.0.bias": (ch,), "out.3.weight": (out, ch, 1, 1), "out.3.bias": (out,)}
    elif pool == "spatial":
        k |= {"out.0.weight": (2048, sum(feats)), "out.0.bias": (2048,), "out.2.weight": (out, 2048),
              "out.2.bias": (out,)}
    else:
        k |= {"out.0.weight": (2048, sum(feats)), "out.0.bias": (2048,), "out.1.weight": (2048,),
              "out.1.bias": (2048,), "out.3.weight": (out, 2048), "out.3.bias": (out,)}
    return k


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# parameter counts of guided-diffusion's create_classifier(**classifier_defaults() | flags), counted upstream
RELEASED = {"64x64_classifier": (64, 4, (1, 2, 3, 4), 65_438_568),
            "128x128_classifier": (128, 2, (1, 1, 2, 3, 4), 42_568_040),
            "256x256_classifier": (256, 2, (1, 1, 2, 2, 4, 4), 54_096_360),
            "512x512_classifier": (512, 2, (0.5, 1, 1, 2, 2, 4, 4), 54_448_360)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_key_for_key(name):
    size, depth, mult, count = RELEASED[name]
    with torch.device("meta"):
        model = create_classifier(**CLASSIFIER_CONFIGS[name])
    assert shapes(model) == expected_classifier(size, 128, depth, (32, 16, 8), mult)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.channel_mult == mult and model.config.image_size == size


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
@pytest.mark.parametrize("updown", [True, False])
def test_small_configs_every_pool_key_for_key(pool, updown):
    with torch.device("meta"):
        model = create_classifier(image_size=32, classifier_width=32, classifier_depth=1,
                                  classifier_attention_resolutions="16,8", classifier_use_scale_shift_norm=updown,
                                  classifier_resblock_updown=updown, classifier_pool=pool, in_channels=2,
                                  num_classes=10, channel_mult="1,2,2", num_head_channels=32)
    want = expected_classifier(32, 32, 1, (16, 8), (1, 2, 2), pool=pool, updown=updown, scale_shift=updown,
                               in_ch=2, out=10, head_ch=32)
    assert shapes(model) == want


# ------------------------------------------------------------------------------------ forward, heads
def small(pool, **kw):
    torch.manual_seed(0)
    model = create_classifier(image_size=16, classifier_width=32, classifier_depth=1,
                              classifier_attention_resolutions="8", classifier_pool=pool, in_channels=2,
                              num_classes=5, channel_mult="1,2", num_head_channels=32, **kw)
    with torch.no_grad():  # every parameter random (the zero-initialised convs included)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] in (32, 64) else 0.0))
    return model.double().eval()


def reference_embedding(t, dim):
    half = dim // 2
    freqs = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
    return torch.tensor([[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t],
                        dtype=torch.float64)


def reference_forward(model, x, t):
    """The encoder from its blocks, the timestep embedding and the heads written out in float64."""
    e = model.time_embed[0](reference_embedding(t, model.model_channels))
    e = model.time_embed[2](F.silu(e))
    h, means = x, []
    for block in model.input_blocks:
        h = block(h, e)
        means.append(h.mean(dim=(2, 3)))
    h = model.middle_block(h, e)
    means.append(h.mean(dim=(2, 3)))
    head = model.out
    if model.pool == "adaptive":
        h = F.silu(F.group_norm(h, 32, head[0].weight, head[0].bias, 1e-5)).mean(dim=(2, 3))
        return h @ head[3].weight[:, :, 0, 0].T + head[3].bias
    if model.pool == "spatial":
        return F.relu(torch.cat(means, 1) @ head[0].weight.T + head[0].bias) @ head[2].weight.T + head[2].bias
    if model.pool == "spatial_v2":
        z = torch.cat(means, 1) @ head[0].weight.T + head[0].bias
        z = F.silu(F.group_norm(z, 32, head[1].weight, head[1].bias, 1e-5))
        return z @ head[3].weight.T + head[3].bias
    # attention pooling, guided-diffusion's QKVAttention on all H*W + 1 tokens, then the first token
    pool = head[2]
    h = F.silu(F.group_norm(h, 32, head[0].weight, head[0].bias, 1e-5)).flatten(2)
    h = torch.cat([h.mean(-1, keepdim=True), h], -1) + pool.positional_embedding
    qkv = torch.einsum("oc,bct->bot", pool.qkv_proj.weight[:, :, 0], h) + pool.qkv_proj.bias[:, None]
    b, width, length = qkv.shape
    heads = pool.num_heads
    d = width // (3 * heads)
    q, k, v = (z.reshape(b * heads, d, length) for z in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)
    out = torch.einsum("oc,bct->bot", pool.c_proj.weight[:, :, 0], a) + pool.c_proj.bias[:, None]
    return out[:, :, 0]


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_forward_matches_the_heads_written_out(pool):
    model = small(pool)
    torch.manual_seed(1)
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 17, 999])
    with torch.no_grad():
        got = model(x, t)
        want = reference_forward(model, x, [0, 17, 999])
    assert got.shape == (3, 5) and got.dtype == torch.float64
    scale = want.abs().max().item()  # the blocks' group norms compute in float32
    assert scale > 0.1 and (got - want).abs().max() <= 5e-5 * scale


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial_v2"])
def test_fused_norm_gives_the_same_logits_and_input_gradient(monkeypatch, pool):
    """set_fused_norm switches the ResBlocks' norm + SiLU pairs (and the head's, with adaptive or attention
    pooling) to dk.group_norm_silu: same state_dict, same logits and input gradient, channels_last included."""
    model = small(pool).float()
    fused = small(pool).float().set_fused_norm(True)
    assert model.state_dict().keys() == fused.state_dict().keys()
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    assert len(model.norm_silu_sites()) == 2 * n_res + (pool != "spatial_v2")
    calls, real = [], unet_module.group_norm_silu
    monkeypatch.setattr(unet_module, "group_norm_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 2, 16, 16).contiguous(memory_format=layout)
        grads = []
        for m in (model, fused):
            xi = x.clone().requires_grad_()
            out = m(xi, torch.tensor([0, 17, 999]))
            (g,) = torch.autograd.grad(out.square().sum(), xi)
            grads.append((out, g))
        (a, ga), (b, gb) = grads
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * ga.abs().max().item())
    assert len(calls) == 2 * len(fused.norm_silu_sites())
    assert not model.fused_norm and all(not getattr(m, "fused_norm", False) for m in model.modules())


def test_fp16_flag_runs_the_torso_in_float16_and_stays_close():
    model = small("attention").float()
    fp16 = small("attention", classifier_use_fp16=True).float()
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        a, b = model(x, 5), fp16(x, 5)
    assert b.dtype == torch.float32 and all(p.dtype == torch.float32 for p in fp16.parameters())
    assert (a - b).abs().max() <= 0.05 * a.abs().max()


def test_bad_inputs_raise_value_errors():
    model = small("attention")
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 2, 32, 32, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        model(torch.randn(1, 3, 16, 16, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="classifier_pool"):
        create_classifier(classifier_pool="max")
    with pytest.raises(ValueError, match="image_size"):
        create_classifier(image_size=0)
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNet(16, 3, 32, 5, 1, (), channel_mult=(1, 2), pool="attention")
    with pytest.raises(ValueError, match="multiple of 32"):
        create_classifier(image_size=16, classifier_width=16, channel_mult="1,2")


# --------------------------------------------------------------------------------------------- loader
def test_loader_round_trip_and_one_line_errors(tmp_path):
    model = small("attention").float()
    flags = dict(model.config)
    path = tmp_path / "cls.pt"
    torch.save(model.state_dict(), path)
    loaded = load_guided_classifier(path, **flags)
    assert not loaded.training
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3), model(x, 3), rtol=0, atol=0)
    loaded = load_guided_classifier(path, model.config)
    assert shapes(loaded) == shapes(model)

    with pytest.raises(ValueError) as e:  # wrong width
        load_guided_classifier(path, **{**flags, "classifier_width": 64})
    assert "\n" not in str(e.value) and "of another shape" in str(e.value)
    with pytest.raises(ValueError, match="missing"):  # wrong pool
        load_guided_classifier(path, **{**flags, "classifier_pool": "adaptive"})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_guided_classifier(tmp_path / "absent.pt", **flags)
    with pytest.raises(ValueError, match="unknown classifier config"):
        load_guided_classifier(path, "32x32_classifier")
    code = tmp_path / "code.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, code)
    with pytest.raises(ValueError) as e:
        load_guided_classifier(code, **flags)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------- DA-classifier
def da_setup(detach=False, clip=True):
    torch.manual_seed(2)
    score = create_adm_unet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                            attention_resolutions="8", num_head_channels=32, in_channels=1).double()
    with torch.no_grad():
        score.out[2].weight.normal_(0, 0.3)  # the zero-initialised output conv: a non-zero eps
    classifier = create_classifier(image_size=16, classifier_width=32, classifier_depth=1,
                                   classifier_attention_resolutions="8", in_channels=2, num_classes=4,
                                   channel_mult="1,2", num_head_channels=32).double()
    with torch.no_grad():
        classifier.out[2].c_proj.weight.normal_(0, 0.3)
    schedule = dk.NoiseSchedule.linear(1000)
    return DAClassifier(classifier, score, schedule, clip=clip, detach_denoiser=detach), score, classifier


def reference_x0(score, x_t, t, clip, detach=False):
    """Tweedie's formula for eps-prediction from the linear schedule's definition, in float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = torch.tensor(np.cumprod(1.0 - betas)[t], dtype=torch.float64)[:, None, None, None]
    eps = score(x_t, torch.tensor(t))
    x0 = (x_t - (1 - abar).sqrt() * (eps.detach() if detach else eps)) / abar.sqrt()
    return x0.clamp(-1, 1) if clip else x0


@pytest.mark.parametrize("clip", [True, False])
def test_da_classifier_is_the_concatenation_rule(clip):
    da, score, classifier = da_setup(clip=clip)
    torch.manual_seed(3)
    x_t = torch.randn(3, 1, 16, 16, dtype=torch.float64) * 1.5
    t = [10, 400, 900]
    with torch.no_grad():
        got = da(x_t, torch.tensor(t))
        x0 = reference_x0(score, x_t, t, clip)
        want = classifier(torch.cat([x_t, x0], 1), torch.tensor(t))
        torch.testing.assert_close(da.denoise(x_t, torch.tensor(t)), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (x0.abs() > 1).any() != clip  # the clamp is exercised


def test_da_classifier_gradient_reaches_the_score_model():
    da, score, classifier = da_setup()
    x_t = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    t = [50, 700]
    da(x_t, torch.tensor(t)).log_softmax(-1)[:, 1].sum().backward()
    got_x, got_w = x_t.grad.clone(), score.out[2].weight.grad.clone()
    assert got_w.abs().sum() > 0

    x_ref = x_t.detach().clone().requires_grad_(True)
    score.zero_grad()
    classifier(torch.cat([x_ref, reference_x0(score, x_ref, t, True)], 1),
               torch.tensor(t)).log_softmax(-1)[:, 1].sum().backward()
    torch.testing.assert_close(got_x, x_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got_w, score.out[2].weight.grad, rtol=1e-8, atol=1e-10)


def test_detach_denoiser_stops_the_gradient_at_the_score_model():
    da, score, classifier = da_setup(detach=True)
    x_t = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([50, 700])
    da(x_t, t).sum().backward()
    assert all(p.grad is None for p in score.parameters())
    x_ref = x_t.detach().clone().requires_grad_(True)  # d/dx_t through the x_t half and Tweedie's A[t] x_t
    classifier(torch.cat([x_ref, reference_x0(score, x_ref, [50, 700], True, detach=True)], 1), t).sum().backward()
    torch.testing.assert_close(x_t.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
    full = x_t.detach().clone().requires_grad_(True)  # the full gradient differs: it has the score model's part
    classifier(torch.cat([full, reference_x0(score, full, [50, 700], True)], 1), t).sum().backward()
    assert (full.grad - x_ref.grad).abs().max() > 1e-3 * full.grad.abs().max()


def test_da_classifier_modes_and_errors():
    da, score, _ = da_setup()
    da.train()
    assert da.classifier.training and not score.training
    with pytest.raises(ValueError, match="in_channels = 2 \\* C"):
        da(torch.randn(1, 2, 16, 16, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="prediction"):
        DAClassifier(da.classifier, score, da.schedule, prediction="noise")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        DAClassifier(da.classifier, score, None)


@pytest.mark.parametrize("kind", ["noisy", "da"])
def test_shipped_digits_guidance_classifiers_classify_noisy_test_digits(kind):
    """The shipped files load (the DA one on the shipped score model) and are trained: well above the 10% of
    chance on x_t of 64 test digits at t = 0 and 250, whatever a later retraining gives exactly."""
    from diffaug_kernels.commands.train_guidance import noisy_accuracy
    from diffaug_kernels.data import digits
    from diffaug_kernels.models.guidance import SHIPPED_COMMANDS
    from diffaug_kernels.models.score import load_default_score_model

    score, schedule = load_default_score_model()
    net = dk.models.load_default_guidance_classifier(kind, score_model=score)
    assert net.guidance_info["kind"] == kind and net.guidance_info["step"] == 500
    assert isinstance(net, DAClassifier) == (kind == "da") and f"--kind {kind}" in SHIPPED_COMMANDS[kind]
    acc = noisy_accuracy(net, digits("test", 32, 1), schedule, (0, 250), 0, 64, 64)
    assert min(acc.values()) > 0.5, acc
    with pytest.raises(ValueError, match="kind must be one of"):
        dk.models.load_default_guidance_classifier("plain")
