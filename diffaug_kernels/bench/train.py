"""The DiffAug training step end to end (bench-train): augmentation of the batch, then the classifier forward and
backward on the clean images and x0_hat, then the optimizer step, in images/s, the published way against the
package's, in one run, with the step split into its parts.

Rows: the published step (guided-diffusion's q_sample + p_sample pred_xstart around the UNet, fp16 eager on a GPU
as its use_fp16 runs it, fp32 eager on the CPU; the classifier fp32 eager in NCHW), the base of every ratio; then,
for each of dtypes, the package's (dk.DiffAug(compile=True, dtype) and the classifier channels_last under
torch.compile, under autocast in dtype when that is not float32, as train-classifier --amp runs it). Both steps
compute the authors' objective, loss = CE(f(x), y) + CE(f(x0_hat), y), the two halves through the classifier as
one batch (train-classifier's train_step), with the same optimizer (SGD with momentum 0.9, or AdamW), each row on
its own copy of the same initial classifier.

The rows are timed interleaved, one step of each in turn per round (time_steps), so a shared machine's changing
load falls on every row alike. The split: every timed step runs as augmentation | classifier forward + backward
(the cat, forward, both CE terms, backward) | optimizer step and the rest (step, zero_grad), the device
synchronised at each boundary, so each part is measured alone and the three add up to the step. A row gives the
median of its steps (images/s: B clean images per step, B the batch) and each part's own median, whose sum
differs from the step's median when the steps vary (split_share: a part's median over the step's).

CPU default: the 8M-parameter UNet at 32x32, a timm resnet18 with 10 classes, batch 16, float32 only (a CPU
without AVX-512 BF16 emulates bf16 convolutions, several times slower than fp32: RESULTS.md). GPU: the paper's
256x256 unconditional UNet at 224x224, a timm resnet50 with 1000 classes, batch 64, bfloat16.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..augment import DiffAug
from ..models import create_adm_unet
from ..schedule import NoiseSchedule
from ..utils import write_json
from . import harness
from . import model as bench_model

PHASES = ("augmentation", "classifier forward + backward", "optimizer step and other")
OPTIMIZERS = ("sgd", "adamw")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class TrainStep:
    """One DiffAug training step in three parts (PHASES): augment() -> x0_hat; classifier(x0_hat): forward of
    cat(x, x0_hat), loss = CE(f(x), y) + CE(f(x0_hat), y), backward; optimizer_step(): step, zero_grad."""

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor], net: torch.nn.Module, optimizer,
                 x: torch.Tensor, y: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False):
        self.augment_fn, self.net, self.optimizer, self.x, self.y = augment, net, optimizer, x, y
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        self.loss = None

    def augment(self) -> torch.Tensor:
        with torch.no_grad():
            return self.augment_fn(self.x)

    def classifier(self, x0_hat: torch.Tensor) -> None:
        B = self.x.shape[0]
        v = torch.cat([self.x, x0_hat.to(self.x.dtype)])
        if self.channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.net(v).float()
        loss = F.cross_entropy(logits[:B], self.y) + F.cross_entropy(logits[B:], self.y)
        loss.backward()
        self.loss = loss.detach()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.classifier(self.augment())
        self.optimizer_step()


def time_steps(steps: dict, reps: int, warmup: int, device, log=None) -> dict:
    """{name: TrainStep} -> {name: timing}. Each step first runs warmup times untimed (the first call's time kept:
    compiling); then reps rounds, each timing one step of every row in turn, so a change in the machine's load
    (a shared CPU) falls on all rows alike rather than on whichever row ran then. Each part of a timed step is
    timed with the device synchronised before and after it. A timing holds the medians: ms (the whole step),
    split_ms {part: ms}; and min_ms, first_call_ms, step_ms (every timed step, round by round)."""
    device = torch.device(device)
    first = {}
    for name, step in steps.items():
        harness.sync(device)
        t0 = time.perf_counter()
        step()
        harness.sync(device)
        first[name] = (time.perf_counter() - t0) * 1e3
        for _ in range(max(warmup - 1, 0)):
            step()
        if log is not None:
            log(f"[bench-train] warmed up {name} (first step {first[name] / 1e3:.1f} s)")
    parts = {name: {p: [] for p in PHASES} for name in steps}
    totals = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            harness.sync(device)
            t0 = time.perf_counter()
            x0_hat = step.augment()
            harness.sync(device)
            t1 = time.perf_counter()
            step.classifier(x0_hat)
            harness.sync(device)
            t2 = time.perf_counter()
            step.optimizer_step()
            harness.sync(device)
            t3 = time.perf_counter()
            for p, ms in zip(PHASES, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)):
                parts[name][p].append(ms)
            totals[name].append((t3 - t0) * 1e3)
    return {name: dict(ms=statistics.median(totals[name]), min_ms=min(totals[name]), first_call_ms=first[name],
                       split_ms={p: statistics.median(v) for p, v in parts[name].items()}, step_ms=totals[name])
            for name in steps}


def default_dtypes(gpu: bool) -> tuple:
    """bfloat16 on a GPU; float32 on a CPU (bf16 there: --dtypes float32,bfloat16 on one with AVX-512 BF16)."""
    return (torch.bfloat16,) if gpu else (torch.float32,)


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def run_train(device=None, batch: Optional[int] = None, size: Optional[int] = None, flags: Optional[dict] = None,
              classifier: Optional[str] = None, reps: int = 5, warmup: int = 2,
              dtypes: Optional[Sequence[torch.dtype]] = None, optimizer: str = "sgd", compile: bool = True,
              json_path: Optional[str] = None) -> dict:
    """Times the DiffAug training step the published way and the package's (module docstring) at the same batch,
    UNet weights and initial classifier. compile=False runs the package's rows eager (a quick check, not the
    package's way). Returns (and writes to json_path) the env, settings, rows (ms, images_per_s, vs_published,
    split_ms, split_share, first_call_ms, final loss) and ratios: "train_step_vs_published", the fastest package
    row's images/s over the published step's (its row named by headline_row). vs_published_paired, the median over
    rounds of the published step's time over the row's in the same round, is the steadier ratio on a shared
    machine whose load changes during the run."""
    import timm

    device, gpu, flags = bench_model.device_and_unet(device, flags)
    size = size or (224 if gpu else flags["image_size"])
    bench_model.check_size(size, flags)
    batch = batch or (64 if gpu else 16)
    classifier = classifier or ("resnet50" if gpu else "resnet18")
    dtypes = tuple(dtypes or default_dtypes(gpu))
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    num_classes = 1000 if gpu else 10
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    unet = create_adm_unet(**flags).to(device).eval().requires_grad_(False)  # the frozen score model
    net0 = timm.create_model(classifier, pretrained=False, num_classes=num_classes).to(device).train()
    sched = NoiseSchedule.linear(1000)
    tables = bench_model.published_tables(sched)
    x = torch.rand(batch, flags.get("in_channels", 3), size, size, device=device) * 2 - 1
    y = torch.randint(0, num_classes, (batch,), device=device)

    published_unet = bench_model.fp16_copy(unet, flags, device) if gpu else unet
    pub_net = copy.deepcopy(net0)
    pub = f"published ({'fp16' if gpu else 'fp32'} eager DiffAug, fp32 eager NCHW classifier)"
    steps = {pub: lambda: TrainStep(lambda v: bench_model.published_diffaug(published_unet, v, tables, half=gpu),
                                    pub_net, make_optimizer(optimizer, pub_net.parameters()), x, y)}
    how = "compiled" if compile else "eager"
    for dtype in dtypes:
        name = f"dk ({DTYPE_NAMES[dtype]} {how} DiffAug, {how} channels_last {DTYPE_NAMES[dtype]} classifier)"

        def make(dtype=dtype):
            net = copy.deepcopy(net0).to(memory_format=torch.channels_last)
            aug = DiffAug(unet, sched, compile=compile, dtype=dtype)
            return TrainStep(aug, torch.compile(net) if compile else net, make_optimizer(optimizer, net.parameters()),
                             x, y, autocast_dtype=None if dtype == torch.float32 else dtype, channels_last=True)

        steps[name] = make
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    n_clf = sum(p.numel() for p in net0.parameters()) / 1e6
    log(f"[bench-train] {harness.device_name(device)}: {n_unet:.1f}M-param UNet at {size}x{size}, {classifier} "
        f"({n_clf:.1f}M params, {num_classes} classes), batch {batch} (+ {batch} x0_hat), {optimizer}")
    rows, ips = [], {}
    result = dict(env=harness.environment(device), flags=flags, classifier=classifier, num_classes=num_classes,
                  batch=batch, size=size, optimizer=optimizer, reps=reps, warmup=warmup, compiled=compile,
                  dtypes=[str(d) for d in dtypes], phases=list(PHASES), interleaved=True, rows=rows, ratios={},
                  complete=False)
    cpu0, wall0 = harness.cpu_seconds(), time.perf_counter()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # static graphs only, as the other benches
        made = {name: make_step() for name, make_step in steps.items()}
        timings = time_steps(made, reps, warmup, device, log)
    for name, tm in timings.items():
        ips[name] = batch / (tm["ms"] * 1e-3)
        paired = statistics.median(p / r for p, r in zip(timings[pub]["step_ms"], tm["step_ms"]))
        rows.append(dict(impl=name, **tm, images_per_s=ips[name], vs_published=ips[name] / ips[pub],
                         vs_published_paired=paired,
                         split_share={p: v / tm["ms"] for p, v in tm["split_ms"].items()},
                         loss=float(made[name].loss) if made[name].loss is not None else None))
        log(f"[bench-train] {name:<72} {tm['ms']:9.1f} ms  {ips[name]:8.1f} img/s")
    best = max((n for n in ips if n != pub), key=ips.get)
    result["ratios"] = harness.headline_ratios(ips, {"train_step_vs_published": (best, pub)})
    result.update(headline_row=best, complete=True,
                  other_cpu_fraction=harness.other_cpu_fraction(cpu0, harness.cpu_seconds(),
                                                                time.perf_counter() - wall0))
    print(f"{harness.device_name(device)} ({device.type}), torch {torch.__version__}; DiffAug training step, "
          f"{n_unet:.1f}M-param UNet, {classifier}, batch {batch} at {size}x{size}, {optimizer}; median of {reps}")
    w = max(len(r["impl"]) for r in rows)
    for r in rows:
        split = ", ".join(f"{p.split()[0]} {r['split_ms'][p]:.1f} ms ({100 * r['split_share'][p]:.0f}%)"
                          for p in PHASES)
        print(f"{r['impl']:<{w}}  {r['ms']:9.1f} ms  {r['images_per_s']:8.1f} img/s  {r['vs_published']:5.2f}x "
              f"(paired {r.get('vs_published_paired', 1.0):.2f}x)  [{split}]")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x ({best})")
    if json_path:
        write_json(result, json_path)
        log(f"[bench-train] wrote {json_path}")
    return result


__all__ = ["DTYPE_NAMES", "OPTIMIZERS", "PHASES", "TrainStep", "default_dtypes", "make_optimizer", "run_train",
           "time_steps"]
