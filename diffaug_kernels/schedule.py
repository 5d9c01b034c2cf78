"""Diffusion noise schedules: float64 tables exactly as guided-diffusion computes them, float32 copies cached."""
from __future__ import annotations

import hashlib
import math
import numbers

import numpy as np
import torch

from . import constants

_TABLES = (
    "betas",
    "alphas_cumprod",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)

# x0_hat = A[t] * x_t + B[t] * model_output, per prediction type (names of float64 tables below).
_X0_COEFFICIENTS = {
    "eps": ("sqrt_recip_alphas_cumprod", "neg_sqrt_recipm1_alphas_cumprod"),
    "v": ("sqrt_alphas_cumprod", "neg_sqrt_one_minus_alphas_cumprod"),
    "x0": ("zeros", "ones"),
    "score": ("sqrt_recip_alphas_cumprod", "one_minus_alphas_cumprod_over_sqrt"),
}
PREDICTIONS = tuple(_X0_COEFFICIENTS)

# Each schedule's float64 tables by the digest of its betas (copies of a schedule share them): the source of
# the cached device copies (constants.device_constant, kind "schedule").
_NP_BY_DIGEST: dict = {}
constants.register("schedule", lambda digest, name: _NP_BY_DIGEST[digest][name])


class NoiseSchedule:
    """A discrete diffusion schedule of T steps; index t = 0 is one diffusion step (as in guided-diffusion).

    Tables (float64 CPU tensors): betas, alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod. ``table(name, device, dtype)`` returns a cached
    copy on a device (kernels gather float32 copies; float64 I/O uses the float64 ones).
    """

    def __init__(self, betas, name: str = "custom"):
        b = np.asarray(betas.detach().cpu().numpy() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
        if b.ndim != 1 or b.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not np.all((b > 0) & (b < 1)):  # beta = 1 would make alpha_bar 0 and every later table infinite
            raise ValueError(f"betas must lie in (0, 1), got values in [{b.min():g}, {b.max():g}]")
        self.name = name
        self.num_timesteps = int(b.size)
        ac = np.cumprod(1.0 - b, axis=0)
        tiny = np.finfo(np.float32).tiny
        if not ac[-1] >= tiny:  # ac decreases: its last value is the smallest
            t = int(np.argmax(ac < tiny))
            raise ValueError(f"these betas make alphas_cumprod underflow: it falls to {ac[t]:.3g} at t = {t}, below "
                             f"float32's smallest normal number ({tiny:.3g}), where 1 / sqrt(alphas_cumprod) is "
                             f"infinite and denoising gives NaN; use fewer steps or smaller betas")
        np_tables = {
            "betas": b,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        }
        np_tables.update(
            neg_sqrt_recipm1_alphas_cumprod=-np_tables["sqrt_recipm1_alphas_cumprod"],
            neg_sqrt_one_minus_alphas_cumprod=-np_tables["sqrt_one_minus_alphas_cumprod"],
            one_minus_alphas_cumprod_over_sqrt=(1.0 - ac) / np.sqrt(ac),
            zeros=np.zeros_like(b),
            ones=np.ones_like(b),
        )
        self._np = np_tables
        for k in _TABLES:
            setattr(self, k, torch.from_numpy(np_tables[k]))
        self._digest = hashlib.sha1(b.tobytes()).hexdigest()
        _NP_BY_DIGEST.setdefault(self._digest, np_tables)

    def __setstate__(self, state):  # unpickled in another process: register the tables there too
        self.__dict__.update(state)
        _NP_BY_DIGEST.setdefault(self._digest, self._np)

    # --- constructors (guided-diffusion's get_named_beta_schedule) ---
    @classmethod
    def linear(cls, T: int = 1000) -> "NoiseSchedule":
        T = _check_T(T)
        if T < 21:  # guided-diffusion scales the betas by 1000 / T: the last one, 20 / T, must stay below 1
            raise ValueError(f"the linear schedule needs T >= 21 (its betas reach 20 / T), got T = {T}")
        scale = 1000 / T
        return cls(np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64), name="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        T = _check_T(T)
        if not (_real(s) is not None and s >= 0):
            raise ValueError(f"the cosine schedule's offset s must be a finite number >= 0 (guided-diffusion: "
                             f"0.008), got {s!r}")
        if not (_real(max_beta) is not None and 0 < max_beta < 1):
            raise ValueError(f"max_beta must lie in (0, 1) (guided-diffusion: 0.999), got {max_beta!r}")

        def alpha_bar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return cls(np.array(betas), name="cosine")

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        return cls(betas, name="custom")

    # --- device copies ---
    def table(self, name: str, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self._np:
            raise KeyError(f"no table {name!r}; tables: {sorted(self._np)}")
        return constants.device_constant("schedule", (self._digest, name), torch.device(device or "cpu"), dtype)

    def x0_coefficients(self, prediction: str, device=None, dtype=torch.float32):
        """(A, B) tables with x0_hat = A[t] * x_t + B[t] * model_output for this prediction type."""
        if prediction not in _X0_COEFFICIENTS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        a, b = _X0_COEFFICIENTS[prediction]
        return self.table(a, device, dtype), self.table(b, device, dtype)

    def __len__(self):
        return self.num_timesteps

    def __repr__(self):
        return f"NoiseSchedule({self.name}, T={self.num_timesteps})"


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    return int(T)


def _real(v):
    """v as a finite float, or None for anything else (a string, a bool, NaN, inf)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return None
    return float(v)
