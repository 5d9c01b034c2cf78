"""End-to-end benchmarks: the ADM UNet forward and the whole DiffAug augmentation (images/s), against the
published pipeline (guided-diffusion's q_sample, the model, p_sample's pred_xstart), in one run; DE against the
published per-t loop; certify's noise samples against the published DDS loop.

CPU default: an 8M-parameter guided-diffusion-style UNet at 32x32, batch 64. GPU: the paper's 256x256
unconditional model at 224x224, batch 64 (random weights: speed does not depend on them)."""
from __future__ import annotations

import copy
import os
import sys
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..augment import DiffAug
from ..models import create_adm_unet
from ..models.unet import GroupNorm32
from ..schedule import NoiseSchedule
from ..utils import write_json
from . import harness

# ~8.0M parameters (learned sigma, scale-shift norm, attention at 16x16 and 8x8): guided-diffusion-sized.
CPU_UNET = dict(image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2", attention_resolutions="16,8",
                num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)


def published_diffaug(model, x, tables, half: bool = False):
    """The published DiffAug step: q_sample (randn_like + per-call table gathers), the model (fp16 eager on GPU
    as guided-diffusion's use_fp16 runs it), then pred_xstart from the eps half, clamped to [-1, 1]."""
    ext = harness.extract_into_tensor
    B, C = x.shape[:2]
    t = torch.randint(0, 1000, (B,), device=x.device)
    x_t = ext(tables["sqrt_alphas_cumprod"], t, x.shape) * x + \
        ext(tables["sqrt_one_minus_alphas_cumprod"], t, x.shape) * torch.randn_like(x)
    out = model(x_t.half(), t).float() if half else model(x_t, t)
    eps, _ = torch.split(out, C, dim=1)
    x0 = ext(tables["sqrt_recip_alphas_cumprod"], t, x.shape) * x_t - \
        ext(tables["sqrt_recipm1_alphas_cumprod"], t, x.shape) * eps
    return x0.clamp(-1, 1)


def matmul_rate(device, dtype=torch.bfloat16, n: Optional[int] = None, reps: int = 10, warmup: int = 3) -> float:
    """Measured dense matrix rate (FLOP/s) of an n x n x n matmul: the compute ceiling for the UNet. (A CPU
    without AVX512-BF16 does the bf16 one at about 1 GFLOP/s: 17 s a call at n = 2048.)"""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    tm = harness.time_fn(lambda: a @ b, reps=reps, warmup=warmup, device=device, flush=False)
    return 2 * n ** 3 / (tm.ms * 1e-3)


def unet_flops(model, x, t) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t)
    return fc.get_total_flops()


def device_and_unet(device, flags: Optional[dict]):
    """(device, on a GPU?, UNet flags): the paper's 256x256 uncond model on a GPU, CPU_UNET on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if flags is None:
        from ..models import ADM_CONFIGS
        flags = dict(ADM_CONFIGS["imagenet256_uncond"] if gpu else CPU_UNET)
    return device, gpu, flags


def check_size(size: int, flags: dict) -> None:
    """ValueError unless size suits the UNet the flags describe (models.unet.size_multiple)."""
    from ..models.unet import parse_channel_mult, size_multiple

    factor = size_multiple(parse_channel_mult(flags.get("channel_mult", ""), flags["image_size"]))
    if size % factor:
        raise ValueError(f"size {size} is not a multiple of {factor}: this UNet halves the image "
                         f"{factor.bit_length() - 1} times")


def check_candidates(gpu: bool) -> None:
    """ValueError off a GPU: run(candidates=True)'s rows are settings of the compiled GPU UNet."""
    if not gpu:
        raise ValueError("candidates are settings of the compiled GPU UNet (its group norm's statistics, cuDNN's "
                         "algorithm choice); on the CPU there is nothing to compare")


def _fp16_copy(model, flags: dict, device):
    """The published code's fp16 model on a GPU (guided-diffusion's use_fp16 converts the weights)."""
    half = create_adm_unet(**flags).to(device).half().eval()
    half.load_state_dict({k: v.half() for k, v in model.state_dict().items()})
    return half


def _published_tables(sched: NoiseSchedule) -> dict:
    """The float64 numpy tables guided-diffusion's q_sample and pred_xstart gather from."""
    return {k: sched._np[k] for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                                      "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")}


fp16_copy, published_tables = _fp16_copy, _published_tables  # public names for the training-step benchmark

# bench-model's rows behind its headline ratios (the JSON's "ratios"): a ratio is written only when both of its
# rows were measured in the run. UNET_FUSED is the same UNet with its norm + SiLU pairs as dk.group_norm_silu
# (create_adm_unet(fused_norm=True), the same weights), timed when run(fused=...) asks (by default on a GPU).
UNET_COMPILED = "compiled bf16 autocast + channels_last"
UNET_FUSED = "compiled bf16 autocast + channels_last, fused group_norm_silu"
STEP_DK = "dk.DiffAug compile=True, bf16"


# Kernel / op names -> what they are, for the profile's breakdown (GPU kernel names, else CPU aten op names).
# First match wins. Inductor's kernels come before the library groups: their names list the fused aten ops
# ("triton_poi_fused__to_copy_clone_convolution_native_group_norm_..." is an elementwise kernel, not a conv).
_PROFILE_GROUPS = (
    ("dk ops (noise, tweedie)", ("noise", "tweedie", "philox", "diffaug_kernels")),
    ("inductor-generated (fused elementwise / norm)", ("triton_", "cpp_fused", "call compiledfxgraph")),
    ("attention", ("flash", "fmha", "attention", "efficient_attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "implicit_convolve", "mkldnn_convolution", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "addmm", "aten::mm", "aten::bmm", "aten::linear", "matmul")),
    ("group norm", ("group_norm", "groupnorm")),
)


def profile_group(name: str) -> str:
    name = name.lower()
    return next((g for g, pats in _PROFILE_GROUPS if any(p in name for p in pats)), "other")


def full_kernel_names(events, attr: str, rows: int) -> list:
    """Lines naming the inductor-generated kernels with the most self time, in full: the profile's table cuts
    names short, and inductor's names (which list the fused aten ops) find a kernel's generated source under
    TORCHINDUCTOR_CACHE_DIR, to see what a slow one reads and writes. None on the CPU (no per-kernel events)."""
    top = sorted((e for e in events if (getattr(e, attr, 0.0) or 0.0) > 0 and e.key.startswith("triton_")),
                 key=lambda e: getattr(e, attr), reverse=True)[:rows]
    if not top:
        return []
    return ["", "inductor kernels by self time, full names:"] + [
        f"  {getattr(e, attr) / 1e3:9.3f} ms  {e.count:4d} calls  {e.key}" for e in top]


def profile_step(fn, device: torch.device, path: str, rows: int = 30) -> dict:
    """One call of fn under torch.profiler (after one untimed call): time per group of kernels (GPU) or ops
    (CPU) and the top `rows` by self time, written to path as text. Returns {group: ms}."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    fn()
    harness.sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        fn()
        harness.sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if gpu else "self_cpu_time_total"
    groups = {g: 0.0 for g, _ in _PROFILE_GROUPS} | {"other": 0.0}
    for e in events:
        us = getattr(e, attr, 0.0) or 0.0
        if us <= 0 or (gpu and str(getattr(e, "device_type", "")).endswith("CPU")):
            continue
        groups[profile_group(e.key)] += us / 1e3
    total = sum(groups.values())
    lines = [f"{'GPU kernel' if gpu else 'CPU op self'} time by group, one call ({total:.1f} ms in all):"]
    lines += [f"  {g:<48} {ms:9.2f} ms  {100 * ms / max(total, 1e-9):5.1f}%" for g, ms in groups.items() if ms]
    lines += ["", events.table(sort_by=attr, row_limit=rows)]
    lines += full_kernel_names(events, attr, rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return groups


def run(device=None, batch: int = 64, size: Optional[int] = None, flags: Optional[dict] = None, reps: int = 5,
        warmup: int = 2, json_path: Optional[str] = None,
        profile: Optional[str] = None, nchw: bool = False, candidates: bool = False,
        fused: Optional[bool] = None) -> dict:
    """The UNet forward (eager fp32, eager bf16 + channels_last, compiled; nchw: also the compiled model on a
    contiguous input, a second compile) and the DiffAug step against the published pipeline, in one run.
    candidates (GPU): also the compiled model with other settings, each measured against the default in the
    same run: its group norms' statistics reduced group-wise (GroupNorm32.nhwc_stats = "group", slower than
    per channel on an H100, RESULTS.md; a second compile), and cuDNN choosing its convolution algorithms by
    timing them (cudnn.benchmark, the same graph; no faster on an H100, RESULTS.md). The result's "ratios" holds
    the headline ratios of images/s measured in the run: "diffaug_step_vs_published" (STEP_DK over the published
    pipeline) and "unet_fused_vs_compiled" (UNET_FUSED over UNET_COMPILED), the latter only in a run that timed
    the fused UNet's row. fused (default: on a GPU): also time UNET_FUSED, a compiled copy of the UNet with
    fused_norm=True (the same weights; a second compile), record its largest difference from the unfused compiled
    output in "checks", and with profile, profile the DiffAug step with it too (profile's path + ".fused"), so
    the inductor elementwise / norm time of the two steps compare in one run."""
    device, gpu, flags = device_and_unet(device, flags)
    if candidates:
        check_candidates(gpu)
    size = size or (224 if gpu else flags["image_size"])
    check_size(size, flags)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    model = create_adm_unet(**flags).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    sched = NoiseSchedule.linear(1000)
    tables = _published_tables(sched)
    x = torch.rand(batch, flags.get("in_channels", 3), size, size, device=device) * 2 - 1
    t = torch.randint(0, 1000, (batch,), device=device)
    flops = unet_flops(model, x, t)
    rate = matmul_rate(device, reps=reps, warmup=warmup)  # the run's repetitions, like every row's
    log(f"[bench-model] {harness.device_name(device)}: UNet {params / 1e6:.1f}M params, {flops / batch / 1e9:.2f} "
        f"GFLOP/image at {size}x{size}; bf16 matmul {rate / 1e12:.2f} TFLOP/s")

    compiled = torch.compile(model, fullgraph=True)
    cl = x.contiguous(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def bf16_compiled():
        with autocast():
            return compiled(cl, t)

    def bf16_compiled_nchw():  # the same compiled model on a contiguous input (a second graph): which layout
        with autocast():       # serves inductor's norm kernels and the convolutions better is measured, not assumed
            return compiled(x, t)

    norms = [m for m in model.modules() if isinstance(m, GroupNorm32)]

    def bf16_compiled_group_stats():  # the same compiled model with the other statistics: a second graph
        for m in norms:
            m.nhwc_stats = "group"
        try:
            with autocast():
                return compiled(cl, t)
        finally:
            for m in norms:
                del m.nhwc_stats  # back to the class's default

    def bf16_compiled_cudnn_benchmark():  # cuDNN times its algorithms at the first call of each shape
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with autocast():
                return compiled(cl, t)
        finally:
            torch.backends.cudnn.benchmark = before

    def bf16_eager():
        with autocast():
            return model(cl, t)

    fused = gpu if fused is None else fused
    fused_model = copy.deepcopy(model).set_fused_norm(True) if fused else None
    fused_compiled = torch.compile(fused_model, fullgraph=True) if fused else None

    def bf16_compiled_fused():
        with autocast():
            return fused_compiled(cl, t)

    half_model = _fp16_copy(model, flags, device) if gpu else None

    published = f"published ({'fp16' if gpu else 'fp32'} eager)"
    aug_fast = DiffAug(model, sched, compile=True, dtype=torch.bfloat16)
    aug_plain = DiffAug(model, sched)
    cases = {
        "unet forward": {
            "eager fp32": lambda: model(x, t),
            "eager bf16 autocast + channels_last": bf16_eager,
            UNET_COMPILED: bf16_compiled,
            **({UNET_FUSED: bf16_compiled_fused} if fused else {}),
            **({"compiled bf16 autocast, contiguous (NCHW)": bf16_compiled_nchw} if nchw else {}),
            **({"compiled bf16 autocast + channels_last, group-wise norm stats": bf16_compiled_group_stats,
                "compiled bf16 autocast + channels_last, cudnn.benchmark": bf16_compiled_cudnn_benchmark}
               if candidates else {}),
        },
        "DiffAug step": {
            published: lambda: published_diffaug(half_model or model, x, tables, half=gpu),
            "dk.DiffAug eager fp32": lambda: aug_plain(x),
            STEP_DK: lambda: aug_fast(x),
        },
    }
    rows = []
    result = dict(env=harness.environment(device), flags=flags, params=params, batch=batch, size=size,
                  flops_per_forward=flops, matmul_flops_per_s=rate, reps=reps, rows=rows, ratios={}, complete=False)
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # static graphs only
        for group, impls in cases.items():
            base = None
            for name, fn in impls.items():
                tm = harness.time_fn(fn, reps=reps, warmup=warmup, device=device, flush=False)
                ips = batch / (tm.ms * 1e-3)
                base = base or ips
                row = dict(group=group, impl=name, ms=tm.ms, first_call_ms=tm.first_ms, images_per_s=ips,
                           vs_first=ips / base,
                           pct_matmul=100 * flops / (tm.ms * 1e-3) / rate if group == "unet forward" else None)
                _keep_row(result, row, json_path)
                log(f"[bench-model] {group:<13} {name:<40} {tm.ms:9.1f} ms  {ips:8.1f} img/s")
    print(f"{harness.device_name(device)} ({device.type}), torch {torch.__version__}; UNet {params / 1e6:.1f}M params, "
          f"batch {batch} at {size}x{size}; bf16 matmul {rate / 1e12:.2f} TFLOP/s; median of {reps}")
    w = max(len(r["impl"]) for r in rows)
    for r in rows:
        pct = f"{r['pct_matmul']:5.1f}% of bf16 matmul" if r["pct_matmul"] is not None else ""
        print(f"{r['group']:<13}  {r['impl']:<{w}}  {r['ms']:9.1f} ms  {r['images_per_s']:8.1f} img/s  "
              f"{r['vs_first']:5.2f}x  {pct}")
    ips = {r["impl"]: r["images_per_s"] for r in rows}
    result["ratios"] = harness.headline_ratios(ips, {"unet_fused_vs_compiled": (UNET_FUSED, UNET_COMPILED),
                                                     "diffaug_step_vs_published": (STEP_DK, published)})
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")
    if fused:
        with torch.no_grad():
            diff = (bf16_compiled_fused().float() - bf16_compiled().float()).abs().max().item()
        result["checks"] = {"unet_fused_max_abs_diff_vs_compiled": diff}
        print(f"fused UNet against the unfused compiled UNet, bf16: largest difference {diff:.3g}")
    result["complete"] = True
    if profile:
        with torch.no_grad():
            result["profile_ms"] = profile_step(lambda: aug_fast(x), device, profile)
        log(f"[bench-model] profile of the dk.DiffAug compile=True, bf16 step: {profile}")
        if fused:
            aug_fused = DiffAug(fused_model, sched, compile=True, dtype=torch.bfloat16, fused_norm=True)
            with torch.no_grad():
                result["profile_fused_ms"] = profile_step(lambda: aug_fused(x), device, profile + ".fused")
            log(f"[bench-model] profile of the same step with the fused UNet: {profile}.fused")
    if json_path:
        write_json(result, json_path)
        log(f"[bench-model] wrote {json_path}")
    return result


def _keep_row(result: dict, row: dict, json_path: Optional[str]) -> None:
    """Appends row to result["rows"]; with json_path, also writes the rows so far (result["complete"] still
    false), so a run cut off by a time limit keeps what it measured."""
    result["rows"].append(row)
    if json_path:
        write_json(result, json_path)


def _per_t_loop(classifier, aug: DiffAug, x, times, tables=None, unet=None):
    """The per-t loop of the published DE evaluation: one forward noise + UNet + Tweedie + classifier call per t.
    tables given: the published ops (randn_like, per-call table gathers, pred_xstart) around unet(x_t, t)
    (default aug.denoise); else the dk ops (aug itself)."""
    total = None
    for tv in times:
        if tv == 0:
            v = x
        else:
            t = torch.full((x.shape[0],), tv, device=x.device, dtype=torch.long)
            if tables is None:
                v = aug(x, t=t)
            else:
                ext = harness.extract_into_tensor
                x_t = ext(tables["sqrt_alphas_cumprod"], t, x.shape) * x + \
                    ext(tables["sqrt_one_minus_alphas_cumprod"], t, x.shape) * torch.randn_like(x)
                eps = (unet or aug.denoise)(x_t, t)[:, :x.shape[1]].float()
                v = (ext(tables["sqrt_recip_alphas_cumprod"], t, x.shape) * x_t -
                     ext(tables["sqrt_recipm1_alphas_cumprod"], t, x.shape) * eps).clamp(-1, 1)
        p = torch.softmax(classifier(v).float(), dim=-1)
        total = p if total is None else total + p
    return total / len(times)


def _announced_dda(fn, reps: int, log):
    """fn, logging when its first (untimed warm-up) call ends and the timed ones begin: the DDA row runs for
    minutes with nothing else to show (bench-ensemble's timings stay silent until each row ends)."""
    import time

    calls = [0]

    def call():
        t0 = time.perf_counter()
        out = fn()
        calls[0] += 1
        if calls[0] == 1:
            log(f"[bench-ensemble] DDA warm-up call done in {time.perf_counter() - t0:.1f} s; {reps} timed call(s) "
                f"follow")
        return out

    return call


def run_ensemble(device=None, batch: int = 8, size: Optional[int] = None, flags: Optional[dict] = None,
                 classifier: Optional[str] = None, reps: int = 5, warmup: int = 2, dda_reps: int = 1,
                 compile: Optional[bool] = None, json_path: Optional[str] = None) -> dict:
    """DiffAug-Ensemble (times 0, 50, ..., 450) against the per-t loop of the published evaluation and against
    DDA (official settings: 100 respaced steps, depth 50, guided) at the same batch, in one run. dda_reps: timed
    DDA calls after one untimed warm-up; 0 leaves the DDA row (and its ratio) out.

    Rows: the published per-t loop (guided-diffusion's ops, fp16 eager model on GPU as its use_fp16 runs it,
    fp32 eager on CPU), the base of every ratio; the per-t loop with the dk ops and a bf16-autocast eager UNet;
    dk.diffaug_ensemble with that same UNet (the chunk measured by pick_chunk, and all noisy times in one call):
    against the dk loop, the batching policy's gain alone; DDA; with compile (default on GPU),
    dk.diffaug_ensemble (all times in one call) and the per-t loop with DiffAug(compile=True) (CUDA graphs on
    GPU). The classifier is the same bf16-autocast module everywhere.

    CPU default: the 8M-parameter UNet at 32x32 with a timm resnet18, batch 8. GPU: the paper's 256x256
    unconditional model at 256x256 with a timm resnet50, batch 8."""
    import timm

    from ..dda import dda_predict
    from ..ensemble import DEFAULT_TIMES, diffaug_ensemble, pick_chunk

    if isinstance(dda_reps, bool) or not isinstance(dda_reps, int) or dda_reps < 0:
        raise ValueError(f"dda_reps must be a non-negative integer (0: no DDA row), got {dda_reps!r}")
    device, gpu, flags = device_and_unet(device, flags)
    compile = gpu if compile is None else compile
    size = size or flags["image_size"]
    check_size(size, flags)
    classifier = classifier or ("resnet50" if gpu else "resnet18")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    model = create_adm_unet(**flags).to(device).eval()
    clf_net = timm.create_model(classifier, pretrained=False, num_classes=1000 if gpu else 10).to(device).eval()
    clf_net = clf_net.to(memory_format=torch.channels_last)

    def clf(v):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return clf_net(v.contiguous(memory_format=torch.channels_last))

    published_unet = model
    if gpu:
        half = _fp16_copy(model, flags, device)
        published_unet = lambda x_t, t: half(x_t.half(), t).float()  # noqa: E731

    sched = NoiseSchedule.linear(1000)
    tables = _published_tables(sched)
    aug = DiffAug(model, sched, dtype=torch.bfloat16)
    x = torch.rand(batch, flags.get("in_channels", 3), size, size, device=device) * 2 - 1
    times = list(DEFAULT_TIMES)
    n_noisy = sum(t != 0 for t in times)
    with torch.no_grad():
        x_t = torch.randn(n_noisy * batch, *x.shape[1:], device=device)
        chunk = pick_chunk(aug, x_t, torch.zeros(n_noisy * batch, dtype=torch.long, device=device), batch)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[bench-ensemble] {harness.device_name(device)}: {n_params / 1e6:.1f}M-param "
        f"UNet at {size}x{size}, {classifier}, batch {batch}, times {times}; measured chunk {chunk} rows "
        f"({chunk // batch} times) per UNet call")
    pub = f"per-t loop, published ({'fp16' if gpu else 'fp32'} eager)"
    loop, de_chunk, de_all = ("per-t loop, dk ops, bf16 eager", f"DE, bf16 eager, measured chunk ({chunk // batch} t "
                              f"per call)", f"DE, bf16 eager, all {n_noisy} t in one call")
    cases = {
        pub: lambda: _per_t_loop(clf, aug, x, times, tables, unet=published_unet),
        loop: lambda: _per_t_loop(clf, aug, x, times),
        de_chunk: lambda: diffaug_ensemble(clf, aug, x, times),
        de_all: lambda: diffaug_ensemble(clf, aug, x, times, max_batch=n_noisy * batch),
    }
    dda = "DDA (100 steps, depth 50, guided)"
    if dda_reps:  # 0: no DDA row (it is the slow one: minutes per call on a CPU)
        cases[dda] = _announced_dda(lambda: dda_predict(clf, aug, sched, x), dda_reps, log)
    # the compiled rows last: their compiles take minutes on a GPU, and a run cut off there keeps the rest;
    # compiled DE (the whole stack against the published loop) before the compiled loop, which only splits
    # that gain into batching and compiling
    c_loop, c_all = "per-t loop, dk ops, bf16 compiled", f"DE, bf16 compiled, all {n_noisy} t in one call"
    if compile:
        aug_c = DiffAug(model, sched, dtype=torch.bfloat16, compile=True)
        cases[c_all] = lambda: diffaug_ensemble(clf, aug_c, x, times, max_batch=n_noisy * batch)
        cases[c_loop] = lambda: _per_t_loop(clf, aug_c, x, times)
    rows, ips = [], {}
    result = dict(env=harness.environment(device), flags=flags, classifier=classifier, batch=batch, size=size,
                  times=times, chunk_rows=chunk, reps=reps, dda_reps=dda_reps, compiled=compile, rows=rows,
                  complete=False)
    # each batch size its own static graph: by default the second size (the per-t loop's 8 rows after DE's 72)
    # would recompile with a symbolic batch, and the two compiled rows would not run alike-made graphs
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for name, fn in cases.items():
            is_dda = name == dda
            r = dda_reps if is_dda else reps
            if is_dda:
                log(f"[bench-ensemble] {dda}: 1 untimed warm-up call, then {r} timed; each call runs the UNet "
                    f"forward and backward about 100 times (slow: --dda-reps 0 skips this row)")
            tm = harness.time_fn(fn, reps=r, warmup=1 if is_dda else warmup, device=device, flush=False)
            ips[name] = batch / (tm.ms * 1e-3)
            _keep_row(result, dict(impl=name, ms=tm.ms, first_call_ms=tm.first_ms, images_per_s=ips[name],
                                   vs_published_loop=ips[name] / ips[pub], reps=r), json_path)
            log(f"[bench-ensemble] {name:<52} {tm.ms:10.1f} ms  {ips[name]:8.2f} img/s")
    de_names = [de_chunk, de_all] + ([c_all] if compile else [])
    best_de = max(de_names, key=ips.get)
    ratios = {"batching, bf16 eager: DE measured chunk / dk loop": ips[de_chunk] / ips[loop],
              "batching, bf16 eager: DE all in one call / dk loop": ips[de_all] / ips[loop]}
    if compile:
        ratios["batching, bf16 compiled: DE all in one call / dk loop"] = ips[c_all] / ips[c_loop]
    ratios[f"whole stack: best DE ({best_de}) / published loop"] = ips[best_de] / ips[pub]
    if dda in ips:
        ratios["DE measured chunk / DDA (same eager UNet)"] = ips[de_chunk] / ips[dda]
    print(f"{harness.device_name(device)} ({device.type}), torch {torch.__version__}; "
          f"DE over times {times[0]}..{times[-1]} "
          f"(step {times[1] - times[0]}), batch {batch} at {size}x{size}, {classifier}; median of {reps} "
          + (f"(DDA {dda_reps})" if dda_reps else "(DDA skipped: --dda-reps 0)"))
    w = max(len(r["impl"]) for r in rows)
    for r in rows:
        print(f"{r['impl']:<{w}}  {r['ms']:10.1f} ms  {r['images_per_s']:8.2f} img/s  "
              f"{r['vs_published_loop']:5.2f}x the published loop")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    result.update(ratios=ratios, complete=True)
    if json_path:
        write_json(result, json_path)
        log(f"[bench-ensemble] wrote {json_path}")
    return result


# ------------------------------------------------------------------------------------------------- certify
def _published_posterior(sched: NoiseSchedule) -> dict:
    """The float64 tables guided-diffusion's p_sample reads besides pred_xstart's: the posterior's mean
    coefficients and clipped log variance, and log beta (the learned-range variance's upper end)."""
    import numpy as np

    betas = sched._np["betas"]
    ac = sched._np["alphas_cumprod"]
    ac_prev = np.append(1.0, ac[:-1])
    var = betas * (1 - ac_prev) / (1 - ac)
    return dict(log_var_clipped=np.log(np.append(var[1], var[1:])), log_betas=np.log(betas),
                mean_coef1=betas * np.sqrt(ac_prev) / (1 - ac),
                mean_coef2=(1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac))


def published_dds_counts(model, classifier, x, t_star: int, num: int, batch: int, tables: dict, num_classes: int):
    """The published DDS loop (ethz-spylab/diffusion_denoised_smoothing's Smooth._sample_noise around
    DiffusionRobustModel.denoise): per batch, the image repeated, q_sample with randn_like, p_sample (the model,
    pred_xstart clipped, and the posterior mean, variance and sample it computes and DDS discards), the
    classifier's argmax, and the counts in a Python loop. model(x_t, t) returns eps and the variance values."""
    import numpy as np

    ext = harness.extract_into_tensor
    counts = np.zeros(num_classes, dtype=int)
    C = x.shape[0]
    while num > 0:
        k = min(batch, num)
        num -= k
        xb = x.repeat((k, 1, 1, 1))
        t = torch.tensor([t_star] * k, device=x.device)
        shape = xb.shape
        x_t = ext(tables["sqrt_alphas_cumprod"], t, shape) * xb + \
            ext(tables["sqrt_one_minus_alphas_cumprod"], t, shape) * torch.randn_like(xb)
        eps, var_values = torch.split(model(x_t, t), C, dim=1)
        frac = (var_values + 1) / 2
        log_var = frac * ext(tables["log_betas"], t, shape) + (1 - frac) * ext(tables["log_var_clipped"], t, shape)
        x0 = (ext(tables["sqrt_recip_alphas_cumprod"], t, shape) * x_t -
              ext(tables["sqrt_recipm1_alphas_cumprod"], t, shape) * eps).clamp(-1, 1)
        mean = ext(tables["mean_coef1"], t, shape) * x0 + ext(tables["mean_coef2"], t, shape) * x_t
        nonzero = (t != 0).float().view(-1, 1, 1, 1)
        _sample = mean + nonzero * torch.exp(0.5 * log_var) * torch.randn_like(x_t)  # p_sample's, unused by DDS
        for idx in classifier(x0).argmax(1).cpu().numpy():
            counts[idx] += 1
    return counts


class _Classifier(torch.nn.Module):
    """One classifier for every row: a timm network, channels_last, under bf16 autocast when bf16 is True."""

    def __init__(self, net, device, bf16: bool):
        super().__init__()
        self.net, self.device_type, self.bf16 = net.to(memory_format=torch.channels_last), device.type, bf16

    def forward(self, v):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(v.contiguous(memory_format=torch.channels_last)).float()


def run_certify(device=None, batch: Optional[int] = None, size: Optional[int] = None, flags: Optional[dict] = None,
                classifier: Optional[str] = None, sigma: float = 0.5, batches: int = 2, reps: int = 3,
                warmup: int = 1, compile: bool = True, dtypes=(torch.float32, torch.bfloat16),
                json_path: Optional[str] = None) -> dict:
    """Noise samples per second of certification (one image, `batches` batches of `batch` noise draws per call,
    the counts at the end) against the published DDS loop, in one run: the same UNet weights and classifier (a
    timm network in every row, under bf16 autocast when bfloat16 is among dtypes), the same batch,
    t* = dds_timestep(sigma).

    Rows: the published DDS loop (guided-diffusion's q_sample and p_sample, fp16 eager on a GPU as its use_fp16
    runs it, fp32 eager on the CPU), the base of every ratio; DenoisedSmoothing.sample_counts with the UNet in
    each of dtypes, eager and (compile) compiled. (A CPU without AVX-512 BF16 runs bf16 convolutions emulated,
    several times slower than fp32: give dtypes=(torch.float32,) there.) CPU default: the 8M-parameter UNet at
    32x32, resnet18, batch 64; GPU: the paper's 256x256 unconditional model at 224x224, resnet50, batch 200."""
    import timm

    from ..certify import DenoisedSmoothing, dds_timestep

    device, gpu, flags = device_and_unet(device, flags)
    size = size or (224 if gpu else flags["image_size"])
    check_size(size, flags)
    batch = batch or (200 if gpu else 64)
    if not flags.get("learn_sigma"):
        raise ValueError("the published DDS loop reads p_sample's learned variance: the UNet needs learn_sigma")
    classifier = classifier or ("resnet50" if gpu else "resnet18")
    num_classes = 1000 if gpu else 10
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    model = create_adm_unet(**flags).to(device).eval()
    clf = _Classifier(timm.create_model(classifier, pretrained=False, num_classes=num_classes), device,
                      bf16=torch.bfloat16 in dtypes)
    clf = clf.to(device).eval()
    sched = NoiseSchedule.linear(1000)
    t_star = dds_timestep(sched, sigma)
    tables = {**_published_tables(sched), **_published_posterior(sched)}
    published_unet = model
    if gpu:
        half = _fp16_copy(model, flags, device)
        published_unet = lambda x_t, t: half(x_t.half(), t).float()  # noqa: E731
    x = torch.rand(flags.get("in_channels", 3), size, size, device=device) * 2 - 1
    num = batches * batch
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    smoothers = {f"dk.certify, {names[dtype]} {'compiled' if comp else 'eager'}": DenoisedSmoothing(
        clf, model, sched, sigma, num_classes, dtype=dtype, compile=comp)
        for dtype in dtypes for comp in ((False, True) if compile else (False,))}
    pub = f"DDS loop, published ({'fp16' if gpu else 'fp32'} eager)"
    cases = {pub: lambda: published_dds_counts(published_unet, clf, x, t_star, num, batch, tables, num_classes)}
    for name, sm in smoothers.items():
        cases[name] = (lambda sm: lambda: sm.sample_counts(x, num, batch, seed=0))(sm)
    log(f"[bench-certify] {harness.device_name(device)}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-"
        f"param UNet at {size}x{size}, {classifier}, sigma {sigma} (t* = {t_star}), {num} noise samples per call "
        f"in batches of {batch}")
    rows, sps = [], {}
    result = dict(env=harness.environment(device), flags=flags, classifier=classifier, batch=batch, size=size,
                  sigma=sigma, t_star=t_star, samples_per_call=num, reps=reps, dtypes=[str(d) for d in dtypes],
                  rows=rows, complete=False)
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for name, fn in cases.items():
            tm = harness.time_fn(fn, reps=reps, warmup=warmup, device=device, flush=False)
            sps[name] = num / (tm.ms * 1e-3)
            _keep_row(result, dict(impl=name, ms=tm.ms, first_call_ms=tm.first_ms, samples_per_s=sps[name],
                                   images_per_s=sps[name], vs_published=sps[name] / sps[pub]), json_path)
            log(f"[bench-certify] {name:<36} {tm.ms:10.1f} ms  {sps[name]:8.1f} samples/s")
    print(f"{harness.device_name(device)} ({device.type}), torch {torch.__version__}; certify's noise samples at "
          f"sigma {sigma} (t* = {t_star}), batch {batch} at {size}x{size}, {classifier}; median of {reps}")
    w = max(len(r["impl"]) for r in rows)
    for r in rows:
        print(f"{r['impl']:<{w}}  {r['ms']:10.1f} ms  {r['samples_per_s']:8.1f} samples/s  "
              f"{r['vs_published']:5.2f}x the published DDS loop")
    result["complete"] = True
    if json_path:
        write_json(result, json_path)
        log(f"[bench-certify] wrote {json_path}")
    return result
