"""The ADM UNet of openai/guided-diffusion ("Diffusion Models Beat GANs"), state_dict-compatible.

Every parameter has the name and shape that guided-diffusion's ``UNetModel`` gives it, so its checkpoints
(the DiffAug paper's ``256x256_diffusion_uncond.pt`` among them) load with ``strict=True``; the math is the
same. What differs is how it is computed:

- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (or xformers' memory-efficient
  attention when asked for) on a [B, T, heads, head_dim] layout taken straight from the qkv projection, for
  both of guided-diffusion's head orders (``QKVAttentionLegacy``: heads split before q/k/v;
  ``QKVAttention`` with ``use_new_attention_order``: q/k/v split before heads);
- mixed precision is ``torch.autocast`` (bfloat16 is the canonical one); group norms always compute in
  float32 and hand back the input's dtype, as guided-diffusion's GroupNorm32 does; ``use_fp16`` runs the
  torso (input, middle and output blocks) under a float16 autocast, the counterpart of guided-diffusion's
  ``convert_to_fp16`` that keeps the weights in float32;
- gradient checkpointing (``use_checkpoint``) uses ``torch.utils.checkpoint`` and only applies when
  gradients are being recorded (guided-diffusion always checkpoints attention blocks; it changes memory,
  never values);
- no Python control flow depends on tensor values, so ``torch.compile(fullgraph=True)`` traces the whole
  forward; channels_last inputs stay channels_last.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..ops import group_norm_silu
from ..utils import torch_load, unreadable

__all__ = [
    "ADMConfig",
    "ADMUNet",
    "ADM_CONFIGS",
    "ATTENTION_BACKENDS",
    "create_adm_unet",
    "default_channel_mult",
    "load_guided_diffusion",
    "timestep_embedding",
]

ATTENTION_BACKENDS = ("sdpa", "xformers")

# guided-diffusion's create_model defaults, plus the small sizes of our tiny models (DDPM's CIFAR-10 shape
# for 32; two downsamplings for 28 and 16 since 28 -> 14 -> 7; one for 8).
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    28: (1, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}


def size_multiple(channel_mult: Sequence[float]) -> int:
    """What a UNet input's height and width must be multiples of: it halves the image len(channel_mult) - 1
    times."""
    return 2 ** (len(channel_mult) - 1)


def default_channel_mult(image_size: int) -> tuple:
    """The channel multipliers create_model picks for an image size (guided-diffusion's, and our small ones)."""
    try:
        return _DEFAULT_CHANNEL_MULT[int(image_size)]
    except KeyError:
        raise ValueError(f"no default channel_mult for image_size={image_size} (known sizes: "
                         f"{sorted(_DEFAULT_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2'") from None


# ---------------------------------------------------------------------------------------------- pieces
def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embeddings [N, dim] of (possibly fractional) timesteps [N]: cos half first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _compiled_gpu_nhwc(*xs: Tensor) -> bool:
    """True while compiling for a GPU with every x a 4-D channels_last (and not also contiguous) tensor: where
    the UNet computes on NHWC views so that inductor's buffers keep that layout (group_norm_nhwc, cat_channels)."""
    return torch.compiler.is_compiling() and all(
        x.dim() == 4 and x.device.type != "cpu" and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous() for x in xs)


def group_norm_nhwc(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float,
                    stats: str = "channel") -> Tensor:
    """F.group_norm in float32 of a 4-D channels_last x, computed on views of its NHWC memory; the result is
    channels_last too. On GPUs, aten's group norm (eager, and inductor's decomposition of it) first copies a
    channels_last input to NCHW and returns NCHW; in the compiled 256x256 UNet on an H200 those layout copies,
    fused with the norm, are the slowest kernels of the step (RESULTS.md, the H200 profile of `python -m
    diffaug_kernels bench-model --profile`).

    stats="channel" reduces over the pixels per channel, reading whole rows, then merges each group's channels
    exactly (equal counts: the group's mean is the mean of the channel means, its variance the mean of the
    channel variances plus the variance of the channel means). stats="group" reduces over (pixels, the group's
    channels) at once, reading C/G channels of every NHWC row (16 bytes in 512 for 256 bf16 channels, where the
    H100's reductions run at about half the copy rate). On an H100 the compiled 256x256 UNet runs 2.7% faster
    per channel (226.6 against 232.9 ms in one run of `python -m diffaug_kernels bench-model --candidates`;
    RESULTS.md)."""
    b, c, h, w = x.shape
    xc = x.float().permute(0, 2, 3, 1).reshape(b, h * w, c)  # views: NHWC is x's memory order
    xg = xc.view(b, h * w, groups, c // groups)
    if stats == "group":
        var, mean = torch.var_mean(xg, dim=(1, 3), correction=0, keepdim=True)
    elif stats == "channel":
        var_c, mean_c = torch.var_mean(xc, dim=1, correction=0)
        mean_c, var_c = mean_c.view(b, 1, groups, c // groups), var_c.view(b, 1, groups, c // groups)
        mean = mean_c.mean(-1, keepdim=True)
        var = (var_c + (mean_c - mean).square()).mean(-1, keepdim=True)
    else:
        raise ValueError(f"stats must be 'group' or 'channel', got {stats!r}")
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(b, h, w, c) * weight.float() + bias.float()
    return y.permute(0, 3, 1, 2)


def cat_channels(a: Tensor, b: Tensor) -> Tensor:
    """torch.cat([a, b], dim=1). Compiled for a GPU on channels_last inputs, the cat joins [pixels, channels]
    rows of their NHWC memory: a 2-D cat, whose default buffer is that memory order, out of reach of inductor's
    layout rules for 4-D cats. Those rules give the output blocks' skip-connection cat an NCHW buffer in torch
    2.11 (the GPU machines' release), which the group norm after it gathers one channel plane apart per element:
    three 10.3 ms kernels in an H100 profile of the compiled step (`python -m diffaug_kernels bench-model
    --profile`; RESULTS.md). A cat of 4-D NHWC views avoids that in 2.11 but gives 2.14 transposes of its own
    (tools/inductor_layouts.py shows both without a GPU)."""
    if _compiled_gpu_nhwc(a, b):
        (n, ca, h, w), cb = a.shape, b.shape[1]
        rows = [a.permute(0, 2, 3, 1).reshape(n * h * w, ca), b.permute(0, 2, 3, 1).reshape(n * h * w, cb)]
        return torch.cat(rows, dim=1).view(n, h, w, ca + cb).permute(0, 3, 1, 2)
    return torch.cat([a, b], dim=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype; the result comes back in the input's dtype.
    Compiled for a GPU, channels_last inputs take group_norm_nhwc (same math, no layout copies), with its
    statistics reduced as nhwc_stats says ("channel"; bench-model --candidates also times "group")."""

    nhwc_stats = "channel"

    def forward(self, x: Tensor) -> Tensor:
        if _compiled_gpu_nhwc(x):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps,
                                   self.nhwc_stats).to(x.dtype)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    if channels % 32:
        raise ValueError(f"ADM's GroupNorm has 32 groups, so every channel count must be a multiple of 32; "
                         f"got {channels} (pick num_channels and channel_mult so that "
                         f"num_channels * mult is a multiple of 32)")
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


norm_layer, zero_module = _norm, _zero  # public names for the other ADM networks (models/guidance.py)


def norm_silu(norm: GroupNorm32, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """SiLU(norm(x)), with scale-shift SiLU(norm(x) * (1 + scale) + shift), as one dk.group_norm_silu (fused_norm)."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift)


class TimestepBlock(nn.Module):
    """A module whose forward takes (x, emb)."""


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the children that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 upsampling, then (with use_conv) a 3x3 conv named ``conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # back to x's dtype: CUDA autocast runs nearest upsampling in float32, and a float32 result made the up
        # blocks' residual sums, and the skip-connection cats after them, float32 (twice the bytes through
        # every norm there); nearest copies values, so the cast back is exact
        x = F.interpolate(x, scale_factor=2, mode="nearest").to(x.dtype)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling named ``op``: a stride-2 3x3 conv (use_conv) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block: in_layers (norm, SiLU, conv), emb_layers (SiLU, linear), out_layers (norm, SiLU,
    dropout, zero conv), skip_connection; optional up/down sampling inside (resblock_updown) and FiLM-style
    scale-shift conditioning (use_scale_shift_norm). fused_norm runs each norm + (scale-shift +) SiLU as one
    norm_silu (same parameters)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False, fused_norm: bool = False):
        super().__init__()
        self.fused_norm = fused_norm
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * self.out_channels))
        self.out_layers = nn.Sequential(_norm(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        if self.use_checkpoint and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.fused_norm or self.updown:
            h = norm_silu(self.in_layers[0], x) if self.fused_norm else self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        scale = shift = None
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
        else:
            h = h + emb_out
        if self.fused_norm:
            h = norm_silu(self.out_layers[0], h, scale, shift)
        else:
            h = self.out_layers[0](h)
            h = self.out_layers[1](h if scale is None else h * (1 + scale) + shift)
        for layer in self.out_layers[2:]:
            h = layer(h)
        return self.skip_connection(x) + h


def _check_attention_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError("attention_backend='xformers' needs the xformers package, which is not installed "
                          "(pip install xformers), or use attention_backend='sdpa' (the same math through "
                          "torch.nn.functional.scaled_dot_product_attention)")
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, T, heads, d] tensors, returning [B, T, heads, d]."""
    if backend == "xformers":
        import xformers.ops as xops

        if q.device.type != "cuda":  # xformers' kernels are CUDA-only; its own error lists every kernel
            raise RuntimeError(f"attention_backend='xformers' runs on CUDA tensors only, got {q.device.type} "
                               f"tensors; use attention_backend='sdpa' (the same math) there")
        try:
            return xops.memory_efficient_attention(q, k, v)
        except NotImplementedError as e:  # e.g. its extension did not load: then it takes no CUDA input
            raise RuntimeError("attention_backend='xformers': the installed xformers has no kernel for these inputs "
                               "(`python -m xformers.info` lists what loaded; a wheel built for another CUDA or "
                               "torch version loads none: xformers 0.0.35 from PyPI needs libcudart.so.12, e.g. "
                               "from the nvidia-cuda-runtime-cu12 package, on the library path); use "
                               "attention_backend='sdpa' (the same math)") from e
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions: norm, qkv (a 1x1 Conv1d, C -> 3C), attention, proj_out
    (a zero-initialised 1x1 Conv1d), residual. The conv weights are applied as linear maps on a
    [B, H*W, C] view, which is free for channels_last inputs and feeds attention without head copies."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False,
                 attention_backend: str = "sdpa"):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if num_head_channels <= 0 or channels % num_head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by "
                                 f"num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads <= 0 or channels % self.num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads={self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.attention_backend = _check_attention_backend(attention_backend)
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        heads, d = self.num_heads, c // self.num_heads
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, T, C]
        qkv = F.linear(h, self.qkv.weight[:, :, 0], self.qkv.bias)  # [B, T, 3C]
        if self.use_new_attention_order:  # channel = which * C + head * d + i  (guided-diffusion QKVAttention)
            q, k, v = qkv.unflatten(-1, (3, heads, d)).unbind(2)
        else:  # channel = head * 3d + which * d + i  (QKVAttentionLegacy)
            q, k, v = qkv.unflatten(-1, (heads, 3, d)).unbind(3)
        a = attention(q, k, v, self.attention_backend).flatten(2)  # [B, T, C], channel = head * d + i
        out = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, height, width)


def batch_timesteps(t, x: Tensor) -> Tensor:
    """Timesteps [B] for a batch x from t: a number, a 0-d or [1] tensor (broadcast) or a [B] tensor."""
    b = x.shape[0]
    if not isinstance(t, Tensor):
        return torch.full((b,), float(t), device=x.device)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t must be an integer or floating tensor, got {t.dtype}")
    t = t.to(x.device)  # like the schedule tables: moved, not rejected
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(b)
    if t.dim() != 1 or t.shape[0] != b:
        raise ValueError(f"t must have shape [B]=[{b}] (or be a scalar), got {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------- model
class ADMUNet(nn.Module):
    """guided-diffusion's UNetModel (2-D): same constructor arguments (attention_resolutions as downsample
    rates), same state_dict, forward(x, t, y=None) -> [B, out_channels, H, W].

    x: [B, in_channels, H, W] with H and W divisible by 2 ** (len(channel_mult) - 1); t: timesteps [B]
    (int or float, fractional allowed), a 0-d tensor or a Python number for the whole batch; y: class
    labels [B] (integer) for a class-conditional model, None otherwise. The output has the parameters' dtype
    (or the autocast dtype under torch.autocast).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: Optional[int] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, attention_backend: str = "sdpa", fused_norm: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        _check_attention_backend(attention_backend)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.fused_norm = fused_norm
        self.config: Optional[ADMConfig] = None  # set by create_adm_unet

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(cin, cout, **kw):
            return ResBlock(cin, emb_dim, dropout, out_channels=cout, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, fused_norm=fused_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
                                  attention_backend=attention_backend)

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    # -------------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (see size_multiple())."""
        return size_multiple(self.channel_mult)

    def set_attention_backend(self, backend: str) -> "ADMUNet":
        """Switches every attention block to "sdpa" or "xformers" (same math); returns self."""
        _check_attention_backend(backend)
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.attention_backend = backend
        return self

    def set_fused_norm(self, fused: bool = True) -> "ADMUNet":
        """Switches every norm + SiLU pair to dk.group_norm_silu (True) or back (same parameters); returns self."""
        for m in self.modules():
            if isinstance(m, (ADMUNet, ResBlock)):
                m.fused_norm = fused
        return self

    def norm_silu_sites(self) -> list:
        """(norm, scale_shift) for every norm + SiLU pair set_fused_norm switches: each ResBlock's input norm,
        its output norm (scale_shift: followed by ADM's scale-shift) and the output norm."""
        sites = []
        for m in self.modules():
            if isinstance(m, ResBlock):
                sites += [(m.in_layers[0], False), (m.out_layers[0], m.use_scale_shift_norm)]
        return sites + [(self.out[0], False)]

    def forward(self, x: Tensor, t, y: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = self.size_multiple
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width must be multiples of {factor} (the UNet downsamples "
                             f"{len(self.channel_mult) - 1} times), got {tuple(x.shape[2:])}")
        if self.num_classes is None and y is not None:
            raise ValueError("y was given but this model is unconditional (class_cond=False)")
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this model is class-conditional (class_cond=True): pass labels y of shape [B]")
            if y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}], "
                                 f"got {y.dtype} {tuple(y.shape)}")

        wdtype = self.out[2].weight.dtype
        emb = self.time_embed(timestep_embedding(batch_timesteps(t, x), self.model_channels).to(wdtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.to(x.device))

        h = x.to(wdtype)
        if self.use_fp16 and torch.amp.is_autocast_available(x.device.type):
            with torch.autocast(x.device.type, dtype=torch.float16):
                h = self._torso(h, emb)
            h = h.to(wdtype)
        else:
            h = self._torso(h, emb)
        return self.out[2](norm_silu(self.out[0], h)) if self.fused_norm else self.out(h)

    def _torso(self, h: Tensor, emb: Tensor) -> Tensor:
        hs = []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(cat_channels(h, hs.pop()), emb)
        return h


# --------------------------------------------------------------------------------------------- configs
class FlagConfig:
    """A frozen dataclass of a create function's flags that also reads as a mapping (create(**config)) and
    gives changed copies (replace)."""

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        return getattr(self, key)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ADMConfig(FlagConfig):
    """guided-diffusion's create_model flags (plus in_channels, num_classes). A config unpacks like a dict:
    ``create_adm_unet(**cfg)``; ``cfg.create(**overrides)`` builds the model."""

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: Union[str, tuple] = ""
    learn_sigma: bool = False
    class_cond: bool = False
    use_checkpoint: bool = False
    attention_resolutions: Union[str, tuple] = "16"
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    num_classes: int = 1000
    in_channels: int = 3

    def create(self, **overrides) -> "ADMUNet":
        return create_adm_unet(**{**dataclasses.asdict(self), **overrides})


ADM_CONFIGS: dict[str, ADMConfig] = {
    # The DiffAug paper's score model: guided-diffusion's 256x256_diffusion_uncond.pt (552,814,086 parameters).
    "imagenet256_uncond": ADMConfig(image_size=256, num_channels=256, num_res_blocks=2,
                                    attention_resolutions="32,16,8", num_head_channels=64, resblock_updown=True,
                                    use_scale_shift_norm=True, learn_sigma=True, class_cond=False),
    # guided-diffusion's 64x64_diffusion.pt (class-conditional ImageNet 64x64, 295,904,454 parameters).
    "imagenet64_cond": ADMConfig(image_size=64, num_channels=192, num_res_blocks=3,
                                 attention_resolutions="32,16,8", num_head_channels=64, resblock_updown=True,
                                 use_new_attention_order=True, use_scale_shift_norm=True, learn_sigma=True,
                                 class_cond=True, dropout=0.1),
    # Our embedded default: grayscale 32x32 (scikit-learn digits, upsampled), eps-prediction, widths 32/64/64,
    # attention at 8x8 with 2 heads (1,921,601 parameters; 1,922,755 with in_channels=3 for RGB).
    "digits32": ADMConfig(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2,2",
                          attention_resolutions="8", num_head_channels=32, use_scale_shift_norm=True,
                          resblock_updown=True, learn_sigma=False, in_channels=1),
}


def parse_channel_mult(channel_mult, image_size: int) -> tuple:
    if isinstance(channel_mult, str):
        if not channel_mult.strip():
            return default_channel_mult(image_size)
        try:
            values = [float(v) for v in channel_mult.split(",")]
        except ValueError:
            raise ValueError(f"channel_mult must be a comma string of numbers like '1,2,2', "
                             f"got {channel_mult!r}") from None
    else:
        values = [float(v) for v in channel_mult]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"channel_mult must be positive numbers, got {channel_mult!r}")
    return tuple(int(v) if v.is_integer() else v for v in values)


def attention_rates(attention_resolutions, image_size: int) -> tuple:
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.replace(" ", "").split(",") if p]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"attention_resolutions must be a comma string of resolutions like '32,16,8', "
                             f"got {attention_resolutions!r}") from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    if any(r <= 0 for r in resolutions):
        raise ValueError(f"attention_resolutions must be positive, got {attention_resolutions!r}")
    return tuple(image_size // r for r in resolutions)


def create_adm_unet(image_size: int, num_channels: int, num_res_blocks: int, channel_mult="",
                    learn_sigma: bool = False, class_cond: bool = False, use_checkpoint: bool = False,
                    attention_resolutions="16", num_heads: int = 1, num_head_channels: int = -1,
                    num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, dropout: float = 0.0,
                    resblock_updown: bool = False, use_fp16: bool = False, use_new_attention_order: bool = False,
                    num_classes: int = 1000, in_channels: int = 3, attention_backend: str = "sdpa",
                    fused_norm: bool = False) -> ADMUNet:
    """guided-diffusion's script_util.create_model: the same flags give the same state_dict.

    channel_mult "" picks the default for image_size (512, 256, 128, 64 as guided-diffusion; 32 -> 1,2,2,2;
    28 and 16 -> 1,2,2; 8 -> 1,2); otherwise a comma string ("1,2,2") or a sequence. attention_resolutions
    is a comma string (or sequence) of feature-map resolutions, turned into downsample rates
    image_size // res. out_channels = in_channels, doubled with learn_sigma (3 or 6 for RGB). fused_norm runs
    every norm + SiLU pair (the ResBlocks' and the output's) as one dk.group_norm_silu, with the same state_dict.
    """
    config = ADMConfig(image_size=image_size, num_channels=num_channels, num_res_blocks=num_res_blocks,
                       channel_mult=channel_mult if isinstance(channel_mult, str) else tuple(channel_mult),
                       learn_sigma=learn_sigma, class_cond=class_cond, use_checkpoint=use_checkpoint,
                       attention_resolutions=(attention_resolutions if isinstance(attention_resolutions, str)
                                              else tuple(attention_resolutions)),
                       num_heads=num_heads, num_head_channels=num_head_channels,
                       num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
                       dropout=dropout, resblock_updown=resblock_updown, use_fp16=use_fp16,
                       use_new_attention_order=use_new_attention_order, num_classes=num_classes,
                       in_channels=in_channels)
    model = ADMUNet(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_rates(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        attention_backend=attention_backend,
        fused_norm=fused_norm,
    )
    model.config = config
    return model


# --------------------------------------------------------------------------------------------- loading
def read_state_dict(path: str) -> Mapping[str, Tensor]:
    """The flat state_dict in a .safetensors or torch.save'd file; a file that is neither (damaged, foreign, or
    needing code to load) is a one-line ValueError naming it."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors' own error type, or an OSError on a truncated file
            raise ValueError(f"{path} is not a safetensors file ({unreadable(e)})") from None
    state = torch_load(path, "guided-diffusion", error=ValueError)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = list(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{path} does not hold a flat state_dict of tensors (found {keys}); save "
                         f"model.state_dict() itself, as guided-diffusion's checkpoints are")
    return state


def state_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """What keeps `state` from loading into `model` strictly, in one line: the counts of missing and unexpected
    keys and of shape mismatches, each with its first example."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (("missing", missing), ("unexpected", unexpected),
                                                              ("of another shape", shapes)) if v]
    return "; ".join(parts) or "the tensors do not load"


def load_guided_diffusion(path, config: Union[None, str, ADMConfig] = None, *, device=None,
                          attention_backend: str = "sdpa", **flags) -> ADMUNet:
    """Builds the ADM UNet from guided-diffusion flags and loads a checkpoint into it with strict=True.

    path: a guided-diffusion checkpoint (torch.save'd state_dict, read with weights_only=True) or a
    .safetensors file. config: a name in ADM_CONFIGS or an ADMConfig; flags (create_model's names) override
    it or, without a config, give the whole architecture. The model is built on the meta device and takes the
    checkpoint's tensors (no random init, no second copy), then moves to `device` if given. Returned in eval
    mode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"guided-diffusion checkpoint not found: {path!r}")
    if isinstance(config, str):
        if config not in ADM_CONFIGS:
            raise ValueError(f"unknown config {config!r}; known: {sorted(ADM_CONFIGS)}")
        config = ADM_CONFIGS[config]
    kwargs = {**(dataclasses.asdict(config) if config is not None else {}), **flags}
    missing = [k for k in ("image_size", "num_channels", "num_res_blocks") if k not in kwargs]
    if missing:
        raise TypeError(f"load_guided_diffusion needs a config name or the flags {missing} "
                        f"(known configs: {sorted(ADM_CONFIGS)})")
    return load_strict(path, lambda: create_adm_unet(**kwargs, attention_backend=attention_backend),
                       f"the ADM UNet built from {kwargs}", "image_size, num_channels, num_res_blocks, channel_mult, "
                       "attention_resolutions, learn_sigma, class_cond, resblock_updown, use_scale_shift_norm, "
                       "in_channels", device)


def load_strict(path, build, what: str, flags: str, device=None) -> nn.Module:
    """build() on the meta device, then the tensors of the checkpoint at path (read_state_dict) loaded into it
    strictly (assign: no random init, no second copy); a mismatch is one ValueError line naming the file, `what`
    was built and the `flags` to check. Moved to device if given; returned in eval mode."""
    state = read_state_dict(path)
    with torch.device("meta"):
        model = build()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        raise ValueError(f"{path} does not match {what}: {state_mismatch(model, state)}; check the flags "
                         f"({flags})") from None
    if device is not None:
        model = model.to(device)
    return model.eval()
