"""FP8 (e4m3) 3x3 convolutions for a frozen score model: to_fp8(model, calibration) returns a copy of the model
whose 3x3 nn.Conv2d layers are FP8Conv2d modules; everything else (1x1 convolutions, attention, norms, linears)
is left as it is, and so (keep_ends, the default) are the model's first and last 3x3 convolutions, its input and
output convolutions: quantising x_t itself, or the prediction's last layer, costs most of the accuracy (to_fp8).

Numbers. Weights are quantised once to torch.float8_e4m3fn with a scale per tensor or per output channel
(granularity "tensor" | "channel"): scale = amax(|w|) / 448, 448 being e4m3's largest finite value. Each
convolution's input is quantised with one per-tensor scale, calibrated once: amax(|x|) over every calibration
batch (the largest value seen, no percentile: nothing seen in calibration saturates) divided by 448. Values are
divided by their scale and clamped to [-448, 448] before the cast (the cast alone would give NaN past 448:
e4m3fn has no infinity). The convolution accumulates in float32 (the kernel moves Hopper's FP8 MMA sums into
float32 once per K step) and applies the two scales and the bias after. The rounding to e4m3 turns tiny float32
differences (another batch size, another convolution algorithm) into a whole e4m3 step now and then: FP8 outputs
agree across such changes to the quantisation's accuracy, not to float32's.

Paths. emulate=True quantises and dequantises in float32, then runs the ordinary float32 convolution: the same
rounding as the FP8 kernel up to the order of float32 accumulation, on any device (the CPU included); the
accuracy harness (diffaug_kernels/bench/fp8.py) runs it. emulate=False runs the FP8 kernel
(diffaug_kernels/ops/fp8_conv.py, a Triton implicit GEMM on tl.dot over float8e4nv): CUDA device capability
(9, 0) only (Hopper); elsewhere a one-line error.

With DiffAug: the result is an ordinary module taking (x_t, t), with no parameter requiring grad, e.g.

    model, sched = dk.load_default_score_model()
    calib = [(dk.forward_noise(x0, t, sched, seed=0), t) for t in (50, 250, 500, 750, 950)]  # a few images x0
    aug = dk.DiffAug(dk.models.to_fp8(model, calib, emulate=True), sched, dtype=torch.bfloat16)

Under autocast an FP8Conv2d returns the autocast dtype (bf16, as the kernel writes it); outside it, its input's.
DiffAug's cast_weights leaves FP8Conv2d alone (it is no nn.Conv2d and has no parameters).
"""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import eval_mode

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
GRANULARITIES = ("tensor", "channel")
REQUIRED_CAPABILITY = (9, 0)


def scale_from_amax(amax: Tensor) -> Tensor:
    """amax / 448 in float32, and 1 where amax is 0 (an all-zero tensor quantises to zeros whatever the scale;
    a zero scale would divide by zero) or not finite."""
    amax = amax.float()
    return torch.where((amax > 0) & torch.isfinite(amax), amax / E4M3_MAX, torch.ones_like(amax))


def quantize(x: Tensor, scale: Union[Tensor, float]) -> Tensor:
    """x / scale in float32, clamped to e4m3's range [-448, 448], cast to float8_e4m3fn (round to nearest even).
    scale broadcasts against x. NaN stays NaN."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def dequantize(q: Tensor, scale: Union[Tensor, float]) -> Tensor:
    """q (float8_e4m3fn) times scale, in float32: every e4m3 value is exact in float32."""
    return q.float() * scale


def quantize_weight(weight: Tensor, granularity: str = "channel") -> tuple[Tensor, Tensor]:
    """(weight in float8_e4m3fn, scale [out_channels] float32): one scale for the whole tensor ("tensor",
    repeated per channel) or one per output channel ("channel"); weight ~= dequantize(q, scale[:, None, ...])."""
    check_granularity(granularity)
    w = weight.detach().float()
    amax = w.abs().amax() if granularity == "tensor" else w.abs().flatten(1).amax(1)
    scale = scale_from_amax(amax).expand(w.shape[0]).contiguous()
    return quantize(w, scale.view(-1, *([1] * (w.dim() - 1)))), scale


def check_granularity(granularity) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def check_fp8_device(device) -> None:
    """RuntimeError unless device is a CUDA device of capability (9, 0) (Hopper), which the FP8 kernel needs."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if cap == REQUIRED_CAPABILITY:
            return
        where = f"{device} has capability {cap}"
    else:
        where = f"got a {device.type} device"
    raise RuntimeError(f"FP8 convolutions (emulate=False) need a Hopper GPU, CUDA capability "
                       f"{REQUIRED_CAPABILITY}; {where}. emulate=True quantises in float32 on any device")


def replaceable(module: nn.Module) -> bool:
    """Whether to_fp8 replaces this module: a plain 3x3 nn.Conv2d (groups 1, dilation 1, zero padding)."""
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.groups == 1
            and module.dilation == (1, 1) and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


class FP8Conv2d(nn.Module):
    """A 3x3 convolution with e4m3 weights (buffer weight_fp8, [out, in, 3, 3] stored channels_last: the
    kernel's [out, 3, 3, in] K-major layout), their float32 scales (weight_scale, [out]), the calibrated
    input scale (act_scale, 0-d) and the float32 bias (or None). No parameters: the module is frozen. weight
    is the dequantised weight (read-only)."""

    def __init__(self, conv: nn.Conv2d, act_amax: Union[Tensor, float], granularity: str = "channel",
                 emulate: bool = False):
        super().__init__()
        if not replaceable(conv):
            raise ValueError(f"FP8Conv2d replaces a plain 3x3 nn.Conv2d (groups 1, dilation 1, zero padding), "
                             f"got {conv}")
        q, scale = quantize_weight(conv.weight, granularity)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.granularity, self.emulate = granularity, bool(emulate)
        self.weight_dtype = conv.weight.dtype
        self.register_buffer("weight_fp8", q.contiguous(memory_format=torch.channels_last))
        self.register_buffer("weight_scale", scale)
        amax = torch.as_tensor(act_amax, dtype=torch.float32, device=scale.device)
        self.register_buffer("act_scale", scale_from_amax(amax).reshape(()))
        bias = None if conv.bias is None else conv.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), stride={self.stride}, "
                f"padding={self.padding}, granularity={self.granularity!r}, emulate={self.emulate}")

    def dequantized_weight(self) -> Tensor:
        """The weight the FP8 convolution computes with, in float32."""
        return dequantize(self.weight_fp8, self.weight_scale.view(-1, 1, 1, 1))

    @property
    def weight(self) -> Tensor:
        """The dequantised weight in the replaced convolution's dtype: models that read a convolution's weight
        (ADMUNet takes its working dtype from its output convolution's) keep working."""
        return self.dequantized_weight().to(self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if self.emulate:
            with torch.autocast(dev, enabled=False):
                xq = dequantize(quantize(x, self.act_scale), self.act_scale)
                y = F.conv2d(xq, self.dequantized_weight(), self.bias, self.stride, self.padding)
            return y.to(out_dtype)
        if not torch.compiler.is_compiling():  # to_fp8 checked the device; a compiled graph keeps its device
            check_fp8_device(x.device)
        from ..ops.fp8_conv import conv2d_fp8  # Triton, imported where the kernel runs

        xq = quantize(x, self.act_scale).contiguous(memory_format=torch.channels_last)
        return conv2d_fp8(xq, self.weight_fp8, self.act_scale, self.weight_scale, self.bias, self.stride,
                          self.padding, out_dtype=out_dtype if out_dtype != torch.float64 else torch.float32)


Calibration = Union[Iterable, Callable[[nn.Module], object]]


def _run_calibration(model: nn.Module, calibration: Calibration) -> int:
    """Runs the calibration through model; returns the number of batches (1 for a callable)."""
    if callable(calibration) and not isinstance(calibration, nn.Module):
        calibration(model)
        return 1
    n = 0
    for item in calibration:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"calibration must yield (x_t, t) pairs, got {type(item).__name__}"
                            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}")
        model(*item)
        n += 1
    return n


def calibrate_amax(model: nn.Module, calibration: Calibration) -> dict:
    """{name: amax(|input|) over every calibration batch} of model's replaceable convolutions, in the order the
    model first ran them, measured with forward pre-hooks under torch.no_grad and eval mode (each submodule's
    mode restored after). calibration: an iterable of (x_t, t) pairs, each run as model(x_t, t), or a callable given
    the model, which runs whatever forward calls it likes (other arguments, autocast)."""
    convs = {name: m for name, m in model.named_modules() if replaceable(m)}
    amax: dict = {}

    def hook(name):
        def record(_module, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in convs.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            n = _run_calibration(model, calibration)
    finally:
        for h in handles:
            h.remove()
    if not n:
        raise ValueError("calibration gave no batches: pass at least one (x_t, t) pair")
    missing = sorted(set(convs) - set(amax))
    if missing:
        raise ValueError(f"calibration never ran {len(missing)} of the 3x3 convolutions, e.g. {missing[0]!r}: "
                         "calibrate with inputs that reach every layer")
    return amax


def to_fp8(model: nn.Module, calibration: Calibration, granularity: str = "channel", emulate: bool = False,
           keep_ends: bool = True, modules: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """A frozen copy of model (the original untouched) whose 3x3 nn.Conv2d layers are FP8Conv2d.

    calibration: an iterable of (x_t, t) batches run through the model once (a few batches over the times the
    model will see: e.g. dk.forward_noise of a few training images at t in {50, 250, 500, 750, 950}), or a
    callable that is given the model and runs it. The model runs as it is (its dtype, no autocast unless the
    callable sets one), in eval mode, without autograd; each convolution's input scale is amax(|x|) / 448 over
    all of it. granularity: "channel" (one weight scale per output channel: the default, as fast as "tensor" in
    the kernel, whose epilogue reads a scale per channel either way) or "tensor" (one per convolution).
    emulate: True for float32 quantise-dequantise on any device, False for the FP8 kernel (model on a Hopper GPU:
    checked first, before calibration).
    keep_ends: the first and the last 3x3 convolution the model runs (a UNet's input convolution, which would
    quantise x_t itself, and its output convolution, whose error is the prediction's) stay as they are: a few
    input or output channels, under 1% of the FLOPs, and most of the error. On the shipped digits model D(t)
    (bench-fp8) is 0.31 at t = 50 and 0.37 at t = 950 with every 3x3 convolution in FP8, 0.006 and 0.10 with the
    input convolution kept, 0.003 and 0.008 with both kept (64 test images, emulated, float32 reference).
    modules(name, conv): optional filter, False keeps that convolution as it is.
    Every parameter of the copy has requires_grad False."""
    check_granularity(granularity)
    if not isinstance(emulate, bool):
        raise TypeError(f"emulate must be True or False, got {emulate!r}")
    if calibration is None:
        raise ValueError("to_fp8 needs calibration: an iterable of (x_t, t) batches or a callable(model)")
    if not emulate:
        devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        for d in devices or {torch.device("cpu")}:
            check_fp8_device(d)
    fp8 = copy.deepcopy(model)
    fp8.requires_grad_(False)
    amax = calibrate_amax(fp8, calibration)
    order = list(amax)  # the order the convolutions first ran
    ends = {order[0], order[-1]} if keep_ends else set()
    for name, act in amax.items():
        conv = fp8.get_submodule(name)
        if name in ends or (modules is not None and not modules(name, conv)):
            continue
        parent, _, attr = name.rpartition(".")
        setattr(fp8.get_submodule(parent), attr, FP8Conv2d(conv, act, granularity, emulate))
    return fp8


def set_emulate(model: nn.Module, emulate: bool) -> nn.Module:
    """Switches every FP8Conv2d of model between emulation and the FP8 kernel (same buffers); returns model."""
    for m in model.modules():
        if isinstance(m, FP8Conv2d):
            m.emulate = bool(emulate)
    return model


def fp8_convs(model: nn.Module) -> list:
    """model's FP8Conv2d modules, in module order."""
    return [m for m in model.modules() if isinstance(m, FP8Conv2d)]
