"""DiffAug-Ensemble (DE): average the classifier's softmax over DiffAug'd copies of the input at several t."""
from __future__ import annotations

import time
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .augment import DiffAug
from .ops import checks
from .utils import eval_mode

DEFAULT_TIMES = tuple(range(0, 451, 50))

# (model id, compiled, device, per-image shape, dtype, autocast dtype, batch, total rows) -> (a weak reference
# to the model, rows per UNet call), measured once; the reference tells a recycled id from the same model
CHUNKS: dict = {}


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "can't allocate memory" in str(e)))


def pick_chunk(aug: DiffAug, x_t: Tensor, t: Tensor, batch: int) -> int:
    """Rows per UNet call for the expansion, chosen once per model, device and shape (candidates B, 2B, 4B, ...,
    all rows), within what memory holds: a candidate that runs out of memory ends the search.

    Eager model: bigger calls are not always faster (on a 2-core CPU one fp32 call holding all 9 times of an
    8M-parameter ADM UNet at 32x32 runs at 0.6-0.8x the per-t loop; RESULTS.md), so each candidate is timed
    (one warm-up call, then the best of two) and the best rows per second wins. Compiled model
    (DiffAug(compile=True)): every new size would be compiled (and captured as a CUDA graph) just to be timed,
    so the largest candidate that fits is taken untimed (on the CPU, bench-ensemble: all 9 times in one compiled
    call, 1.14x the compiled per-t loop)."""
    total = x_t.shape[0]
    key = (id(aug.model), aug.compiled, x_t.device, tuple(x_t.shape[1:]), x_t.dtype, aug.dtype, batch, total)
    hit = CHUNKS.get(key)
    if hit is not None and hit[0]() is aug.model:
        return hit[1]
    cands, c = [], batch
    while c < total:
        cands.append(c)
        c *= 2
    cands.append(total)
    if aug.compiled:
        cands.reverse()
    best, best_rate = None, 0.0
    with torch.no_grad():
        for c in cands:
            run = lambda: aug.denoise(x_t[:c], t[:c])  # noqa: E731
            try:
                run()  # warm-up at this size (compile, cuDNN algorithm search, allocator): not timed
                rate = float("inf") if aug.compiled else c / min(_time_call(run, x_t.device) for _ in range(2))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                if not _is_oom(e):
                    raise
                if x_t.is_cuda:
                    torch.cuda.empty_cache()
                if aug.compiled:
                    continue  # try the next smaller size
                break  # larger sizes would not fit either
            if rate > best_rate:
                best, best_rate = c, rate
            if aug.compiled:
                break
    if best is None:
        raise torch.OutOfMemoryError(f"DiffAug-Ensemble: even {cands[-1 if aug.compiled else 0]} rows per UNet "
                                     f"call ran out of memory; pass a smaller batch")
    CHUNKS[key] = (weakref.ref(aug.model), best)
    return best


@torch.no_grad()
def diffaug_ensemble(classifier: Callable[[Tensor], Tensor], aug: DiffAug, x: Tensor,
                     times: Sequence[int] = DEFAULT_TIMES, preprocess: Optional[Callable[[Tensor], Tensor]] = None,
                     max_batch: Optional[int] = None, seed=None) -> Tensor:
    """Mean of softmax(classifier(preprocess(x0_hat_t))) over t in times; t = 0 is the raw image.

    x: [B, C, H, W] in [-1, 1]. All noisy times are expanded at once with dk.forward_noise_multi and
    denoised in as few UNet calls as the budget allows: max_batch rows per call if given, else the chunk
    measured fastest on this device (pick_chunk). Returns [B, num_classes] probabilities. The classifier and
    the score model run in eval mode (a classifier left in train mode would normalise each chunk by its own
    batch statistics, and update them); each module's mode is restored afterwards. The score model is called
    without labels: DE needs an unconditional one (a class-conditional model would need the very label the
    classifier is asked for)."""
    if not isinstance(aug, DiffAug):
        raise TypeError(f"aug must be a dk.DiffAug, got {type(aug).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating-point tensor [B, C, ...], got "
                         + (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__))
    if isinstance(times, Tensor):
        times = times.tolist()
    if checks.is_int(times):
        times = [times]
    times = list(times)
    if not times:
        raise ValueError("times must not be empty")
    if not all(checks.is_int(t) for t in times):
        raise TypeError(f"times must hold integers, got {times!r}")
    times = [int(t) for t in times]
    if max_batch is not None and (not checks.is_int(max_batch) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    pre = preprocess or (lambda v: v)

    def probs(v: Tensor) -> Tensor:
        logits = classifier(pre(v))
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != v.shape[0]:
            raise ValueError(f"classifier must return logits [N, num_classes] for N images; for {v.shape[0]} "
                             f"images it returned {tuple(logits.shape) if isinstance(logits, Tensor) else logits!r}")
        return torch.softmax(logits.float(), dim=-1)

    with eval_mode(classifier, aug):
        return _ensemble(probs, aug, x, times, max_batch, seed)


def _ensemble(probs, aug: DiffAug, x: Tensor, times: list, max_batch, seed) -> Tensor:
    B = x.shape[0]
    total = None
    n_raw = sum(t == 0 for t in times)
    if n_raw:
        total = probs(x) * n_raw
    noisy = [t for t in times if t != 0]
    if noisy:
        x_t = ops.forward_noise_multi(x, noisy, aug.schedule, seed=seed, backend=aug.backend)
        t = torch.tensor(noisy, device=x.device).repeat_interleave(B)
        chunk = max_batch or pick_chunk(aug, x_t, t, B)
        for s in range(0, x_t.shape[0], chunk):
            xs, ts = x_t[s:s + chunk], t[s:s + chunk]
            x0 = ops.tweedie(xs, aug.denoise(xs, ts), ts, aug.schedule, aug.prediction, aug.clip, out_dtype=x.dtype,
                             backend=aug.backend)
            p = probs(x0)
            rows = torch.arange(s, s + xs.shape[0], device=x.device) % B  # which image each row belongs to
            part = torch.zeros(B, p.shape[-1], device=p.device).index_add_(0, rows, p)
            total = part if total is None else total + part
    return total / len(times)
