"""Classifiers for classifier guidance: guided-diffusion's noisy classifier and the DA-classifier.

``EncoderUNet`` is guided-diffusion's ``EncoderUNetModel`` (the half UNet of "Diffusion Models Beat GANs"): the
ADM UNet's input blocks and middle block, built from unet.py's ResBlock, AttentionBlock and Downsample, then a
pooling head. Its state_dict has upstream's names and shapes, so the released classifiers
(``64x64_classifier.pt``, ``128x128_classifier.pt``, ``256x256_classifier.pt``, ``512x512_classifier.pt``) load
with strict=True. ``create_classifier`` takes the flags of guided-diffusion's ``classifier_defaults()``, plus
in_channels, num_classes, channel_mult and num_head_channels for small models (32x32, grayscale).

``DAClassifier`` is a guidance classifier that sees the noisy image and its one-step denoised estimate: it
feeds [x_t, tweedie(x_t, score_model(x_t, t), t)] (channel concatenation) to a classifier built with twice
the image channels. The DiffAug paper publishes no code for its DA-classifiers; this design is ours.

``load_guidance_classifier`` rebuilds either kind from a ``train-guidance`` checkpoint (GUIDANCE_FORMAT) or its
safetensors export (EXPORT_FORMAT, ``export_guidance_classifier``); ``load_default_guidance_classifier`` loads the
shipped digits ones (SHIPPED_GUIDANCE), made for the shipped score model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import tweedie
from ..schedule import PREDICTIONS, NoiseSchedule
from ..utils import torch_load, unreadable
from .score import PACKAGE_DIR, check_sha256, load_tensors, resolve_score_model, save_checked
from .unet import (
    AttentionBlock,
    Downsample,
    FlagConfig,
    ResBlock,
    TimestepEmbedSequential,
    attention,
    attention_rates,
    batch_timesteps,
    load_strict,
    norm_layer,
    norm_silu,
    parse_channel_mult,
    size_multiple,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "CLASSIFIER_CONFIGS",
    "POOLS",
    "AttentionPool2d",
    "ClassifierConfig",
    "DAClassifier",
    "EncoderUNet",
    "create_classifier",
    "export_guidance_classifier",
    "load_default_guidance_classifier",
    "load_guidance_classifier",
    "load_guided_classifier",
]

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(FlagConfig):
    """The flags of guided-diffusion's classifier_defaults() (same defaults), plus in_channels, num_classes,
    channel_mult ("" picks the default for image_size) and num_head_channels (upstream fixes 64). Unpacks like
    a dict: ``create_classifier(**cfg)``."""

    image_size: int = 64
    classifier_use_fp16: bool = False
    classifier_width: int = 128
    classifier_depth: int = 2
    classifier_attention_resolutions: Union[str, tuple] = "32,16,8"
    classifier_use_scale_shift_norm: bool = True
    classifier_resblock_updown: bool = True
    classifier_pool: str = "attention"
    in_channels: int = 3
    num_classes: int = 1000
    channel_mult: Union[str, tuple] = ""
    num_head_channels: int = 64


# guided-diffusion's released classifiers (README.md there): classifier_defaults() with the image size, and
# classifier_depth 4 for 64x64.
CLASSIFIER_CONFIGS: dict[str, ClassifierConfig] = {
    "64x64_classifier": ClassifierConfig(image_size=64, classifier_depth=4),
    "128x128_classifier": ClassifierConfig(image_size=128),
    "256x256_classifier": ClassifierConfig(image_size=256),
    "512x512_classifier": ClassifierConfig(image_size=512),
}


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling as guided-diffusion has it: the spatial mean joins the H*W positions as a first
    token, a learned positional embedding [C, H*W + 1] is added, multi-head attention (q/k/v split before heads,
    guided-diffusion's QKVAttention) runs through qkv_proj, and c_proj of the first token's output is the result.
    Only the first token's query is computed: the other outputs are discarded upstream."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: Optional[int] = None,
                 attention_backend: str = "sdpa"):
        super().__init__()
        if num_head_channels <= 0 or embed_dim % num_head_channels:
            raise ValueError(f"attention pooling: {embed_dim} channels are not divisible by "
                             f"num_head_channels={num_head_channels}")
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_head_channels
        self.attention_backend = attention_backend

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if h * w + 1 != self.positional_embedding.shape[1]:
            raise ValueError(f"attention pooling takes {self.spatial_dim}x{self.spatial_dim} feature maps, got {h}x{w}")
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        qkv = F.linear(x.transpose(1, 2), self.qkv_proj.weight[:, :, 0], self.qkv_proj.bias)  # [B, T, 3C]
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, c // self.num_heads)).unbind(2)  # [B, T, heads, d]
        a = attention(q[:, :1], k, v, self.attention_backend).flatten(2)  # [B, 1, C]
        return F.linear(a, self.c_proj.weight[:, :, 0], self.c_proj.bias)[:, 0]


class EncoderUNet(nn.Module):
    """guided-diffusion's EncoderUNetModel (2-D): same constructor arguments (attention_resolutions as
    downsample rates), same state_dict; forward(x, t) -> [B, out_channels] logits.

    pool: "adaptive" (norm, SiLU, global average, zero-initialised 1x1 conv), "attention" (norm, SiLU,
    AttentionPool2d; the released checkpoints' head; needs num_head_channels and inputs of image_size),
    "spatial" / "spatial_v2" (an MLP on the spatial means of every input block's and the middle block's
    output). use_fp16 runs the torso (input and middle blocks) under a float16 autocast with float32 weights,
    as ADMUNet does for guided-diffusion's convert_to_fp16; the head runs in the weights' dtype.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, pool: str = "adaptive", attention_backend: str = "sdpa"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.use_fp16 = use_fp16
        self.pool = pool
        self.fused_norm = False  # set_fused_norm
        self.config: Optional[ClassifierConfig] = None  # set by create_classifier

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin, cout, **kw):
            return ResBlock(cin, emb_dim, dropout, out_channels=cout, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch):
            return AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
                                  attention_backend=attention_backend)

        ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        feature_size = ch
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                feature_size += ch
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                feature_size += ch
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        feature_size += ch
        self.feature_size = feature_size

        if pool == "adaptive":
            self.out = nn.Sequential(norm_layer(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(nn.Conv2d(ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (guided-diffusion's classifiers use 64)")
            if image_size % ds:
                raise ValueError(f"pool='attention': image_size={image_size} is not a multiple of {ds}, the "
                                 f"downsampling of channel_mult={self.channel_mult}")
            self.out = nn.Sequential(norm_layer(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels,
                                                     attention_backend))
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), norm_layer(2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return size_multiple(self.channel_mult)

    def set_fused_norm(self, fused: bool = True) -> "EncoderUNet":
        """Switches every norm + SiLU pair to dk.group_norm_silu (True) or back (same parameters), as the ADM
        UNet's set_fused_norm: the ResBlocks' and, with adaptive or attention pooling, the head's; returns self."""
        for m in self.modules():
            if isinstance(m, (EncoderUNet, ResBlock)):
                m.fused_norm = fused
        return self

    def norm_silu_sites(self) -> list:
        """(norm, scale_shift) for every norm + SiLU pair set_fused_norm switches."""
        sites = []
        for m in self.modules():
            if isinstance(m, ResBlock):
                sites += [(m.in_layers[0], False), (m.out_layers[0], m.use_scale_shift_norm)]
        return sites + ([(self.out[0], False)] if self._head_fusable() else [])

    def _head_fusable(self) -> bool:
        return self.pool in ("adaptive", "attention")

    def forward(self, x: Tensor, t) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.pool == "attention" and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"x must be {self.image_size}x{self.image_size} (pool='attention' has a fixed "
                             f"positional embedding), got {tuple(x.shape[2:])}")
        factor = self.size_multiple
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width must be multiples of {factor}, got {tuple(x.shape[2:])}")
        wdtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(batch_timesteps(t, x), self.model_channels).to(wdtype))
        h = x.to(wdtype)
        if self.use_fp16 and torch.amp.is_autocast_available(x.device.type):
            with torch.autocast(x.device.type, dtype=torch.float16):
                h, means = self._torso(h, emb, wdtype)
            h = h.to(wdtype)
        else:
            h, means = self._torso(h, emb, wdtype)
        if self.fused_norm and self._head_fusable():
            return self.out[2:](norm_silu(self.out[0], h))
        return self.out(torch.cat(means, dim=-1) if self.pool.startswith("spatial") else h)

    def _torso(self, h: Tensor, emb: Tensor, wdtype: torch.dtype):
        spatial = self.pool.startswith("spatial")
        means = []
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.to(wdtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(wdtype).mean(dim=(2, 3)))
        return h, means


def create_classifier(image_size: int = 64, classifier_use_fp16: bool = False, classifier_width: int = 128,
                      classifier_depth: int = 2, classifier_attention_resolutions="32,16,8",
                      classifier_use_scale_shift_norm: bool = True, classifier_resblock_updown: bool = True,
                      classifier_pool: str = "attention", in_channels: int = 3, num_classes: int = 1000,
                      channel_mult="", num_head_channels: int = 64, attention_backend: str = "sdpa") -> EncoderUNet:
    """guided-diffusion's script_util.create_classifier: the same flags (and defaults) give the same state_dict.

    channel_mult "" picks create_classifier's choice for image_size (512, 256, 128, 64) or, for the small
    sizes, the ADM UNet's (32 -> 1,2,2,2; 28 and 16 -> 1,2,2; 8 -> 1,2); otherwise a comma string or a
    sequence. classifier_attention_resolutions is a comma string (or sequence) of feature-map resolutions.
    in_channels is 3 upstream (2C for a DAClassifier); num_classes is the output width (1000 upstream).
    """
    if classifier_pool not in POOLS:
        raise ValueError(f"classifier_pool must be one of {POOLS}, got {classifier_pool!r}")
    for name, v in (("image_size", image_size), ("classifier_width", classifier_width),
                    ("classifier_depth", classifier_depth), ("in_channels", in_channels),
                    ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    config = ClassifierConfig(
        image_size=image_size, classifier_use_fp16=classifier_use_fp16, classifier_width=classifier_width,
        classifier_depth=classifier_depth,
        classifier_attention_resolutions=(classifier_attention_resolutions
                                          if isinstance(classifier_attention_resolutions, str)
                                          else tuple(classifier_attention_resolutions)),
        classifier_use_scale_shift_norm=classifier_use_scale_shift_norm,
        classifier_resblock_updown=classifier_resblock_updown, classifier_pool=classifier_pool,
        in_channels=in_channels, num_classes=num_classes,
        channel_mult=channel_mult if isinstance(channel_mult, str) else tuple(channel_mult),
        num_head_channels=num_head_channels)
    model = EncoderUNet(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_rates(classifier_attention_resolutions, image_size),
        channel_mult=parse_channel_mult(channel_mult, image_size),
        use_fp16=classifier_use_fp16,
        num_head_channels=num_head_channels,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
        attention_backend=attention_backend,
    )
    model.config = config
    return model


def load_guided_classifier(path, config: Union[None, str, ClassifierConfig] = None, *, device=None,
                           attention_backend: str = "sdpa", **flags) -> EncoderUNet:
    """Builds the classifier from create_classifier flags and loads a checkpoint into it with strict=True.

    path: a torch.save'd state_dict (read with weights_only=True), e.g. guided-diffusion's
    ``256x256_classifier.pt``, or a .safetensors file. config: a name in CLASSIFIER_CONFIGS or a
    ClassifierConfig; flags override it (or, without a config, override classifier_defaults()). The model is
    built on the meta device and takes the checkpoint's tensors, then moves to `device` if given. Returned in
    eval mode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier checkpoint not found: {path!r}")
    if isinstance(config, str):
        if config not in CLASSIFIER_CONFIGS:
            raise ValueError(f"unknown classifier config {config!r}; known: {sorted(CLASSIFIER_CONFIGS)}")
        config = CLASSIFIER_CONFIGS[config]
    kwargs = {**(dataclasses.asdict(config) if config is not None else {}), **flags}
    return load_strict(path, lambda: create_classifier(**kwargs, attention_backend=attention_backend),
                       f"the classifier built from {kwargs}", "image_size, classifier_width, classifier_depth, "
                       "classifier_attention_resolutions, classifier_pool, classifier_resblock_updown, channel_mult, "
                       "in_channels, num_classes", device)


class DAClassifier(nn.Module):
    """A guidance classifier on [x_t, x0_hat]: forward(x_t, t, **model_kwargs) returns
    classifier(cat([x_t, tweedie(x_t, score_model(x_t, t, **model_kwargs), t)], dim=1), t).

    classifier takes (x, t) and 2C input channels (create_classifier(in_channels=2 * C)); score_model is the
    denoiser (an ADMUNet; its model_kwargs, e.g. y, pass through) with `schedule` and `prediction`; clip
    clamps x0_hat to [-1, 1]. The gradient with respect to x_t (classifier guidance) flows through both
    halves of the input, the score model included; detach_denoiser=True runs the score model without
    autograd, so it flows through the x_t half and Tweedie's A[t] * x_t term only (the score model's
    Jacobian dropped: no backward pass through it). The score model stays in eval mode whatever
    train()/eval() sets; freeze its parameters (requires_grad_(False)) to train the classifier alone.
    The DiffAug paper publishes no DA-classifier code: this construction is ours.
    """

    def __init__(self, classifier: nn.Module, score_model: nn.Module, schedule: NoiseSchedule,
                 prediction: str = "eps", clip: bool = True, detach_denoiser: bool = False, backend: str = "auto"):
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.classifier = classifier
        self.score_model = score_model.eval()
        self.schedule = schedule
        self.prediction = prediction
        self.clip = bool(clip)
        self.detach_denoiser = bool(detach_denoiser)
        self.backend = backend

    def train(self, mode: bool = True) -> "DAClassifier":
        super().train(mode)
        self.score_model.eval()
        return self

    def denoise(self, x_t: Tensor, t, **model_kwargs) -> Tensor:
        """x0_hat = tweedie(x_t, score_model(x_t, t), t): the second half of the classifier's input."""
        if self.detach_denoiser:
            with torch.no_grad():
                out = self.score_model(x_t, t, **model_kwargs)
        else:
            out = self.score_model(x_t, t, **model_kwargs)
        return tweedie(x_t, out, t, self.schedule, prediction=self.prediction, clip=self.clip, backend=self.backend)

    def forward(self, x_t: Tensor, t, **model_kwargs) -> Tensor:
        if x_t.dim() != 4:
            raise ValueError(f"x_t must have shape [B, C, H, W], got {tuple(x_t.shape)}")
        want = getattr(self.classifier, "in_channels", None)
        if want is not None and want != 2 * x_t.shape[1]:
            raise ValueError(f"the classifier takes {want} channels but [x_t, x0_hat] has {2 * x_t.shape[1]}; "
                             f"build it with in_channels = 2 * C = {2 * x_t.shape[1]}")
        x0_hat = self.denoise(x_t, t, **model_kwargs)
        return self.classifier(torch.cat([x_t, x0_hat.to(x_t.dtype)], dim=1), t)


GUIDANCE_FORMAT = "diffaug_kernels.train_guidance.v1"
EXPORT_FORMAT = "diffaug_kernels.guidance_classifier.v1"
GUIDANCE_KINDS = ("noisy", "da")
_BETAS = "__schedule_betas__"  # an export's tensor holding the betas of the schedule it was trained on
_JSON_FIELDS = ("classifier", "score_model", "classes", "image_channels", "step", "train_args")

# The shipped digits guidance classifiers (for the shipped score model) and the commands that made them (exported
# from the final checkpoint; 500 steps of batch 16, 2-core CPU)
SHIPPED_GUIDANCE = {kind: os.path.join(PACKAGE_DIR, "weights", f"digits32_guidance_{kind}.safetensors")
                    for kind in GUIDANCE_KINDS}
SHIPPED_COMMANDS = {kind: f"python -m diffaug_kernels train-guidance --kind {kind} --seed 0 --threads 1 "
                          f"--export diffaug_kernels/weights/digits32_guidance_{kind}.safetensors"
                    for kind in GUIDANCE_KINDS}


def export_guidance_classifier(checkpoint: dict, path: str, extra: Optional[dict] = None) -> str:
    """Writes a train-guidance checkpoint's classifier as safetensors (float32 weights, the schedule's betas as
    float64 under "__schedule_betas__", and the kind, flags, score-model spec, image channels and class names as
    JSON metadata, with a checksum), without its optimizer: what load_guidance_classifier needs and no more."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != GUIDANCE_FORMAT:
        raise ValueError("export_guidance_classifier takes a train-guidance checkpoint (a dict of format "
                         f"{GUIDANCE_FORMAT!r})")
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in checkpoint["model"].items()}
    tensors[_BETAS] = checkpoint["schedule_betas"].detach().to("cpu", torch.float64).contiguous()
    meta = {"format": EXPORT_FORMAT, "kind": checkpoint["kind"],
            **{k: json.dumps(checkpoint.get("args") if k == "train_args" else checkpoint.get(k))
               for k in _JSON_FIELDS}}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return save_checked(tensors, path, meta)


def _read_export(path: str) -> dict:
    """An export as the fields of a checkpoint (model, schedule_betas, kind, classifier, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_tensors(path, check_sha256(path, meta))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for files of another format
        raise ValueError(f"{path} is not a readable safetensors file ({unreadable(e)})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a train-guidance checkpoint or export (format {meta.get('format')!r})")
    try:
        fields = {k: json.loads(meta[k]) for k in _JSON_FIELDS if k in meta}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed metadata ({e})") from None
    betas = tensors.pop(_BETAS, None)
    if betas is None:
        raise ValueError(f"{path} lacks the schedule's betas ({_BETAS!r})")
    return {"kind": meta.get("kind"), "model": tensors, "schedule_betas": betas, **fields}


def load_guidance_classifier(path, device=None, score_model: Optional[nn.Module] = None) -> nn.Module:
    """A ready guidance classifier (x_t, t) -> logits from a ``train-guidance`` checkpoint or its .safetensors
    export (``train-guidance --export``, export_guidance_classifier), in eval mode.

    The file holds the kind, the create_classifier flags (in_channels, num_classes included), the weights,
    the betas of the schedule it was trained on and the --score-model spec. kind "noisy": the EncoderUNet;
    kind "da": a DAClassifier of it, the spec's score model (resolved as the commands do; score_model given
    instead is used as is) and the trained schedule. Either carries ``guidance_info``: kind, num_classes,
    image_size, image_channels, classes, step. Errors name the file in one line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"guidance classifier checkpoint not found: {path!r}")
    if path.endswith(".safetensors"):
        ckpt = _read_export(path)
    else:
        ckpt = torch_load(path, "train-guidance", error=ValueError)
        if not isinstance(ckpt, dict) or ckpt.get("format") != GUIDANCE_FORMAT:
            got = (f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict)
                   else f"it holds a {type(ckpt).__name__}")
            raise ValueError(f"{path} is not a train-guidance checkpoint ({got})")
    kind, flags = ckpt.get("kind"), ckpt.get("classifier")
    if kind not in GUIDANCE_KINDS or not isinstance(flags, dict):
        raise ValueError(f"{path}: a train-guidance checkpoint needs kind in {GUIDANCE_KINDS} and the classifier "
                         f"flags, got kind {kind!r}")
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
    try:
        with torch.device("meta"):
            clf = create_classifier(**flags)
        clf.load_state_dict(ckpt["model"], strict=True, assign=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: the weights do not rebuild the classifier its flags describe "
                         f"({str(e).splitlines()[0][:300]})") from None
    clf.requires_grad_(False)
    info = {"kind": kind, "num_classes": flags["num_classes"], "image_size": flags["image_size"],
            "image_channels": int(ckpt["image_channels"]), "classes": list(ckpt.get("classes") or []),
            "step": int(ckpt.get("step", 0))}
    net = clf
    if kind == "da":
        schedule = NoiseSchedule.from_betas(ckpt["schedule_betas"].double().numpy())
        spec = ckpt["score_model"]
        if score_model is None:
            score_model, _ = resolve_score_model(spec["spec"], spec["data"], spec["config"], spec["flags"],
                                                 info["image_channels"])
        net = DAClassifier(clf, score_model, schedule, prediction=spec.get("prediction", "eps"))
    if device is not None:
        net = net.to(device)
    net.guidance_info = info
    return net.eval()


def load_default_guidance_classifier(kind: str, device=None, score_model: Optional[nn.Module] = None) -> nn.Module:
    """A shipped digits guidance classifier (SHIPPED_GUIDANCE; kind "noisy" or "da") for the shipped score model
    (dk.models.score.load_default_score_model; kind "da" loads it unless score_model is given)."""
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"kind must be one of {GUIDANCE_KINDS}, got {kind!r}")
    if not os.path.isfile(SHIPPED_GUIDANCE[kind]):
        raise FileNotFoundError(f"the shipped guidance classifier {SHIPPED_GUIDANCE[kind]!r} is missing (a package "
                                f"installed without its package data?); re-make it with:\n  {SHIPPED_COMMANDS[kind]}")
    return load_guidance_classifier(SHIPPED_GUIDANCE[kind], device=device, score_model=score_model)
