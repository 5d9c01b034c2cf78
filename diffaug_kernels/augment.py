"""dk.DiffAug: the augmentation as an nn.Module (forward noise -> score model -> Tweedie), for training loops."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .ops import checks
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
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, t_range=None, prediction: str = "eps",
                 clip: bool = True, backend: str = "auto", compile: bool = False, dtype: Optional[torch.dtype] = None,
                 cast_weights: Optional[bool] = None):
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
        if backend != "auto" and backend not in ops.BACKENDS:  # checked now, not at the first call
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}, got {backend!r}")
        self.model = model
        self.schedule = schedule
        self.t_range = (lo, hi)
        self.prediction, self.clip, self.backend, self.dtype = prediction, clip, backend, dtype
        self.compiled = compile
        self.cast_weights = cast_weights
        self._compiled = {}  # device type -> the compiled model, made at the first call on that device
        # device -> CastCopy: the model with its weights cast to dtype once (a plain dict: not a submodule, so
        # this module's state_dict and parameters() are the model's alone)
        self._cast = {}

    def _runner(self, device: torch.device):
        model = self._cast_model(device)
        if model is None:
            model = self.model
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

    def sample_t(self, batch: int, device) -> Tensor:
        return torch.randint(self.t_range[0], self.t_range[1], (batch,), device=device)

    def denoise(self, x_t: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        """The model's prediction at (x_t, t), under this module's autocast and layout settings."""
        inp, run = x_t, self._runner(x_t.device)
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
                f"cast_weights={self.cast_weights}")


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
