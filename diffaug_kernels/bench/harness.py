"""Benchmark harness: the published eager code, its torch.compile'd twin and every fused backend, on one table.

The baselines are what DiffAug runs today: guided-diffusion's q_sample and _predict_xstart_from_eps, with its
extract_into_tensor (numpy table -> tensor -> gather -> float -> broadcast) and a torchvision-style normalise
built per call. They keep that code's dtype behaviour: float32 tables times bf16 data give a float32 result,
so with bf16 inputs the baselines write float32 while the fused ops write bf16. GB/s always counts the bytes
the op needs (inputs read once, output in the input dtype), so every row of a table divides the same bytes.
"""
from __future__ import annotations

import datetime
import functools
import glob
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..ops import IMAGENET_NORM, forward_noise, group_norm_silu, philox_normal, reverse_step, tweedie
from ..ops import forward_noise_multi as dk_forward_noise_multi
from ..schedule import NoiseSchedule
from ..utils import write_json

OPS = ("forward_noise", "tweedie")  # the default table
# + the DiffAug-Ensemble expansion (K = 10 times), the sampler's reverse step and the UNet's norm + SiLU, on request
ALL_OPS = OPS + ("forward_noise_multi", "reverse_step", "group_norm_silu")
DE_TIMES = tuple(range(0, 451, 50))
EAGER, COMPILED, AUTO = "eager (published)", "compiled (published)", "fused (auto)"
UNFUSED = "unfused (philox_normal)"  # reverse_step's noise by dk.philox_normal, then torch's arithmetic: its numbers
SAME_COPY = "copy (same bytes)"  # torch's copy moving the op's bytes: the ceiling at this size, not at 1 GB


# ------------------------------------------------------------------------------ published baselines
def extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """guided-diffusion's helper, verbatim in behaviour: a fresh host->device table copy on every call."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def published_forward_noise(x0, t, np_sqrt_ac, np_sqrt_1m_ac):
    """guided-diffusion GaussianDiffusion.q_sample with noise=None (torch.randn_like)."""
    noise = torch.randn_like(x0)
    return (extract_into_tensor(np_sqrt_ac, t, x0.shape) * x0
            + extract_into_tensor(np_sqrt_1m_ac, t, x0.shape) * noise)


def published_tweedie(x_t, model_output, t, np_sqrt_recip_ac, np_sqrt_recipm1_ac, normalize=None):
    """p_mean_variance's x0 path for a learned-sigma eps model (split, predict, clamp), then the classifier's
    (x + 1) / 2 and torchvision-style Normalize with mean/std tensors built per call."""
    C = x_t.shape[1]
    eps, _model_var = torch.split(model_output, C, dim=1)
    x = (extract_into_tensor(np_sqrt_recip_ac, t, x_t.shape) * x_t
         - extract_into_tensor(np_sqrt_recipm1_ac, t, x_t.shape) * eps)
    x = x.clamp(-1, 1)
    if normalize is not None:
        x = (x + 1) / 2
        mean = torch.as_tensor(normalize[0], dtype=x.dtype, device=x.device)
        std = torch.as_tensor(normalize[1], dtype=x.dtype, device=x.device)
        x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    return x


def published_forward_noise_multi(x0, times, np_sqrt_ac, np_sqrt_1m_ac):
    """The DiffAug-Ensemble expansion as the published evaluation does it: q_sample once per t."""
    return torch.cat([published_forward_noise(x0, torch.full((x0.shape[0],), int(t), device=x0.device),
                                              np_sqrt_ac, np_sqrt_1m_ac) for t in times])


def published_reverse_step(x0_hat, x_t, t, np_coef1, np_coef2, sigma, shift):
    """guided-diffusion's p_sample with a learned variance and classifier guidance: the posterior mean from
    x0_hat (extract_into_tensor per call), condition_mean's shift, then mean + nonzero_mask * sigma *
    torch.randn_like(x_t) (sigma = exp(0.5 * model_log_variance), made by the step before)."""
    mean = (extract_into_tensor(np_coef1, t, x_t.shape) * x0_hat + extract_into_tensor(np_coef2, t, x_t.shape) * x_t
            + shift.float())
    noise = torch.randn_like(x_t)
    nonzero_mask = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero_mask * sigma * noise


def unfused_reverse_step(x0_hat, x_t, c1, c2, sigma, shift):
    """dk.reverse_step's update unfused: the noise tensor by dk.philox_normal, then torch's arithmetic in float32
    (the fused op's numbers, term for term)."""
    z = philox_normal(x_t.shape, device=x_t.device)
    view = (-1, *([1] * (x_t.dim() - 1)))
    return (c1.view(view) * x0_hat + c2.view(view) * x_t + sigma * z + shift).to(x_t.dtype)


def published_group_norm_silu(h, num_groups, weight, bias, scale, shift):
    """guided-diffusion's ResBlock out_layers with use_scale_shift_norm: GroupNorm32 (float32, cast back to h's
    dtype), then h * (1 + scale) + shift and SiLU in h's dtype."""
    h = F.group_norm(h.float(), num_groups, weight.float(), bias.float()).to(h.dtype)
    return F.silu(h * (1 + scale) + shift)


@functools.cache
def compiled(op: str) -> Callable:
    """torch.compile of a published baseline, made once per process; dynamic=False so each shape gets
    static-shape kernels, as a user compiling one training shape would."""
    # Every shape x dtype is one more recompile of the same code: past dynamo's limit (8) it would silently
    # run eager under the "compiled" label, so raise the limit and make hitting it an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    fn = {"forward_noise": published_forward_noise, "tweedie": published_tweedie,
          "forward_noise_multi": published_forward_noise_multi, "reverse_step": published_reverse_step,
          "group_norm_silu": published_group_norm_silu}[op]
    return torch.compile(fn, dynamic=False)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    ms: float  # median of the timed repetitions
    min_ms: float
    first_ms: float  # the first warm-up call: includes torch.compile's compile time where there is one


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _llc_bytes() -> int:
    """The largest CPU cache (sysfs), 0 where unknown."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            v = open(path).read().strip().upper()
            sizes.append(int(v[:-1]) * {"K": 1 << 10, "M": 1 << 20}[v[-1]] if v[-1] in "KM" else int(v))
        except (OSError, ValueError):
            pass
    return max(sizes, default=0)


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    # GPU: 256 MB, as triton.testing.do_bench; CPU: twice the last-level cache, at least 64 MB
    nbytes = 256 << 20 if device.type == "cuda" else max(2 * _llc_bytes(), 64 << 20)
    return torch.empty(nbytes // 4, dtype=torch.int32, device=device)


def flush_cache(device="cpu") -> None:
    """Evicts the caches by writing a buffer larger than them, so every timed call reads its inputs from
    memory as a training step does (inputs fresh from the loader), and so GB/s compares with copy bandwidth."""
    _flush_buffer(torch.device(device)).zero_()


def time_fn(fn: Callable[[], object], reps: int = 10, warmup: int = 2, device="cpu", flush: bool = True) -> Timing:
    """Median time of fn() over reps calls after warmup calls, caches flushed before each timed call
    (untimed) unless flush=False. CPU: perf_counter; CUDA: one event pair per call, one sync at the end, and
    the GPU held busy (torch.cuda._sleep) before each start event for 3x the host time of the last warm-up
    call (0.1-20 ms), so the host has queued the call's kernels before the clock starts: the span is GPU
    time, not the host's launch cost (which tools/floor.py measures on its own). A fixed 0.1 ms spin is too
    short: a Triton launch's ~0.3 ms of host time on an H200 machine would fall into the span (RESULTS.md)."""
    device = torch.device(device)
    sync(device)
    t0 = time.perf_counter()
    fn()
    host_ms = (time.perf_counter() - t0) * 1e3  # host time of the last warm-up call (queued, not finished)
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(max(warmup - 1, 0)):
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
    sync(device)
    if device.type == "cuda":
        spin_cycles = int(min(20.0, max(0.1, 3 * host_ms)) * 2e6)  # at ~2 GHz, about that many ms
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in ev:
            if flush:
                flush_cache(device)  # queued before start, so outside the timed span
            torch.cuda._sleep(spin_cycles)  # GPU spin: the host gets ahead (outside the span)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in ev]
    else:
        times = []
        for _ in range(reps):
            if flush:
                flush_cache(device)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), first)


def copy_bandwidth(device="cpu", nbytes: Optional[int] = None, reps: int = 10) -> float:
    """GB/s of out.copy_(src) on buffers far larger than the caches (bytes read + written): the ceiling.
    Default size: 1 GB on GPUs; on CPUs 256 MB, or 4x the last-level cache where that is larger than 64 MB."""
    device = torch.device(device)
    nbytes = nbytes or max(256 << 20, 4 * _llc_bytes() if device.type == "cpu" else 1 << 30)
    src = torch.rand(nbytes // 4, dtype=torch.float32, device=device)  # random data: no zero pages, no zeros
    out = torch.empty_like(src)
    t = time_fn(lambda: out.copy_(src), reps=reps, warmup=2, device=device, flush=False)  # far beyond caches
    return 2 * nbytes / (t.ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------- the cases
def fused_backends(device) -> list[str]:
    """Fused backends that run on this device (everything available but the reference). Triton on CPU is its
    interpreter (TRITON_INTERPRET=1, a test device, orders of magnitude slow): not a benchmark target."""
    device = torch.device(device)
    return [n for n in ops.available_backends() if n != "reference" and ops.usable(n, device)
            and not (n == "triton" and device.type == "cpu")]


@dataclass
class Case:
    """One op on one shape and dtype: zero-argument callables per implementation, all on the same inputs."""

    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int  # bytes the op must move: inputs read once, output written once in the input dtype
    impls: dict = field(default_factory=dict)
    auto: Optional[tuple] = None  # (op key, input) of the "fused (auto)" row: ops.auto_choice names its pick
    inputs: dict = field(default_factory=dict)  # x, t (and model_output, times): what every row computes on


LAYOUTS = ("contiguous", "channels_last")


def make_case(op: str, shape: Sequence[int], dtype: torch.dtype, device="cpu",
              schedule: Optional[NoiseSchedule] = None, backends: Optional[Sequence[str]] = None,
              layout: str = "contiguous") -> Case:
    """Inputs and callables for one benchmark: published eager, published compiled, each fused backend.
    tweedie is the DiffAug case: eps prediction, learned sigma (2C channels), clip, ImageNet normalise.
    layout: the memory format of every image-shaped input ("channels_last": the compiled UNet's)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    device = torch.device(device)

    def lay(v: torch.Tensor) -> torch.Tensor:
        return v.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else v

    sched = schedule or NoiseSchedule.linear(1000)
    backends = fused_backends(device) if backends is None else list(backends)
    shape = tuple(int(s) for s in shape)
    B, C = shape[0], shape[1]
    t = torch.randint(0, sched.num_timesteps, (B,), device=device)  # a fresh t per sample, as in training
    x = lay(torch.randn(shape, device=device).to(dtype))
    elem = x.element_size() * x.numel()
    if op == "forward_noise":
        tabs = (sched._np["sqrt_alphas_cumprod"], sched._np["sqrt_one_minus_alphas_cumprod"])
        case = Case(op, shape, dtype, 2 * elem)
        case.impls[EAGER] = lambda: published_forward_noise(x, t, *tabs)
        case.impls[COMPILED] = lambda: compiled(op)(x, t, *tabs)
        for name in backends:
            case.impls[f"fused ({name})"] = lambda name=name: forward_noise(x, t, sched, backend=name)
    elif op == "tweedie":
        mo = lay(torch.randn((B, 2 * C, *shape[2:]), device=device).to(dtype))
        tabs = (sched._np["sqrt_recip_alphas_cumprod"], sched._np["sqrt_recipm1_alphas_cumprod"])
        # ImageNet's statistics for RGB; other channel counts get a per-channel normalisation of the same cost
        norm = IMAGENET_NORM if C == 3 else ((0.5,) * C, (0.25,) * C)
        case = Case(op, shape, dtype, 3 * elem)  # x_t, the eps half of model_output, out
        case.impls[EAGER] = lambda: published_tweedie(x, mo, t, *tabs, normalize=norm)
        case.impls[COMPILED] = lambda: compiled(op)(x, mo, t, *tabs, normalize=norm)
        for name in backends:
            case.impls[f"fused ({name})"] = lambda name=name: tweedie(x, mo, t, sched, prediction="eps", clip=True,
                                                         normalize=norm, backend=name)
    elif op == "forward_noise_multi":
        tabs = (sched._np["sqrt_alphas_cumprod"], sched._np["sqrt_one_minus_alphas_cumprod"])
        K = len(DE_TIMES)
        case = Case(op, shape, dtype, (1 + K) * elem)  # x0 read once, K noisy copies written
        case.impls[EAGER] = lambda: published_forward_noise_multi(x, DE_TIMES, *tabs)
        case.impls[COMPILED] = lambda: compiled(op)(x, DE_TIMES, *tabs)
        for name in backends:
            case.impls[f"fused ({name})"] = lambda name=name: dk_forward_noise_multi(x, DE_TIMES, sched, backend=name)
    elif op == "reverse_step":  # a guided DDPM step with a learned variance: x0_hat, x_t, sigma, shift, out
        t = torch.randint(1, sched.num_timesteps, (B,), device=device)
        ac = sched.alphas_cumprod.numpy()
        ac_prev, betas = np.append(1.0, ac[:-1]), sched.betas.numpy()
        tabs = (betas * np.sqrt(ac_prev) / (1 - ac), (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac))
        c1, c2 = (torch.from_numpy(tab).to(device, torch.float32)[t] for tab in tabs)
        x0_hat = lay(torch.rand(shape, device=device).mul(2).sub(1).to(dtype))
        sigma = lay(torch.rand(shape, device=device).mul(0.1).to(dtype))
        shift = lay(torch.randn(shape, device=device).mul(0.01).to(dtype))
        case = Case(op, shape, dtype, 5 * elem)
        case.impls[EAGER] = lambda: published_reverse_step(x0_hat, x, t, *tabs, sigma, shift)
        case.impls[COMPILED] = lambda: compiled(op)(x0_hat, x, t, *tabs, sigma, shift)
        case.impls[UNFUSED] = lambda: unfused_reverse_step(x0_hat, x, c1, c2, sigma, shift)
        for name in backends:
            case.impls[f"fused ({name})"] = lambda name=name: reverse_step(x0_hat, x, c1, c2, sigma, shift,
                                                                          backend=name)
    elif op == "group_norm_silu":  # ADM's ResBlock output norm with scale-shift: 32 groups (fewer for other C)
        groups = math.gcd(C, 32)
        weight, bias = 1 + 0.1 * torch.randn(C, device=device), 0.1 * torch.randn(C, device=device)
        scale, shift = (0.1 * torch.randn(B, C, 1, 1, device=device).to(dtype) for _ in range(2))
        case = Case(op, shape, dtype, 2 * elem)
        case.impls[EAGER] = lambda: published_group_norm_silu(x, groups, weight, bias, scale, shift)
        case.impls[COMPILED] = lambda: compiled(op)(x, groups, weight, bias, scale, shift)
        for name in backends:  # csrc/'s CPU kernel, Triton's; the "cuda" backend has none and runs the reference
            case.impls[f"fused ({name})"] = lambda name=name: group_norm_silu(x, groups, weight, bias, 1e-5, scale,
                                                                             shift, backend=name)
    else:
        raise ValueError(f"op must be one of {ALL_OPS}, got {op!r}")
    # copy_bandwidth's 1 GB copy amortises the fixed cost of a launch (start-up, the last wave); an op's
    # few hundred MB pay it, and so does a copy of the same bytes (half read, half written): that row shows
    # how much of an op's gap to the ceiling is its size rather than its kernel
    case.inputs = dict(x=x, t=t, schedule=sched, **({"times": DE_TIMES} if op == "forward_noise_multi" else {}),
                       **({"model_output": mo, "normalize": norm} if op == "tweedie" else {}),
                       **(dict(x0_hat=x0_hat, c1=c1, c2=c2, sigma=sigma, shift=shift) if op == "reverse_step" else {}),
                       **(dict(num_groups=groups, weight=weight, bias=bias, scale=scale, shift=shift)
                          if op == "group_norm_silu" else {}))
    src = torch.rand(case.nbytes // 2 // x.element_size(), device=device).to(dtype)
    dst = torch.empty_like(src)
    case.impls = {SAME_COPY: lambda: dst.copy_(src), **case.impls}
    if len(backends) > 1:  # backend="auto" times the candidates on first use and keeps the fastest
        case.impls[AUTO] = _with_backend(case.impls[f"fused ({backends[0]})"], "auto")
        case.auto = (op if op != "forward_noise_multi" else f"{op}{len(DE_TIMES)}", x)
    return case


def _with_backend(fn, backend: str):
    """fn (a fused row's callable, backend bound as its default argument `name`) with another backend."""
    return lambda: fn(name=backend)


# ------------------------------------------------------------------------------------------ report
def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> Optional[dict]:
    """The source tree's commit and whether it has uncommitted changes (a result names the code behind it).
    DIFFAUG_GIT_COMMIT, when set, names the commit instead: a copy of the tree made for a remote machine
    can carry a stale .git (the lent GPU machines' copies did)."""
    if os.environ.get("DIFFAUG_GIT_COMMIT"):
        return {"commit": os.environ["DIFFAUG_GIT_COMMIT"], "dirty": None, "source": "DIFFAUG_GIT_COMMIT"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        def run(*a):
            return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10)

        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    device = torch.device(device)
    from .. import __version__

    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": np.__version__,
        "diffaug_kernels": __version__,
        "git": _git_state(),
        "fused_backends": fused_backends(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        # inductor settings given through the environment (e.g. TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1): they
        # change what the compiled rows measure
        "inductor_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_")},
        # the planar CUDA kernels' variants when set (tools/variants.py); None: the built-in defaults
        "cuda_tweedie_units": os.environ.get("DIFFAUG_CUDA_TWEEDIE_UNITS"),
        "cuda_noise_units": os.environ.get("DIFFAUG_CUDA_NOISE_UNITS"),
    }


def cpu_seconds():
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process) from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def other_cpu_fraction(c0, c1, wall_s: float) -> Optional[float]:
    """Share of the machine's CPU time that other processes (or the hypervisor: steal) took during the run:
    on a shared CPU machine they take cores from the timed code."""
    if c0 is None or c1 is None or wall_s <= 0:
        return None
    return max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / (wall_s * (os.cpu_count() or 1))


def headline_ratios(images_per_s: dict, pairs: dict) -> dict:
    """The "ratios" object of a benchmark's JSON: {name: images_per_s[a] / images_per_s[b]} for each
    name: (a, b) in pairs whose two rows were both measured in this run (a ratio of a row not run is left out,
    never guessed or carried over from another run)."""
    return {name: images_per_s[a] / images_per_s[b] for name, (a, b) in pairs.items()
            if a in images_per_s and b in images_per_s}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_table(rows: list[dict]) -> str:
    head = ("op", "shape", "dtype", "impl", "ms", "GB/s", "% copy", "% copy same bytes", "vs eager")
    body = [(r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["impl"], f"{r['ms']:.3f}",
             f"{r['gb_s']:.1f}", f"{r['pct_copy']:.1f}%",
             f"{100 * r['vs_same_bytes_copy']:.0f}%" if "vs_same_bytes_copy" in r else "-",  # older files lack it
             f"{r['speedup']:.2f}x") for r in rows]
    w = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    left = 4  # text columns left-aligned, numbers right-aligned

    def fmt(cells):
        return "  ".join(c.ljust(w[i]) if i < left else c.rjust(w[i]) for i, c in enumerate(cells))

    lines = [fmt(head), "  ".join("-" * n for n in w)]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and (r["op"], r["shape"], r["dtype"]) != prev:
            lines.append("")  # a blank line between groups keeps the ratios readable
        prev = (r["op"], r["shape"], r["dtype"])
        lines.append(fmt(cells))
    return "\n".join(lines)


def run_bench(shapes=((64, 3, 224, 224), (256, 3, 32, 32)), dtypes=(torch.float32, torch.bfloat16), reps: int = 10,
              device="cpu", json_path=None, warmup: int = 2, op_names=OPS, flush: bool = True,
              print_table: bool = True, progress: bool = True, backends: Optional[Sequence[str]] = None,
              layout: str = "contiguous") -> dict:
    """Times every implementation of every op on every shape x dtype (backends: the fused ones to time, default
    every one for the device; layout: the inputs' memory format, see make_case); prints one table; writes JSON if
    asked.
    Returns {"env": ..., "copy_gb_s": ..., "rows": [...]}; a row's vs_same_bytes_copy is the same-bytes copy's
    time over its own (1.0: as fast as torch moves those bytes)."""
    device = torch.device(device)
    env = environment(device)
    copy_gbs = copy_bandwidth(device)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    log(f"[bench] {env['device_name']} ({device.type}), {env['threads']} threads, torch {env['torch']}, "
        f"copy bandwidth {copy_gbs:.1f} GB/s")
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    rows = []
    sched = NoiseSchedule.linear(1000)
    for op in op_names:
        for shape in shapes:
            for dtype in dtypes:
                case = make_case(op, shape, dtype, device, sched, backends, layout)
                case_rows = []
                for impl, fn in case.impls.items():
                    tm = time_fn(fn, reps=reps, warmup=warmup, device=device, flush=flush)
                    gbs = case.nbytes / (tm.ms * 1e-3) / 1e9
                    row = dict(op=op, shape=list(case.shape), dtype=_dtype_name(dtype), impl=impl, ms=tm.ms,
                               min_ms=tm.min_ms, first_call_ms=tm.first_ms, bytes=case.nbytes, gb_s=gbs,
                               pct_copy=100 * gbs / copy_gbs)
                    if impl == AUTO:
                        row["impl"] = f"fused (auto: {ops.auto_choice(*case.auto)})"
                    case_rows.append(row)
                    log(f"[bench] {op:<13} {'x'.join(map(str, shape)):<14} {row['dtype']:<8} {impl:<20} "
                        f"{tm.ms:9.3f} ms  {gbs:7.1f} GB/s  (first call {tm.first_ms:.0f} ms)")
                ms = {impl: r["ms"] for impl, r in zip(case.impls, case_rows)}
                for r in case_rows:
                    r.update(speedup=ms[EAGER] / r["ms"], vs_same_bytes_copy=ms[SAME_COPY] / r["ms"])
                rows += case_rows
                del case  # free this case's inputs before the next one
    other = other_cpu_fraction(cpu0, cpu_seconds(), time.perf_counter() - wall0)
    if other is not None and other > 0.05:
        log(f"[bench] warning: other processes used {100 * other:.0f}% of the CPUs during the run; "
            "the timings are noisy")
    result = {"env": env, "copy_gb_s": copy_gbs, "reps": reps, "warmup": warmup, "cache_flushed": flush,
              "layout": layout, "other_cpu_fraction": other, "rows": rows}
    if print_table:
        print(f"{env['device_name']} ({device.type}), {env['threads']} threads, torch {env['torch']}; "
              f"copy bandwidth {copy_gbs:.1f} GB/s; {layout} inputs; median of {reps} reps"
              f"{', caches flushed before each' if flush else ', warm caches'}")
        print(format_table(rows), flush=True)
    if json_path is not None:
        write_json(result, json_path)
        log(f"[bench] wrote {json_path}")
    return result


__all__ = ["SAME_COPY", "Case", "Timing", "compiled", "copy_bandwidth", "environment", "flush_cache",
           "format_table", "fused_backends", "headline_ratios", "make_case", "published_forward_noise",
           "published_tweedie", "run_bench", "time_fn"]
