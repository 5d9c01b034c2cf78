"""Classifier-guided sampling benchmark: dk.sampling.ddim_sample with a noisy classifier against
guided-diffusion's classifier_sample.py loop (use_ddim, eta 0), in one run, from the same weights, x_T, labels and
respaced steps; the same run checks that the images agree.

The published loop is written here in plain torch from guided-diffusion's SpacedDiffusion (respace.py: the
respaced tables, and _WrappedModel, which maps a respaced index to the original timestep for the model and for
cond_fn alike) and GaussianDiffusion (ddim_sample, p_mean_variance, condition_score, _extract_into_tensor: a
float64 numpy table copied to the device and gathered at every use). CPU default: the 8M-parameter 32x32 UNet
of bench-model with a 32x32 noisy classifier, 10 DDIM steps, batch 8; GPU: the 256x256 unconditional model and
guided-diffusion's 256x256 classifier, 25 DDIM steps, batch 16. Random weights (speed does not depend on them)
with the zero-initialised layers drawn too, so the images depend on the model, the timesteps and the gradient."""
from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..models import create_adm_unet, create_classifier
from ..models.guidance import CLASSIFIER_CONFIGS
from ..sampling import ddim_sample
from ..schedule import NoiseSchedule
from ..utils import write_json
from . import harness
from .model import device_and_unet, fp16_copy

# a 32x32 noisy classifier of guided-diffusion's design at CIFAR scale: half the released width, attention at
# 16x16 and 8x8, scale-shift norm, resblock up/down, attention pooling, 10 classes
CPU_CLASSIFIER = dict(image_size=32, classifier_width=64, classifier_depth=2, classifier_attention_resolutions="16,8",
                      classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                      classifier_pool="attention", num_classes=10)
PUBLISHED_GROUP = "classifier-guided DDIM"


# ------------------------------------------------------------------------------------ the published loop
def published_timesteps(num_timesteps: int, count: int) -> list:
    """guided-diffusion's space_timesteps(T, "ddim<count>"): the first integer stride giving exactly count
    timesteps, range(0, T, stride)."""
    for stride in range(1, num_timesteps):
        kept = list(range(0, num_timesteps, stride))
        if len(kept) == count:
            return kept
    raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} timesteps (DDIM striding)")


def published_spaced_tables(base_alphas_cumprod, kept) -> dict:
    """The float64 numpy tables of guided-diffusion's SpacedDiffusion keeping the original timesteps `kept`
    (ascending): betas 1 - abar[t_k] / abar[t_(k-1)], every GaussianDiffusion table rebuilt from them, and
    timestep_map (respaced index -> original timestep)."""
    base = np.asarray(base_alphas_cumprod, dtype=np.float64)
    betas, prev = [], 1.0
    for t in kept:
        betas.append(1.0 - base[t] / prev)
        prev = base[t]
    betas = np.array(betas, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return dict(timestep_map=list(kept), betas=betas, log_betas=np.log(betas), alphas_cumprod=ac,
                alphas_cumprod_prev=ac_prev, sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
                posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
                posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
                posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac))


def _gather(table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """_extract_into_tensor: the numpy table sent to t's device at every call, gathered at t, as float32 (as
    upstream; float64 for a float64 chain), broadcast to like's shape."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    v = torch.from_numpy(table).to(t.device)[t].to(dtype)
    return v.view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


def published_guided_ddim(model, classifier, x_T: torch.Tensor, y: Optional[torch.Tensor], scale: float,
                          tables: dict, clip: bool = True, eta: float = 0.0) -> torch.Tensor:
    """guided-diffusion's classifier_sample.py with use_ddim: ddim_sample_loop over a SpacedDiffusion, in plain
    torch. Each step at respaced index i (t = [i] * B): the model at the mapped timestep (eps, and with 2C
    output channels the learned-range variance p_mean_variance computes and DDIM ignores), pred_xstart from eps
    (clipped), the posterior mean; with a classifier, condition_score: cond_fn's scale * grad of
    log_softmax(classifier(x_in, mapped t))[y] by autograd on x.detach().requires_grad_(), eps moved by
    -sqrt(1 - abar) * grad and pred_xstart, the mean recomputed from it; then the DDIM update with eta (randn_like
    drawn even at eta 0, as upstream). model(x, t) and classifier(x, t) take the original timesteps; y None runs
    unguided. Returns the final sample, not clamped."""
    x = x_T
    B, C = x.shape[:2]
    tmap = tables["timestep_map"]

    def original(ts: torch.Tensor) -> torch.Tensor:  # _WrappedModel: the map tensor made at every call
        return torch.tensor(tmap, device=ts.device, dtype=ts.dtype)[ts]

    def cond_fn(x, ts):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, original(ts))
            log_probs = F.log_softmax(logits, dim=-1)
            chosen = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * scale

    def posterior_mean(x0, x, t):
        return _gather(tables["posterior_mean_coef1"], t, x) * x0 + _gather(tables["posterior_mean_coef2"], t, x) * x

    for i in reversed(range(len(tmap))):
        t = torch.tensor([i] * B, device=x.device)
        with torch.no_grad():
            out = model(x, original(t))
            if out.shape[1] == 2 * C:
                out, var_values = torch.split(out, C, dim=1)
                frac = (var_values + 1) / 2
                _log_var = frac * _gather(tables["log_betas"], t, x) + \
                    (1 - frac) * _gather(tables["posterior_log_variance_clipped"], t, x)
                _var = torch.exp(_log_var)  # p_mean_variance's variance: computed upstream, unused by DDIM
            x0 = _gather(tables["sqrt_recip_alphas_cumprod"], t, x) * x - \
                _gather(tables["sqrt_recipm1_alphas_cumprod"], t, x) * out
            if clip:
                x0 = x0.clamp(-1, 1)
            _mean = posterior_mean(x0, x, t)
            if y is not None and classifier is not None:  # condition_score
                alpha_bar = _gather(tables["alphas_cumprod"], t, x)
                eps = (_gather(tables["sqrt_recip_alphas_cumprod"], t, x) * x - x0) / \
                    _gather(tables["sqrt_recipm1_alphas_cumprod"], t, x)
                eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t)
                x0 = _gather(tables["sqrt_recip_alphas_cumprod"], t, x) * x - \
                    _gather(tables["sqrt_recipm1_alphas_cumprod"], t, x) * eps
                _mean = posterior_mean(x0, x, t)
            eps = (_gather(tables["sqrt_recip_alphas_cumprod"], t, x) * x - x0) / \
                _gather(tables["sqrt_recipm1_alphas_cumprod"], t, x)
            alpha_bar = _gather(tables["alphas_cumprod"], t, x)
            alpha_bar_prev = _gather(tables["alphas_cumprod_prev"], t, x)
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * \
                torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            noise = torch.randn_like(x)
            mean_pred = x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
            nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            x = mean_pred + nonzero * sigma * noise
    return x


# ------------------------------------------------------------------------------------------- the models
def randomize_zero_init(module: torch.nn.Module, gain: float = 0.5) -> torch.nn.Module:
    """Draws the weights of the layers ADM initialises to zero (each residual branch's last conv, attention's
    projection, the output conv), normal with std gain / sqrt(fan_in): with them at zero a random UNet returns
    zeros whatever its input and timestep, and a check of the images would compare nothing."""
    with torch.no_grad():
        for m in module.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and w is not None and not w.any():
                w.normal_(0.0, gain / (w[0].numel() ** 0.5))
    return module


def classifier_flags(gpu: bool, size: int) -> dict:
    """guided-diffusion's released 256x256 classifier's flags on a GPU, CPU_CLASSIFIER on the CPU; image_size is
    the sampled size (attention pooling has a fixed positional embedding)."""
    flags = dataclasses.asdict(CLASSIFIER_CONFIGS["256x256_classifier"]) if gpu else dict(CPU_CLASSIFIER)
    flags["image_size"] = size
    return flags


def check_options(device, size: Optional[int], steps: Optional[int]) -> None:
    """ValueError naming the problem unless run_sample(device, size=size, steps=steps) can build its models and
    steps: the size suits both the UNet and the classifier, steps has a DDIM stride. Builds nothing real."""
    from .model import check_size

    device, gpu, flags = device_and_unet(device, None)
    if steps is not None:
        published_timesteps(1000, steps)
    if size is not None:
        check_size(size, flags)
        with torch.device("meta"):
            try:
                create_classifier(**classifier_flags(gpu, size))
            except ValueError as e:
                raise ValueError(f"size {size} does not suit the classifier: {e}") from None


def _half_classifier(clf):
    """The published code's classifier with classifier_use_fp16 on a GPU: an fp16 copy, fed fp16, logits in fp32
    (upstream's head runs in float32)."""
    half = copy.deepcopy(clf).half().eval()
    return lambda x, t: half(x.half(), t).float()


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dk_row_name(dtype: torch.dtype, compiled: bool) -> str:
    return f"dk.sampling.ddim_sample, {DTYPE_NAMES[dtype]} {'compiled' if compiled else 'eager'}"


def run_sample(device=None, batch: Optional[int] = None, size: Optional[int] = None, flags: Optional[dict] = None,
               clf_flags: Optional[dict] = None, steps: Optional[int] = None, scale: float = 1.0, reps: int = 3,
               warmup: int = 1, compile: bool = True, dtypes=(torch.float32, torch.bfloat16),
               json_path: Optional[str] = None, seed: int = 0) -> dict:
    """Images/s of classifier-guided DDIM (eta 0, `steps` respaced steps, DDIM striding) against the published
    classifier_sample loop, in one run, the same UNet and classifier weights, x_T and labels.

    Rows: the published loop (fp16 copies of the UNet and the classifier on a GPU, as use_fp16 and
    classifier_use_fp16 run them; fp32 eager on the CPU), the base of every ratio; dk.sampling.ddim_sample with
    the classifier for each of dtypes (autocast), eager and (compile) compiled. The JSON's "ratios" holds
    "guided_sampling_vs_published" (the fastest dk row over the published one) and each dk row's ratio;
    "best_dk_row" names the row behind it; "checks" holds the images' max abs differences (clamped to [-1, 1])
    against the published loop in fp32: the dk fp32 eager images must agree to float32 rounding
    (checks["fp32_match"]); the low-precision rows are reported beside the published fp16 loop's own difference
    (GPU), and against the timed published row."""
    device, gpu, flags = device_and_unet(device, flags)
    steps = steps or (25 if gpu else 10)
    batch = batch or (16 if gpu else 8)
    size = size or flags["image_size"]
    clf_flags = dict(clf_flags) if clf_flags is not None else classifier_flags(gpu, size)
    if clf_flags.get("image_size") != size and clf_flags.get("classifier_pool", "attention") == "attention":
        raise ValueError(f"the classifier's image_size ({clf_flags.get('image_size')}) must be the sampled size "
                         f"{size} (attention pooling)")
    dtypes = tuple(dtypes)
    if not dtypes or any(d not in DTYPE_NAMES for d in dtypes):
        raise ValueError(f"dtypes must be some of float32, bfloat16, float16, got {dtypes}")
    kept = published_timesteps(1000, steps)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    torch.manual_seed(seed)
    model = randomize_zero_init(create_adm_unet(**flags)).to(device).eval().requires_grad_(False)
    clf = randomize_zero_init(create_classifier(**clf_flags)).to(device).eval().requires_grad_(False)
    C = flags.get("in_channels", 3)
    x_T = torch.randn(batch, C, size, size, device=device)
    y = torch.randint(0, clf_flags.get("num_classes", 1000), (batch,), device=device)
    sched = NoiseSchedule.linear(1000)
    tables = published_spaced_tables(sched.alphas_cumprod.numpy(), kept)
    spec = f"ddim{steps}"

    pub_model, pub_clf = model, clf
    if gpu:
        half = fp16_copy(model, flags, device)
        pub_model = lambda x, t: half(x.half(), t).float()  # noqa: E731
        pub_clf = _half_classifier(clf)
    pub = f"published classifier_sample loop ({'fp16' if gpu else 'fp32'} eager)"
    outs = {}

    def keep(name, fn):
        def call():
            outs[name] = fn()
            return outs[name]
        return call

    cases = {pub: keep(pub, lambda: published_guided_ddim(pub_model, pub_clf, x_T, y, scale, tables))}
    for dtype in dtypes:
        for comp in (False, True) if compile else (False,):
            name = dk_row_name(dtype, comp)
            cases[name] = keep(name, (lambda d, c: lambda: ddim_sample(
                model, sched, x_T, spec, classifier=clf, classifier_scale=scale, y=y,
                dtype=None if d == torch.float32 else d, compile=c))(dtype, comp))
    n_unet = sum(p.numel() for p in model.parameters())
    n_clf = sum(p.numel() for p in clf.parameters())
    log(f"[bench-sample] {harness.device_name(device)}: {n_unet / 1e6:.1f}M-param UNet, {n_clf / 1e6:.1f}M-param "
        f"classifier at {size}x{size}, batch {batch}, {steps} DDIM steps (timesteps {kept[0]}..{kept[-1]}), "
        f"scale {scale}")
    rows, ips = [], {}
    result = dict(env=harness.environment(device), flags=flags, classifier_flags=clf_flags, unet_params=n_unet,
                  classifier_params=n_clf, batch=batch, size=size, steps=steps, timesteps=kept, scale=scale,
                  reps=reps, warmup=warmup, dtypes=[str(d) for d in dtypes], compiled=compile, seed=seed, rows=rows,
                  ratios={}, checks={}, complete=False)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for name, fn in cases.items():
            tm = harness.time_fn(fn, reps=reps, warmup=warmup, device=device, flush=False)
            ips[name] = batch / (tm.ms * 1e-3)
            rows.append(dict(group=PUBLISHED_GROUP, impl=name, ms=tm.ms, first_call_ms=tm.first_ms,
                             images_per_s=ips[name], vs_published=ips[name] / ips[pub]))
            if json_path:
                write_json(result, json_path)
            log(f"[bench-sample] {name:<48} {tm.ms:10.1f} ms  {ips[name]:8.2f} img/s  {ips[name] / ips[pub]:5.2f}x")
        result["checks"] = _checks(outs, pub, gpu, lambda: published_guided_ddim(model, clf, x_T, y, scale, tables),
                                   lambda: ddim_sample(model, sched, x_T, spec, classifier=clf, classifier_scale=scale,
                                                       y=y))
    dk_rows = [n for n in ips if n != pub]
    best = max(dk_rows, key=ips.get)
    result["best_dk_row"] = best  # the row behind the headline ratio
    result["ratios"] = harness.headline_ratios(ips, {"guided_sampling_vs_published": (best, pub),
                                                     **{f"{n} / published": (n, pub) for n in dk_rows}})
    print(f"{harness.device_name(device)} ({device.type}), torch {torch.__version__}; classifier-guided DDIM, "
          f"{steps} steps, batch {batch} at {size}x{size}; median of {reps}")
    w = max(len(r["impl"]) for r in rows)
    for r in rows:
        print(f"{r['impl']:<{w}}  {r['ms']:10.1f} ms  {r['images_per_s']:8.2f} img/s  {r['vs_published']:5.2f}x "
              f"the published loop")
    print(f"best dk row ({best}): {result['ratios']['guided_sampling_vs_published']:.2f}x the published loop; "
          f"fp32 images vs the published fp32 loop: max abs diff {result['checks']['fp32_max_abs_diff']:.2e}")
    result["complete"] = True
    if json_path:
        write_json(result, json_path)
        log(f"[bench-sample] wrote {json_path}")
    return result


FP32_TOL = 1e-3  # images in [-1, 1] after the steps: float32 rounding, amplified a little by the chain


def _checks(outs: dict, pub: str, gpu: bool, published_fp32, dk_fp32) -> dict:
    """Max abs differences of the images (clamped to [-1, 1]) against the published loop in fp32 (the
    published row itself on the CPU, one more untimed call on a GPU); the dk fp32 eager images come from their
    row, or one untimed call when float32 was not timed."""
    with torch.no_grad():
        ref = outs[pub] if not gpu else published_fp32()
        ref = ref.float().clamp(-1, 1)
        dk32 = outs.get(dk_row_name(torch.float32, False))
        dk32 = dk_fp32() if dk32 is None else dk32
        diff = {n: float((o.float().clamp(-1, 1) - ref).abs().max()) for n, o in outs.items()}
        timed = outs[pub].float().clamp(-1, 1)
        vs_row = {n: float((o.float().clamp(-1, 1) - timed).abs().max()) for n, o in outs.items() if n != pub}
        fp32 = float((dk32.float().clamp(-1, 1) - ref).abs().max())
    return {"fp32_max_abs_diff": fp32, "fp32_tolerance": FP32_TOL, "fp32_match": fp32 <= FP32_TOL,
            "max_abs_diff_vs_published_fp32": diff, "max_abs_diff_vs_published_row": vs_row,
            "note": "images clamped to [-1, 1]; low-precision rows (bf16, the published fp16 loop on a GPU) differ "
                    "from the fp32 loop by their own rounding (bf16 keeps 3 fewer mantissa bits than fp16): "
                    "compare their differences with each other, loosely"}
