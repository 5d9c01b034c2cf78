"""dk.DiffAug: the augmentation as an nn.Module (forward noise -> score model -> Tweedie), for training loops."""
from __future__ import annotations

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
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, t_range=None, prediction: str = "eps",
                 clip: bool = True, backend: str = "auto", compile: bool = False, dtype: Optional[torch.dtype] = None):
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
        if backend != "auto" and backend not in ops.BACKENDS:  # checked now, not at the first call
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}, got {backend!r}")
        self.model = model
        self.schedule = schedule
        self.t_range = (lo, hi)
        self.prediction, self.clip, self.backend, self.dtype = prediction, clip, backend, dtype
        self.compiled = compile
        self._compiled = {}  # device type -> the compiled model, made at the first call on that device

    def _runner(self, device: torch.device):
        if not self.compiled:
            return self.model
        run = self._compiled.get(device.type)
        if run is None:  # CUDA: CUDA graphs replay the whole UNet, so small batches are not launch-bound
            mode = "reduce-overhead" if device.type == "cuda" else None
            run = self._compiled[device.type] = torch.compile(self.model, fullgraph=True, mode=mode)
        return run

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
                f"clip={self.clip}, backend={self.backend!r}, compile={self.compiled}, dtype={self.dtype}")
