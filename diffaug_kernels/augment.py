"""dk.DiffAug: the augmentation as an nn.Module (forward noise -> score model -> Tweedie), for training loops."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import ops
from .ops import checks, dispatch
from .ops.dispatch import median_seconds, on_device
from .schedule import PREDICTIONS, NoiseSchedule


class DiffAug(nn.Module):
    """x0_hat = tweedie(forward_noise(x, t), model(x_t, t), t): one diffuse-and-denoise step per sample.

    model: the score network, called as model(x_t, t) (plus y=... for class-conditional models), returning
    the prediction ("eps", "v", "x0" or "score") with C or 2C channels (learned sigma). x is in [-1, 1].
    t is drawn uniformly from [t_range[0], t_range[1]) per sample with torch's generator (so
    torch.manual_seed makes it reproducible), or given; t_range=None (the default) is the whole schedule,
    [0, T): the paper's t ~ U{0..999} for its T = 1000 (a fixed (0, 1000) would leave part of a longer
    schedule out, or fail on a shorter one). forward(x, seed=...) fixes the noise only: t is still drawn from
    torch's generator unless given. The model runs without autograd unless x requires grad (the
    perceptually-aligned-gradient analyses need d x0_hat / d x through the network).
    dtype (e.g. torch.bfloat16) runs the model under autocast; compile=True wraps it in torch.compile
    (fullgraph; mode="reduce-overhead", i.e. CUDA graphs, on CUDA devices) and feeds it channels_last inputs.

    cast_weights: with dtype bfloat16 or float16, run a copy of the model whose convolution and linear weights
    are cast to dtype once, instead of letting autocast cast every one at every call (autocast caches casts only
    of weights that require grad, so a frozen 550M-parameter UNet is re-cast at each call). None (the default)
    does so when no parameter of the model requires grad (a frozen score model), True also when some do (the
    copy then passes no gradient to them), False never. The user's module is left as it is (its weights, dtype
    and state_dict unchanged): the copy shares every other parameter and buffer with it, holds the cast
    weights apart (half the fp32 bytes of those weights), is made at the first call on a device, follows the
    model's train/eval mode, and is remade when one of the cast weights changes (an optimizer step, a
    load_state_dict, a move: its version counter or storage) or starts to require grad (then autocast again,
    under None). Numerics equal autocast's: the same round-to-nearest cast, made once; the model still runs
    under autocast, which leaves weights already in dtype alone. Only the weights of nn.Conv1d/2d/3d,
    nn.ConvTranspose1d/2d/3d and nn.Linear (and no weight that another kind of module also holds) are cast:
    those are the modules autocast runs in low precision; other parameters (norms, embeddings) stay as they are.

    fused_norm: whether the model runs its GroupNorm + (scale-shift +) SiLU pairs as one dk.group_norm_silu (the
    package's ADM UNet: models.create_adm_unet, whose set_fused_norm switches them; same parameters, same
    numbers to rounding). True / False force it (True on a model without set_fused_norm is an error; False on such
    a model is a no-op). None (the default), for a model with set_fused_norm and norm_silu_sites and with
    compile=True, fuses on the CPU where the C++ kernel is built (a fixed rule: cpu_kernel_fused) and decides by
    measurement on CUDA; anywhere else (eager, other devices) it leaves the model as it is. The measurement
    (measure_fused_norm) runs once per device, input shape and dtype, at the first call with that input, before
    the compile: one eager call of the unfused model records the inputs of its norm + SiLU pairs, then each distinct
    pair shape is timed fused against the unfused pair compiled by inductor (static shapes, what the compiled
    unfused UNet runs there), summed over the pairs; fused runs when its total is smaller. It costs one eager call
    of the model and one compile of the small pair function per distinct pair input (a few per resolution level),
    not a second compile of the UNet; it does not see inductor fusing a pair's neighbours into it, so where the
    totals are close, time both settings end to end and force the faster. The measured totals are kept in
    fused_norm_measured. The user's module is never switched: a setting other than the model's own runs a copy of
    the model (or of the cast copy above) that shares every parameter and buffer with it, follows its train/eval
    mode and is remade when the model it copies is; a later structural change to the user's module (another set_*
    call) reaches calls through that copy only once it is remade, so set such options before the first call.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, t_range=None, prediction: str = "eps",
                 clip: bool = True, backend: str = "auto", compile: bool = False, dtype: Optional[torch.dtype] = None,
                 cast_weights: Optional[bool] = None, fused_norm: Optional[bool] = None):
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a dk.NoiseSchedule, got {type(schedule).__name__}")
        if t_range is None:
            t_range = (0, schedule.num_timesteps)
        if (not isinstance(t_range, (tuple, list)) or len(t_range) != 2
                or not all(checks.is_int(v) for v in t_range)):
            raise TypeError(f"t_range must be two integers (lo, hi), got {t_range!r}")
        lo, hi = (int(v) for v in t_range)
        if not 0 <= lo < hi <= schedule.num_timesteps:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= {schedule.num_timesteps}, got {t_range}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if not isinstance(clip, bool):
            raise TypeError(f"clip must be True or False, got {clip!r}")
        if not (cast_weights is None or isinstance(cast_weights, bool)):
            raise TypeError(f"cast_weights must be None, True or False, got {cast_weights!r}")
        if cast_weights is True and dtype not in LOW_PRECISION:
            raise ValueError(f"cast_weights=True casts to dtype, which must be torch.bfloat16 or torch.float16, "
                             f"got {dtype}")
        if not (fused_norm is None or isinstance(fused_norm, bool)):
            raise TypeError(f"fused_norm must be None, True or False, got {fused_norm!r}")
        if fused_norm is True and not callable(getattr(model, "set_fused_norm", None)):
            raise ValueError(f"fused_norm=True needs a model with set_fused_norm (the package's ADM UNet, "
                             f"models.create_adm_unet); {type(model).__name__} has none")
        if backend != "auto" and backend not in ops.BACKENDS:  # checked now, not at the first call
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}, got {backend!r}")
        self.model = model
        self.schedule = schedule
        self.t_range = (lo, hi)
        self.prediction, self.clip, self.backend, self.dtype = prediction, clip, backend, dtype
        self.compiled = compile
        self.cast_weights = cast_weights
        self.fused_norm = fused_norm
        # (device, x's shape, x's dtype) -> (fused seconds, compiled unfused seconds) measured for fused_norm=None
        self.fused_norm_measured = {}
        self._norm_copies = {}  # (device, fused) -> (the model copied, its copy with that fused_norm setting)
        self._compiled = {}  # device type -> the compiled model, made at the first call on that device
        # device -> CastCopy: the model with its weights cast to dtype once (a plain dict: not a submodule, so
        # this module's state_dict and parameters() are the model's alone)
        self._cast = {}

    def _runner(self, device: torch.device, fused: Optional[bool] = None):
        model = self._cast_model(device)
        model = self._norm_variant(self.model if model is None else model, device, fused)
        if not self.compiled:
            return model
        run = self._compiled.get(device.type)
        if run is None or run._orig_mod is not model:  # CUDA: CUDA graphs replay the whole UNet (small batches are
            mode = "reduce-overhead" if device.type == "cuda" else None  # not launch-bound)
            run = self._compiled[device.type] = torch.compile(model, fullgraph=True, mode=mode)
        return run

    def weights_cast_once(self) -> bool:
        """Whether calls run a copy of the model with its weights cast to dtype once (see cast_weights), as
        decided now: dtype is bfloat16 or float16 and cast_weights is True, or None with no parameter of the
        model requiring grad."""
        if self.dtype not in LOW_PRECISION or self.cast_weights is False:
            return False
        return self.cast_weights is True or not any(p.requires_grad for p in self.model.parameters())

    def _cast_model(self, device: torch.device) -> Optional[nn.Module]:
        """The cast copy for this call, made or remade when needed; None: the model itself, autocast casting."""
        cached = self._cast.get(device)
        if cached is not None and cached.valid(allow_grad=self.cast_weights is True):
            if cached.model.training != self.model.training:
                cached.model.train(self.model.training)
            return cached.model
        allow_grad = self.cast_weights is True  # drop every stale copy (one on a device the model left too)
        self._cast = {d: c for d, c in self._cast.items() if d != device and c.valid(allow_grad)}
        if not self.weights_cast_once():
            return None
        cached = self._cast[device] = CastCopy(self.model, self.dtype)
        return cached.model

    def _norm_variant(self, model: nn.Module, device: torch.device, fused: Optional[bool]) -> nn.Module:
        """model when fused is None or its own setting (or it has no set_fused_norm: fused is False there); else a
        copy switched by set_fused_norm that shares every parameter and buffer with it (made once, remade when
        model is another object)."""
        if fused is None or getattr(model, "fused_norm", None) is fused or not hasattr(model, "set_fused_norm"):
            return model
        cached = self._norm_copies.get((device, fused))
        if cached is None or cached[0] is not model:
            cached = self._norm_copies[(device, fused)] = (model, norm_copy(model, fused))
        if cached[1].training != model.training:
            cached[1].train(model.training)
        return cached[1]

    def fused_norm_for(self, x_t: Tensor, t: Tensor, **model_kwargs) -> Optional[bool]:
        """The fused_norm setting a call on x_t runs with: True or False, or None for the model as it is (see
        fused_norm); under None on CUDA with compile=True, measured at the first call of each device, shape and
        dtype."""
        if self.fused_norm is not None:
            return self.fused_norm
        if not (self.compiled and measurable(self.model)):
            return None
        if x_t.device.type not in MEASURED_DEVICES:
            return True if x_t.device.type == "cpu" and cpu_kernel_fused() else None
        if torch.compiler.is_compiling():  # this module traced whole: nothing can be timed there
            return None
        key = (x_t.device, tuple(x_t.shape), x_t.dtype)
        if key not in self.fused_norm_measured:
            self.fused_norm_measured[key] = self.measure_fused_norm(x_t, t, **model_kwargs)
        fused_s, compiled_s = self.fused_norm_measured[key]
        return fused_s < compiled_s

    def measure_fused_norm(self, x_t: Tensor, t: Tensor, **model_kwargs) -> tuple:
        """(fused, compiled) seconds of the model's norm + SiLU pairs on inputs like x_t: dk.group_norm_silu
        against unfused_norm_silu compiled, each distinct pair (shape, strides, dtype, groups, scale-shift) timed
        once on random inputs and counted once per pair of the model (see fused_norm). Runs on any device."""
        base = self._cast_model(x_t.device)
        model = self._norm_variant(self.model if base is None else base, x_t.device, False)
        pairs = {}  # signature -> [count, norm, scale_shift]

        def record(scale_shift):
            def pre_hook(norm, args):
                x = args[0]
                key = (tuple(x.shape), x.stride(), x.dtype, norm.num_groups, norm.eps, scale_shift)
                pairs.setdefault(key, [0, norm, scale_shift])[0] += 1
            return pre_hook

        hooks = [norm.register_forward_pre_hook(record(ss)) for norm, ss in model.norm_silu_sites()]
        try:
            with torch.no_grad():
                self._call(model, x_t, t, **model_kwargs)
        finally:
            for h in hooks:
                h.remove()
        reference = torch.compile(unfused_norm_silu, fullgraph=True, dynamic=False)
        totals = [0.0, 0.0]
        limit = max(torch._dynamo.config.recompile_limit, 256)  # one static-shape compile per distinct pair
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
            for (shape, stride, dtype, groups, eps, _), (count, norm, scale_shift) in pairs.items():
                x = torch.empty_strided(shape, stride, dtype=dtype, device=x_t.device).normal_()
                sc, sh = ((0.1 * torch.randn(shape[0], shape[1], 1, 1, device=x_t.device)).to(dtype)
                          for _ in range(2)) if scale_shift else (None, None)
                totals[0] += count * time_candidate("fused", lambda: ops.group_norm_silu(
                    x, groups, norm.weight, norm.bias, eps, sc, sh), x_t.device)
                totals[1] += count * time_candidate("compiled", lambda: reference(norm, x, sc, sh), x_t.device)
        return tuple(totals)

    def sample_t(self, batch: int, device) -> Tensor:
        return torch.randint(self.t_range[0], self.t_range[1], (batch,), device=device)

    def denoise(self, x_t: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        """The model's prediction at (x_t, t), under this module's autocast, layout and fused_norm settings."""
        run = self._runner(x_t.device, self.fused_norm_for(x_t, t, **model_kwargs))
        return self._call(run, x_t, t, **model_kwargs)

    def _call(self, run, x_t: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        inp = x_t
        if self.compiled and inp.dim() == 4:
            inp = inp.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None and self.dtype != torch.float32:
            with torch.autocast(x_t.device.type, dtype=self.dtype):
                return run(inp, t, **model_kwargs)
        return run(inp, t, **model_kwargs)

    def forward(self, x: Tensor, t=None, return_t: bool = False, seed=None, **model_kwargs):
        """x: [B, C, ...] in [-1, 1] -> x0_hat of the same shape and dtype (and t if return_t). t: fixed times
        (an int or [B]), else drawn in t_range from torch's generator; seed: the noise's Philox seed (default:
        drawn from torch's generator), which does not fix t; model_kwargs go to the model (y=...)."""
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError("x must be a tensor of shape [B, C, ...]")
        B = x.shape[0]
        if t is None:
            t = self.sample_t(B, x.device)
        else:
            t = checks.as_times("t", t, B, x.device, self.schedule.num_timesteps)
        x_t = ops.forward_noise(x, t, self.schedule, seed=seed, backend=self.backend)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            out = self.denoise(x_t, t, **model_kwargs)
        x0_hat = ops.tweedie(x_t, out, t, self.schedule, self.prediction, self.clip, out_dtype=x.dtype,
                             backend=self.backend)
        return (x0_hat, t) if return_t else x0_hat

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule!r}, t_range={self.t_range}, prediction={self.prediction!r}, "
                f"clip={self.clip}, backend={self.backend!r}, compile={self.compiled}, dtype={self.dtype}, "
                f"cast_weights={self.cast_weights}, fused_norm={self.fused_norm}")


MEASURED_DEVICES = ("cuda",)  # where fused_norm=None measures (with compile=True); the CPU has a fixed rule


def norm_copy(model: nn.Module, fused: bool) -> nn.Module:
    """A copy of model (one with set_fused_norm) switched to fused, sharing every parameter and buffer with it:
    the user's module is never switched, and training it trains the copy."""
    shared = {id(v): v for v in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, shared).set_fused_norm(fused)


def cpu_kernel_fused() -> bool:
    """fused_norm=None's choice on the CPU with compile=True: fused where the C++ kernel is built. The compiled
    model runs channels_last, where that kernel reads whole rows of channels and inductor's compiled pair reduces
    each group's few channels a row apart: about 3x slower on the 32x32 UNet's first level (8x64x32x32), 1.1-1.2x
    on 8x128x16x16, bf16 and fp32 (`python -m diffaug_kernels bench --ops group_norm_silu --shapes
    8x64x32x32,8x128x16x16 --layout channels_last --device cpu`); guided sampling runs 1.48x -> 1.53-1.62x the
    published loop with it (`python -m diffaug_kernels bench-sample --device cpu`, RESULTS.md). A fixed rule,
    not a measurement: timing each pair costs a compile per pair shape (about 20 s for that UNet), which every
    ddim_sample call, making its own DiffAug, would pay again."""
    return dispatch.usable("cpu", torch.device("cpu")) and dispatch.kernels("cpu").group_norm_silu_out is not None


def measurable(model: nn.Module) -> bool:
    """Whether fused_norm=None can measure the model: it switches (set_fused_norm) and lists its norm + SiLU
    pairs (norm_silu_sites), as the package's ADM UNet does."""
    return callable(getattr(model, "set_fused_norm", None)) and callable(getattr(model, "norm_silu_sites", None))


def unfused_norm_silu(norm: nn.Module, x: Tensor, scale: Optional[Tensor] = None,
                      shift: Optional[Tensor] = None) -> Tensor:
    """A norm + SiLU pair as the unfused ADM UNet runs it (norm(x), ADM's scale-shift, SiLU): what fused_norm's
    measurement compiles and times against dk.group_norm_silu."""
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h)


def time_candidate(name: str, fn, device: torch.device) -> float:
    """Seconds of fn(), one of fused_norm's candidates ("fused" or "compiled"): the median of 10 calls after a
    warm-up call (which compiles the compiled one)."""
    with on_device(device):  # CUDA events and launches on the inputs' device
        return median_seconds(fn, device, reps=10)


LOW_PRECISION = (torch.bfloat16, torch.float16)
AUTOCAST_SOURCES = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts (not float64)
# the modules whose weights autocast casts to its low-precision dtype at every call (torch's autocast op lists:
# convolutions and linear layers)
CAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class CastCopy:
    """A copy of model whose CAST_MODULES' parameters are dtype copies made once; every other parameter and
    buffer (and every tensor the modules hold) is the model's own, shared. valid() says whether the copy still
    matches the model: the same parameter objects in the same modules, unchanged (version counter, storage),
    and none requiring grad unless allow_grad."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        holders = {}  # id(parameter) -> whether every module holding it is a CAST_MODULE
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None:
                    holders[id(p)] = holders.get(id(p), True) and isinstance(m, CAST_MODULES)
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self.sources = []  # (module of the model, parameter name, the parameter, its version, its data_ptr)
        for m in model.modules():
            if not isinstance(m, CAST_MODULES):
                continue
            for name, p in m._parameters.items():
                if p is None or not holders[id(p)] or p.dtype == dtype or p.dtype not in AUTOCAST_SOURCES:
                    continue
                if id(p) not in memo or memo[id(p)] is p:
                    with torch.no_grad():
                        memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                self.sources.append((m, name, p, p._version, p.data_ptr()))
        self.model = copy.deepcopy(model, memo)

    def valid(self, allow_grad: bool) -> bool:
        return all(m._parameters.get(name) is p and p._version == v and p.data_ptr() == ptr
                   and (allow_grad or not p.requires_grad) for m, name, p, v, ptr in self.sources)
