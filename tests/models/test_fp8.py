"""FP8 3x3 convolutions (diffaug_kernels/models/fp8.py), their Triton kernel (diffaug_kernels/ops/fp8_conv.py)
and the accuracy harness (diffaug_kernels/bench/fp8.py, `bench-fp8`). Without a GPU the kernel runs in the Triton
interpreter (conftest sets TRITON_INTERPRET=1) and is compiled for sm_90 to check that it builds there."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import cli
from diffaug_kernels.bench import fp8 as bench_fp8
from diffaug_kernels.models import create_adm_unet
from diffaug_kernels.models import fp8 as f8
from diffaug_kernels.ops import fp8_conv

TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
            num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return bench_fp8.reinit_zeroed(create_adm_unet(**{**TINY, **overrides})).eval()


def calibration(model, n=2, size=16, seed=0, times=(50, 500, 950)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, model.in_channels, size, size, generator=g) * 2 - 1
    return bench_fp8.noisy_batches(x0, dk.NoiseSchedule.linear(1000), times, batch=n, seed=seed)


# ------------------------------------------------------------------------------------------- the quantiser
def all_e4m3_values():
    """Every finite float8_e4m3fn value, as float32 (the 256 codes less the two NaNs)."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return codes[torch.isfinite(codes)]


@pytest.mark.parametrize("scale", [1.0, 0.25, 2.0 ** -9, 8.0])
def test_quantiser_round_trips_representable_values(scale):
    v = all_e4m3_values()
    assert len(v) == 254
    x = v * scale  # exact: a power-of-two scale
    q = f8.quantize(x, torch.tensor(scale))
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float(), v)
    assert torch.equal(f8.dequantize(q, torch.tensor(scale)), x)


def test_quantiser_rounds_to_nearest():
    # between 1 and 1.125 (the next e4m3 value), 1.06 rounds down and 1.07 up
    q = f8.quantize(torch.tensor([1.06, 1.07, -1.07]), 1.0).float()
    assert q.tolist() == [1.0, 1.125, -1.125]


def test_quantiser_saturates_at_448():
    x = torch.tensor([448.0, 449.0, 500.0, 1e6, -1e6, float("inf"), -float("inf")])
    assert f8.quantize(x, 1.0).float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0, 448.0, -448.0]
    # with a scale: 900 / 2 = 450 saturates, 800 / 2 = 400 rounds to the e4m3 value 384 or 416
    q = f8.dequantize(f8.quantize(torch.tensor([900.0, 800.0]), torch.tensor(2.0)), torch.tensor(2.0))
    assert q[0] == 896.0 and q[1] in (768.0, 832.0)
    assert torch.isnan(f8.quantize(torch.tensor([float("nan")]), 1.0).float()).all()


def test_scale_from_amax():
    s = f8.scale_from_amax(torch.tensor([448.0, 0.0, 896.0, float("nan")]))
    assert s.tolist() == [1.0, 1.0, 2.0, 1.0]


def test_weight_scales_per_tensor_and_per_channel():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3) * torch.tensor([1.0, 10.0, 1e-4, 3.0, 0.0]).view(-1, 1, 1, 1)
    qc, sc = f8.quantize_weight(w, "channel")
    qt, st = f8.quantize_weight(w, "tensor")
    amax = w.abs().flatten(1).amax(1)
    assert sc.shape == st.shape == (5,)
    assert torch.allclose(sc[:4], amax[:4] / 448) and sc[4] == 1.0  # an all-zero channel keeps scale 1
    assert len(set(sc.tolist())) == 5  # one scale per channel, each its own
    assert torch.all(st == amax.max() / 448)  # one scale for the tensor, repeated
    assert torch.equal(qc.float().abs().flatten(1)[:4].amax(1), torch.full((4,), 448.0))  # each channel's max hits 448
    for q, s in ((qc, sc), (qt, st)):
        deq = f8.dequantize(q, s.view(-1, 1, 1, 1))
        assert ((deq - w).abs() <= w.abs().amax() / 8 / 2 + 1e-6).all()  # e4m3: 3 mantissa bits, half-step error
    # a float format keeps its relative precision over e4m3's normal range (2**-6 to 448) whatever the scale: a
    # channel 1e5 below the tensor's largest falls below it (subnormals, zeros) with one scale, not with its own
    rel = lambda q, s: ((f8.dequantize(q, s.view(-1, 1, 1, 1)) - w)[2].abs() / w[2].abs()).max()  # noqa: E731
    assert rel(qc, sc) <= 1 / 16 < rel(qt, st)
    with pytest.raises(ValueError, match="granularity"):
        f8.quantize_weight(w, "row")


# ------------------------------------------------------------------------------------------- the transform
def count(model, kind):
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("keep_ends", [True, False])
def test_only_3x3_convolutions_are_replaced(keep_ends):
    model = tiny_unet()
    convs3 = [n for n, m in model.named_modules() if f8.replaceable(m)]
    convs1 = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)]
    assert len(convs3) > 10 and convs1  # the tiny UNet has both kinds (1x1 skip connections)
    q = f8.to_fp8(model, calibration(model), emulate=True, keep_ends=keep_ends)
    replaced = [n for n, m in q.named_modules() if isinstance(m, f8.FP8Conv2d)]
    expected = [n for n in convs3 if not (keep_ends and n in ("input_blocks.0.0", "out.2"))]
    assert replaced == expected
    for kind in (nn.Conv1d, nn.Linear, nn.GroupNorm, type(model.out[0]), nn.SiLU):
        assert count(q, kind) == count(model, kind), kind
    assert [n for n, m in q.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)] == convs1
    assert not any(p.requires_grad for p in q.parameters())


def test_user_model_is_unchanged():
    model = tiny_unet()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    q = f8.to_fp8(model, calibration(model), granularity="tensor", emulate=True)
    assert q is not model and model.training
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def digits_model():
    """The shipped digits model, 8 training digits noised at three times to calibrate with, 8 test digits."""
    from diffaug_kernels.data import digits

    model, sched = dk.load_default_score_model()
    calib = bench_fp8.noisy_batches(digits("train", 32, 1).tensors[0][:8], sched, (50, 500, 950), batch=8)
    return model.eval(), sched, calib, digits("test", 32, 1).tensors[0][:8]


def test_emulated_output_is_close_to_the_model_and_not_equal(digits_model):
    model, sched, calib, x0 = digits_model
    xs = {t: dk.forward_noise(x0, t, sched, seed=t) for t in (50, 950)}
    with torch.no_grad():
        refs = {t: model(x, t) for t, x in xs.items()}
        for g in ("tensor", "channel"):
            q = f8.to_fp8(model, calib, granularity=g, emulate=True)
            for t, x in xs.items():
                rel = ((q(x, t) - refs[t]).norm() / refs[t].norm()).item()
                assert 1e-4 < rel < 0.05, (t, g, rel)  # quantised for real, and still close


def test_activation_scale_is_the_calibration_amax():
    model = tiny_unet()
    batches = calibration(model, times=(50, 950))
    seen = []
    conv = model.input_blocks[1][0].in_layers[2]
    h = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax()))
    with torch.no_grad():
        for x, t in batches:
            model(x, t)
    h.remove()
    q = f8.to_fp8(model, batches, emulate=True)
    assert torch.allclose(q.input_blocks[1][0].in_layers[2].act_scale, max(seen) / 448, rtol=1e-6)
    # a callable calibration is given the model and runs it
    q2 = f8.to_fp8(model, lambda m: [m(x, t) for x, t in batches], emulate=True)
    assert torch.equal(q2.input_blocks[1][0].in_layers[2].act_scale, q.input_blocks[1][0].in_layers[2].act_scale)


def test_bad_calibration_is_one_clear_error():
    model = tiny_unet()
    with pytest.raises(ValueError, match="no batches"):
        f8.to_fp8(model, [], emulate=True)
    with pytest.raises(TypeError, match=r"\(x_t, t\) pairs"):
        f8.to_fp8(model, [torch.zeros(1, 3, 16, 16)], emulate=True)
    with pytest.raises(ValueError, match="granularity"):
        f8.to_fp8(model, calibration(model), granularity="block", emulate=True)
    with pytest.raises(ValueError, match="calibration"):
        f8.to_fp8(model, None, emulate=True)


@pytest.mark.skipif(HOPPER, reason="a Hopper GPU runs the FP8 path")
def test_real_fp8_path_off_hopper_is_one_clear_error():
    model = tiny_unet()
    with pytest.raises(RuntimeError, match=r"need a Hopper GPU, CUDA capability \(9, 0\).*emulate=True") as e:
        f8.to_fp8(model, calibration(model))
    assert "\n" not in str(e.value)
    conv = f8.FP8Conv2d(nn.Conv2d(3, 4, 3, padding=1), 1.0, emulate=False)
    with pytest.raises(RuntimeError, match="Hopper"):
        conv(torch.randn(1, 3, 5, 5))


def test_fp8_model_works_inside_diffaug(digits_model):
    model, sched, calib, x = digits_model
    q = f8.to_fp8(model, calib, emulate=True)
    t = torch.tensor([100, 700] * 4)
    ref = dk.DiffAug(model, sched)(x, t=t, seed=3)
    out = dk.DiffAug(q, sched)(x, t=t, seed=3)
    assert out.shape == x.shape and out.dtype == x.dtype
    change, error = (out - ref).pow(2).mean(), (ref - x).pow(2).mean()
    assert 0 < change < 0.01 * error  # D(t) of bench-fp8, within the budget


def test_under_autocast_the_fp8_convolution_returns_the_autocast_dtype():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = f8.FP8Conv2d(conv, 3.0, emulate=True)
    x = torch.randn(2, 4, 5, 5)
    assert q(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16
    assert q.weight.dtype == torch.float32 and torch.equal(q.weight, q.dequantized_weight())


# ------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype,stride,bias,layout,C,N,H,W", [
    (torch.float8_e4m3fn, 1, True, "cl", 20, 24, 6, 7),
    (torch.float8_e4m3fn, 2, False, "cl", 3, 17, 7, 5),
    (torch.float8_e4m3fn, 1, True, "nchw", 33, 8, 4, 4),
    (torch.float32, 1, True, "cl", 17, 33, 5, 6),
    (torch.float16, 2, True, "nchw", 16, 16, 8, 8),
])
def test_kernel_matches_the_convolution(dtype, stride, bias, layout, C, N, H, W):
    if dtype == torch.float8_e4m3fn and torch.cuda.is_available() and not HOPPER:
        pytest.skip("FP8 tl.dot needs Hopper")
    g = torch.Generator().manual_seed(C * N + H)
    x = (torch.randn(2, C, H, W, generator=g) * 3).to(dtype)
    w = (torch.randn(N, C, 3, 3, generator=g) * 3).to(dtype)
    if layout == "cl":
        x, w = (v.contiguous(memory_format=torch.channels_last) for v in (x, w))
    xs, ws = torch.tensor(0.37), torch.rand(N, generator=g) + 0.5
    b = torch.randn(N, generator=g) if bias else None
    args = [v.to(KERNEL_DEVICE) if v is not None else None for v in (x, w, xs, ws, b)]
    out = fp8_conv.conv3x3_scaled(*args, stride=stride, padding=1, out_dtype=torch.float32).cpu()
    ref = fp8_conv.conv3x3_scaled_reference(x, w, xs, ws, b, stride, 1, out_dtype=torch.float32)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 * (x.float().abs().amax() * w.float().abs().amax() * 9 * C * 0.37 * 1.5)  # float32 sums, any order
    assert (out - ref).abs().max() <= tol


def test_kernel_checks_its_arguments():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="same C"):
        fp8_conv.conv3x3_scaled(x, torch.randn(6, 5, 3, 3), torch.tensor(1.0), torch.ones(6))
    with pytest.raises(TypeError, match="share a dtype"):
        fp8_conv.conv3x3_scaled(x, w.double(), torch.tensor(1.0), torch.ones(6))
    with pytest.raises(ValueError, match="w_scale"):
        fp8_conv.conv3x3_scaled(x, w, torch.tensor(1.0), torch.ones(5))


def test_fp8_unet_compiles_whole_on_the_kernel_path(monkeypatch):
    """bench-fp8 times torch.compile(fullgraph=True) of the FP8 UNet under bf16 autocast on the GPU: the kernel
    path (emulate=False: the input's quantisation, the custom op) traces as one graph and gives the eager
    numbers (aot_eager: the traced graph itself; the kernel runs in the interpreter, the device check lifted off
    Hopper as above)."""
    if not HOPPER:
        if torch.cuda.is_available():
            pytest.skip("FP8 tl.dot needs Hopper")
        monkeypatch.setattr(f8, "check_fp8_device", lambda device: None)
    model = tiny_unet().to(KERNEL_DEVICE)
    q = f8.set_emulate(f8.to_fp8(model, calibration(model), emulate=True), False)
    assert f8.fp8_convs(q) and not any(m.emulate for m in f8.fp8_convs(q))
    x, _ = calibration(model, n=1)[0]
    x, t = x.to(KERNEL_DEVICE), torch.tensor([500], device=KERNEL_DEVICE)
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        eager = q(x, t)
        compiled = torch.compile(q, fullgraph=True, backend="aot_eager")(x, t)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_fp8_path_runs_the_kernel_and_matches_emulation(monkeypatch, stride, bias):
    """FP8Conv2d(emulate=False)'s data flow (quantised channels_last input, K-major weight, scales and bias in the
    epilogue) gives the emulation's numbers: off Hopper the device check is lifted and the kernel runs in the
    interpreter (a CPU tensor)."""
    if not HOPPER:
        if torch.cuda.is_available():
            pytest.skip("FP8 tl.dot needs Hopper")
        monkeypatch.setattr(f8, "check_fp8_device", lambda device: None)
    torch.manual_seed(stride)
    conv = nn.Conv2d(24, 40, 3, stride=stride, padding=1, bias=bias)
    h = torch.randn(2, 24, 9, 10) * torch.rand(24).view(1, -1, 1, 1)
    q = f8.FP8Conv2d(conv, h.abs().amax() * 0.8, emulate=True).to(KERNEL_DEVICE)  # a few inputs saturate
    h = h.to(KERNEL_DEVICE)
    emulated = q(h)
    q.emulate = False
    real = q(h)
    assert real.dtype == torch.float32 and real.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(real, emulated, rtol=1e-5, atol=1e-5 * emulated.abs().max().item())
    assert ((emulated - conv.to(KERNEL_DEVICE)(h)).norm() / emulated.norm()).item() > 1e-3  # (quantised)


TRITON_FP8_COMPILE = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from diffaug_kernels.ops import fp8_conv

fn = fp8_conv.conv3x3_scaled_kernel
const_names = [fn.arg_names[i] for i in fn.constexprs]
cfg = [c for c in fp8_conv._configs() if c.kwargs["BLOCK_K"] == 64][0]
sig, const = {}, {}
for n in fn.arg_names:
    if n in const_names:
        sig[n] = "constexpr"
        const[n] = dict(STRIDE=1, PAD=1, HAS_BIAS=True, PROMOTE=True, **cfg.kwargs)[n]
    elif n in ("x_ptr", "w_ptr"):
        sig[n] = "*fp8e4nv"
    elif n == "out_ptr":
        sig[n] = "*bf16"
    elif n.endswith("_ptr"):
        sig[n] = "*fp32"
    else:
        sig[n] = "i32"
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
assert k.asm.get("cubin")
assert "wgmma.mma_async.sync.aligned" in k.asm["ptx"] and ".e4m3.e4m3" in k.asm["ptx"], "no FP8 wgmma"
print("TRITON-FP8-SM90-OK")
"""


def test_fp8_kernel_compiles_to_hopper_fp8_wgmma(tmp_path):
    """The interpreter runs the kernel's Python; compiled for sm_90 (as on an H100 / H200) its dot is Hopper's
    FP8 wgmma (e4m3 x e4m3, float32 accumulation)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", TRITON_FP8_COMPILE], env=env, capture_output=True, text=True,
                       timeout=600)
    assert "TRITON-FP8-SM90-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ------------------------------------------------------------------------------------------- the harness
def test_denoise_change_matches_a_hand_recomputation():
    model = tiny_unet()
    q = f8.to_fp8(model, calibration(model), emulate=True)
    sched = dk.NoiseSchedule.linear(1000)
    x0 = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = bench_fp8.denoise_change(model, q, x0, sched, times=(50, 700), dtype=None, batch=2, seed=11)
    for t in (50, 700):
        ab = float(sched.alphas_cumprod[t])
        # each chunk of 2 draws its noise from offset 0 and runs as one batch: FP8 rounding turns a convolution's
        # float32 differences between batch sizes into whole e4m3 steps now and then
        chunks = [x0[i:i + 2] for i in (0, 2, 4)]
        x_ts = [dk.forward_noise(c, t, sched, seed=11 + t) for c in chunks]  # the inputs themselves: one float32
        # rounding apart they would flip a few FP8 roundings, which a random UNet amplifies
        by_hand = [ab ** 0.5 * c + (1 - ab) ** 0.5 * dk.philox_normal(c.shape, seed=11 + t) for c in chunks]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(x_ts, by_hand))
        x_t = torch.cat(x_ts)
        with torch.no_grad():
            eps = [torch.cat([m(c, t)[:, :3] for c in x_ts]) for m in (model, q)]
        hat = [((x_t - (1 - ab) ** 0.5 * e) / ab ** 0.5).clamp(-1, 1) for e in eps]
        want = ((hat[1] - hat[0]) ** 2).mean() / ((hat[0] - x0) ** 2).mean()
        assert got[t] == pytest.approx(want.item(), rel=1e-4), t
        assert got[t] > 0


def test_bench_fp8_command_writes_its_json(tmp_path, capsys):
    path = tmp_path / "fp8.json"
    assert cli.main(["bench-fp8", "--device", "cpu", "--images", "8", "--calib-images", "8", "--times", "50,900",
                     "--batch", "8", "--threads", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["complete"] and result["times"] == [50, 900]
    d = result["digits"]["D"]
    assert set(d) == {"tensor", "channel"} and all(set(v) == {"50", "900"} for v in d.values())
    ratios = result["ratios"]
    assert ratios["fp8_denoise_change_max"] == max(d["channel"].values()) > 0
    assert "unet_fp8_vs_bf16" not in ratios  # no Hopper GPU: the FP8 UNet was not timed
    assert "fp8_denoise_change_max" in capsys.readouterr().out


@pytest.mark.cuda
def test_fp8_unet_on_hopper_matches_emulation():
    if not HOPPER:
        pytest.skip("the FP8 kernel needs a Hopper GPU")
    model = tiny_unet().cuda()
    calib = [(x.cuda(), t) for x, t in calibration(model)]
    q = f8.to_fp8(model, calib, emulate=False)
    x = calib[1][0]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        real = q(x, 500).float()
        emu = f8.set_emulate(q, True)(x, 500).float()
    assert ((real - emu).norm() / emu.norm()).item() < 0.02
