"""FP8 3x3 convolutions (models/fp8.py): their accuracy budget and, on a Hopper GPU, their speed.

Accuracy: D(t) = E|x0_hat_fp8 - x0_hat_ref|^2 / E|x0_hat_ref - x0|^2, the change FP8 makes to the denoised image
as a fraction of the reference model's own denoising error, at t in TIMES, both models given the same x_t
(dk.forward_noise of the evaluation images, one fixed seed) and x0_hat = dk.tweedie(x_t, model(x_t, t), t)
clipped to [-1, 1] as DiffAug has it. The reference is the same model under bf16 autocast on a GPU; on the CPU
it runs in float32 (a CPU without BF16 instructions emulates bf16 convolutions some 25x slower than float32;
the JSON names the reference dtype), and the FP8 model runs under the same autocast (or none), so the two
differ only in the 3x3 convolutions. Each FP8 model is calibrated on other images (the training split, or other
random images) noised at the same times with another seed.

Speed (Hopper): the compiled FP8 UNet against the compiled bf16 UNet (bf16 autocast + channels_last, the best
bf16 UNet of bench-model) on the paper's 256x256 unconditional model at 224x224, and per convolution shape the
FP8 kernel against cuDNN's bf16 convolution on the UNet's four most costly 3x3 convolution shapes.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import fp8 as fp8_models
from ..ops.forward_noise import forward_noise
from ..ops.tweedie import tweedie
from ..schedule import NoiseSchedule
from ..utils import write_json
from . import harness
from .model import UNET_COMPILED, device_and_unet

TIMES = (50, 250, 500, 750, 950)
UNET_FP8 = "compiled FP8 3x3 convs, bf16 autocast + channels_last"
EVAL_SEED, CALIB_SEED = 1234, 4321


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def precision(device, dtype: Optional[torch.dtype]):
    """The autocast context for dtype (None or float32: none)."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def noisy_batches(images: torch.Tensor, schedule: NoiseSchedule, times: Sequence[int] = TIMES, batch: int = 64,
                  seed: int = CALIB_SEED) -> list:
    """Calibration batches for to_fp8: [(dk.forward_noise(chunk, t, seed), t)] over images in chunks of batch,
    for each t in times (one seed per chunk and time)."""
    out = []
    for i, t in enumerate(times):
        for j in range(0, len(images), batch):
            chunk = images[j:j + batch]
            out.append((forward_noise(chunk, t, schedule, seed=seed + 1000 * i + j), t))
    return out


def x0_hats(model: nn.Module, x_ts: list, t: int, schedule: NoiseSchedule, dtype: Optional[torch.dtype],
            prediction: str = "eps") -> torch.Tensor:
    """x0_hat of each x_t in x_ts at time t (clipped, float32), the model under dtype's autocast."""
    outs = []
    with torch.no_grad(), precision(x_ts[0].device, dtype):
        for x_t in x_ts:
            outs.append(tweedie(x_t, model(x_t, t).float(), t, schedule, prediction=prediction, clip=True))
    return torch.cat(outs)


def denoise_change(reference: nn.Module, test: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule,
                   times: Sequence[int] = TIMES, dtype: Optional[torch.dtype] = torch.bfloat16, batch: int = 64,
                   seed: int = EVAL_SEED, prediction: str = "eps") -> dict:
    """{t: D(t)}: E|x0_hat_test - x0_hat_ref|^2 / E|x0_hat_ref - x0|^2 over x0 (all pixels, all images), both
    models run under dtype's autocast on x_t = dk.forward_noise(x0, t, schedule, seed + t), in chunks of batch."""
    out = {}
    x0 = x0.float()
    for t in times:
        x_ts = [forward_noise(x0[j:j + batch], t, schedule, seed=seed + t) for j in range(0, len(x0), batch)]
        ref = x0_hats(reference, x_ts, t, schedule, dtype, prediction)
        new = x0_hats(test, x_ts, t, schedule, dtype, prediction)
        out[int(t)] = ((new - ref).pow(2).mean() / (ref - x0).pow(2).mean()).item()
    return out


def digits_accuracy(device, granularities: Sequence[str], emulate: bool, dtype: Optional[torch.dtype],
                    images: int, calib_images: int, times: Sequence[int] = TIMES, batch: int = 64) -> dict:
    """D(t) of the shipped digits model per granularity: evaluation on the first `images` test digits,
    calibration on the first `calib_images` training digits."""
    from ..data import digits
    from ..models.score import load_default_score_model

    model, sched = load_default_score_model(device=device)
    model.eval()
    x0 = digits("test", 32, 1).tensors[0][:images].to(device)
    calib = noisy_batches(digits("train", 32, 1).tensors[0][:calib_images].to(device), sched, times, batch)
    out = dict(model="digits32 (shipped)", images=len(x0), calibration_images=calib_images, emulate=emulate,
               reference_dtype=str(dtype or torch.float32).removeprefix("torch."), D={})
    for g in granularities:
        q = fp8_models.to_fp8(model, calib, granularity=g, emulate=emulate)
        out["D"][g] = denoise_change(model, q, x0, sched, times, dtype, batch)
        log(f"[bench-fp8] digits D(t), {g}: " + ", ".join(f"{t}: {d:.2e}" for t, d in out["D"][g].items()))
    return out


def reinit_zeroed(model: nn.Module) -> nn.Module:
    """Random weights in the layers ADM initialises to zero (each ResBlock's last convolution, the attention
    projections, the output convolution), so a random-weight UNet's output, and D(t), is not identically zero."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not m.weight.detach().abs().amax().item():
            m.reset_parameters()
    return model


def conv_shapes(model: nn.Module, x: torch.Tensor, t: torch.Tensor, top: int = 4) -> list:
    """The `top` 3x3 convolution shapes of model by total FLOPs in one forward: dicts with input shape, out
    channels, stride, count and GFLOP per call."""
    seen: Counter = Counter()

    def record(m, args):
        seen[(tuple(args[0].shape), m.out_channels, m.stride[0])] += 1

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if fp8_models.replaceable(m)]
    try:
        with torch.no_grad(), precision(x.device, torch.bfloat16):
            model(x, t)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for (shape, n, s), count in seen.items():
        b, c, h, w = shape
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        rows.append(dict(input=list(shape), out_channels=n, stride=s, count=count,
                         gflop=2 * b * ho * wo * n * 9 * c / 1e9))
    return sorted(rows, key=lambda r: r["gflop"] * r["count"], reverse=True)[:top]


def time_conv_shapes(shapes: list, device, reps: int, warmup: int) -> list:
    """Per shape: cuDNN's bf16 convolution (channels_last) against the FP8 kernel alone and with the input's
    quantisation (what FP8Conv2d runs), random operands."""
    from ..ops.fp8_conv import conv3x3_scaled

    rows = []
    for r in shapes:
        b, c, h, w = r["input"]
        n, s = r["out_channels"], r["stride"]
        x = torch.randn(b, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
        wt = torch.randn(n, c, 3, 3, device=device) / (3 * c ** 0.5)
        bias = torch.randn(n, device=device)
        xb, wb, bb = x.bfloat16(), wt.bfloat16().contiguous(memory_format=torch.channels_last), bias.bfloat16()
        x_scale = fp8_models.scale_from_amax(x.abs().amax())
        wq, w_scale = fp8_models.quantize_weight(wt, "channel")
        wq = wq.contiguous(memory_format=torch.channels_last)
        xq = fp8_models.quantize(x, x_scale).contiguous(memory_format=torch.channels_last)
        impls = {"bf16 cudnn": lambda: F.conv2d(xb, wb, bb, s, 1),
                 "fp8 kernel": lambda: conv3x3_scaled(xq, wq, x_scale, w_scale, bias, s, 1),
                 "fp8 quantise + kernel": lambda: conv3x3_scaled(
                     fp8_models.quantize(xb, x_scale).contiguous(memory_format=torch.channels_last), wq, x_scale,
                     w_scale, bias, s, 1)}
        ms = {k: harness.time_fn(f, reps=reps, warmup=warmup, device=device, flush=False).ms for k, f in impls.items()}
        err = (conv3x3_scaled(xq, wq, x_scale, w_scale, bias, s, 1).float() - F.conv2d(x, wt, bias, s, 1)).norm() / \
            F.conv2d(x, wt, bias, s, 1).norm()
        row = dict(r, ms=ms, tflop_s={k: r["gflop"] / v for k, v in ms.items()},
                   fp8_vs_bf16=ms["bf16 cudnn"] / ms["fp8 kernel"],
                   fp8_with_quantise_vs_bf16=ms["bf16 cudnn"] / ms["fp8 quantise + kernel"],
                   fp8_relative_error_vs_fp32=err.item())
        rows.append(row)
        log(f"[bench-fp8] conv {r['input']} -> {n} s{s} x{r['count']}: bf16 {ms['bf16 cudnn']:.3f} ms, fp8 "
            f"{ms['fp8 kernel']:.3f} ms ({row['fp8_vs_bf16']:.2f}x; {row['fp8_with_quantise_vs_bf16']:.2f}x with "
            f"the quantise), rel. error {row['fp8_relative_error_vs_fp32']:.1e}")
    return rows


def gpu_unet(device, batch: int, size: int, granularity: str, reps: int, warmup: int, checkpoint: Optional[str],
             accuracy_images: int, times: Sequence[int], result: dict, json_path: Optional[str]) -> dict:
    """The 256x256 UNet on a Hopper GPU: D(t) per granularity (the FP8 kernel), the compiled bf16 and FP8 UNets'
    images/s, the per-shape convolution timings. Fills result as it goes (written after each part)."""
    from ..models import create_adm_unet, load_guided_diffusion

    device, _, flags = device_and_unet(device, None)
    torch.manual_seed(0)
    if checkpoint:
        model = load_guided_diffusion(checkpoint, "imagenet256_uncond", device=device).eval()
        weights = f"checkpoint {checkpoint}"
    else:
        model = reinit_zeroed(create_adm_unet(**flags)).to(device).eval()
        weights = "random (no checkpoint; the zero-initialised layers re-initialised as nn.Conv / nn.Linear do)"
    sched = NoiseSchedule.linear(1000)
    unet = result["unet256"] = dict(config="imagenet256_uncond", weights=weights, batch=batch, size=size,
                                    inputs="x_t = dk.forward_noise of uniform random images in [-1, 1]",
                                    granularity=granularity, D={}, rows=[])
    calib_x = torch.rand(8, 3, size, size, device=device) * 2 - 1
    calib = noisy_batches(calib_x, sched, times, batch=8)
    eval_x = torch.rand(accuracy_images, 3, size, size, device=device) * 2 - 1
    for g in fp8_models.GRANULARITIES:
        q = fp8_models.to_fp8(model, calib, granularity=g, emulate=False)
        unet["D"][g] = denoise_change(model, q, eval_x, sched, times, torch.bfloat16, batch=8)
        log(f"[bench-fp8] 256x256 D(t), {g}: " + ", ".join(f"{t}: {d:.2e}" for t, d in unet["D"][g].items()))
        if json_path:
            write_json(result, json_path)
    fp8 = fp8_models.to_fp8(model, calib, granularity=granularity, emulate=False)
    x = (forward_noise(torch.rand(batch, 3, size, size, device=device) * 2 - 1, 500, sched, seed=0)
         .contiguous(memory_format=torch.channels_last))
    t = torch.randint(0, 1000, (batch,), device=device)
    compiled = {UNET_COMPILED: torch.compile(model, fullgraph=True), UNET_FP8: torch.compile(fp8, fullgraph=True)}
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for name, m in compiled.items():
            def call(m=m):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return m(x, t)
            tm = harness.time_fn(call, reps=reps, warmup=warmup, device=device, flush=False)
            unet["rows"].append(dict(impl=name, ms=tm.ms, first_call_ms=tm.first_ms,
                                     images_per_s=batch / (tm.ms * 1e-3)))
            log(f"[bench-fp8] UNet {name:<56} {tm.ms:9.1f} ms  {batch / (tm.ms * 1e-3):8.1f} img/s")
            if json_path:
                write_json(result, json_path)
    unet["conv_shapes"] = time_conv_shapes(conv_shapes(model, x, t), device, reps=max(reps, 10), warmup=warmup)
    return unet


def run(device=None, granularity: str = "channel", images: int = 360, calib_images: int = 64,
        times: Sequence[int] = TIMES, reference_dtype: Optional[torch.dtype] = None, batch: int = 64,
        size: Optional[int] = None, reps: int = 5, warmup: int = 2, checkpoint: Optional[str] = None,
        accuracy_images: int = 16, unet: bool = True, json_path: Optional[str] = None) -> dict:
    """The whole benchmark: digits D(t) for both granularities (emulated on the CPU, the FP8 kernel on a Hopper
    GPU), and on a Hopper GPU (unet=True) the 256x256 UNet's D(t), speed and per-shape convolution timings.
    "ratios": "fp8_denoise_change_max", the largest D(t) measured with `granularity` (every model), and
    "unet_fp8_vs_bf16" (UNET_FP8 over UNET_COMPILED images/s) when the GPU part ran."""
    fp8_models.check_granularity(granularity)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == fp8_models.REQUIRED_CAPABILITY
    if reference_dtype is None:
        reference_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = dict(env=harness.environment(device), times=list(times), granularity=granularity, ratios={},
                  fp8_fast_accumulation=os.environ.get("DIFFAUG_FP8_FAST_ACC") == "1", complete=False)
    result["digits"] = digits_accuracy(device, fp8_models.GRANULARITIES, emulate=not hopper, dtype=reference_dtype,
                                       images=images, calib_images=calib_images, times=times, batch=batch)
    if json_path:
        write_json(result, json_path)
    if hopper and unet:
        gpu_unet(device, batch, size or 224, granularity, reps, warmup, checkpoint, accuracy_images, times,
                 result, json_path)
    measured = [d for part in ("digits", "unet256") if part in result for d in result[part]["D"][granularity].values()]
    result["denoise_change_max"] = {g: max(d for part in ("digits", "unet256") if part in result
                                           for d in result[part]["D"][g].values()) for g in fp8_models.GRANULARITIES}
    result["ratios"]["fp8_denoise_change_max"] = max(measured)
    if "unet256" in result:
        ips = {r["impl"]: r["images_per_s"] for r in result["unet256"]["rows"]}
        result["ratios"].update(harness.headline_ratios(ips, {"unet_fp8_vs_bf16": (UNET_FP8, UNET_COMPILED)}))
    result["complete"] = True
    print(format_result(result))
    if json_path:
        write_json(result, json_path)
        log(f"[bench-fp8] wrote {json_path}")
    return result


def format_result(result: dict) -> str:
    """The run as a text table: D(t) per model and granularity, the UNet rows, the conv shapes, the ratios."""
    times = result["times"]
    lines = [f"{result['env']['device_name']} ({result['env']['device']}), torch {result['env']['torch']}",
             "D(t) = E|x0_hat_fp8 - x0_hat_ref|^2 / E|x0_hat_ref - x0|^2",
             f"{'model':<12}{'gran.':<9}{'path':<10}{'ref':<10}" + "".join(f"{'t=' + str(t):>10}" for t in times)]
    for part in ("digits", "unet256"):
        if part not in result:
            continue
        p = result[part]
        path = "emulated" if p.get("emulate", False) else "fp8"
        for g, d in p["D"].items():
            lines.append(f"{part:<12}{g:<9}{path:<10}{p.get('reference_dtype', 'bfloat16'):<10}"
                         + "".join(f"{d[t]:10.2e}" for t in times))
    if "unet256" in result:
        u = result["unet256"]
        lines.append(f"UNet 256x256 ({u['weights']}), batch {u['batch']} at {u['size']}x{u['size']}:")
        lines += [f"  {r['impl']:<56} {r['ms']:9.1f} ms  {r['images_per_s']:8.1f} img/s" for r in u["rows"]]
        for r in u.get("conv_shapes", []):
            lines.append(f"  conv {r['input']} -> {r['out_channels']} s{r['stride']} x{r['count']}: bf16 "
                         f"{r['ms']['bf16 cudnn']:.3f} ms, fp8 {r['ms']['fp8 kernel']:.3f} ms "
                         f"({r['fp8_vs_bf16']:.2f}x, {r['fp8_with_quantise_vs_bf16']:.2f}x with the quantise)")
    lines += [f"{k}: {v:.4g}" for k, v in result["ratios"].items()]
    return "\n".join(lines)
