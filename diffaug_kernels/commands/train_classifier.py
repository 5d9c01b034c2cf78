"""Train a timm classifier with DiffAug, as the paper does: loss = CE(f(x), y) + CE(f(x0_hat), y).

x0_hat = dk.DiffAug(score_model, schedule)(x_da): each image is diffused to its own t ~ U{0..T-1}
(U{0..999} for the usual T = 1000) and denoised with one Tweedie step. The score model is frozen (no gradient
reaches it). The images go through the classifier as one concatenated batch (one forward, one backward:
DDP-safe, and batch norm sees clean and denoised images together). ``--no-diffaug`` trains the plain
baseline, CE(f(x), y). As in the authors' training scripts (github.com/oore-lab/diffaug,
training_scripts/diffbase.py and diffaugmix.py), DiffAug's input x_da is the image's resize + centre crop for
ImageFolder trees, while x is its random resized crop and flip; digits and CIFAR-10 have no random transform,
so there x_da = x.

Run it as ``python -m diffaug_kernels train-classifier``; under ``torchrun``, through the thin script
``python/train_classifier.py``::

    # the embedded default: scikit-learn's digits, 32x32 grey, the package's digits score model
    python -m diffaug_kernels train-classifier --data digits --out runs/digits-diffaug
    # the baseline, for comparison
    python -m diffaug_kernels train-classifier --data digits --no-diffaug --out runs/digits-plain
    # CIFAR-10 (python batches) with a 32x32 ADM checkpoint (guided-diffusion keys) described by its flags
    torchrun --nproc_per_node=4 python/train_classifier.py --data cifar10:/data/cifar-10-batches-py \\
        --model resnet18 --score-model cifar_adm.pt --score-flag image_size=32 --score-flag num_channels=128 \\
        --score-flag num_res_blocks=3 --score-flag learn_sigma=true --out runs/cifar-diffaug
    # an ImageFolder tree (train/ and val/ inside) with the paper's ImageNet score model, AugMix on top
    torchrun --nproc_per_node=8 python/train_classifier.py --data /data/imagenet --model resnet50 \\
        --score-model 256x256_diffusion_uncond.pt --score-config imagenet256_uncond --augmix \\
        --batch-size 64 --epochs 90 --lr 0.1 --amp --channels-last --out runs/in1k-diffaug

Choices and what they guarantee:

- Model: ``timm.create_model(name, pretrained=False, num_classes, in_chans)``; the default is ``resnet18``.
  Measured on this project's 2-core CPU (one thread, batch 64 at 1x32x32, forward+backward): resnet18 283 ms,
  resnet10t 220 ms, resnet14t 397 ms, mobilenetv3_small_050 117 ms. With DiffAug the step is dominated by the
  score model (the digits32 ADM UNet: about 1.2 s for the forward of 64 images on one thread) and the
  classifier runs on 2B images either way, so resnet10t would save under 10% of a DiffAug step; resnet18 is
  the standard, well-understood baseline, so it is the default. ``--model resnet10t`` is the fast choice for
  ``--no-diffaug``; timm's ``test_*`` models (e.g. ``test_resnet``) are for smoke tests only.
- Inputs are images in [-1, 1]. The classifier's normalisation is part of the model (``NormalizedClassifier``):
  ``--normalize identity`` (the classifier sees [-1, 1]; default for digits), ``imagenet`` (default for
  ImageFolder trees), ``cifar10`` (default for CIFAR-10) or ``"m1,m2,m3:s1,s2,s3"``; in all but identity the
  image is mapped to [0, 1] first, then (x - mean) / std per channel, as ``dk.tweedie(normalize=...)`` does.
- AugMix (``--augmix``), combined with DiffAug as the authors' diffaugmix.py does: two AugMix views of x
  join the batch and the loss gains AugMix's Jensen-Shannon consistency term over (x, view 1, view 2)
  (timm's ``JsdCrossEntropy``, weight 12); CE stays on x and x0_hat only, and DiffAug takes the un-AugMixed
  x_da. With ``--no-diffaug`` this is AugMix's own training (the paper's AM baseline). The views are timm's
  ``augment_and_mix_transform`` (``TrainViews`` in the dataset path, on uint8 PIL images made losslessly from
  the [-1, 1] tensors of every data source), configured by default as the AugMix code the authors use:
  severity 1, width 3, depth 1-3, without the colour, contrast, brightness and sharpness ops that overlap
  ImageNet-C (``--augmix-all-ops`` keeps them).
- The authors' other recipes (data/recipes.py): ``--extra-data DIR[,DIR...]`` (+Synth: labelled folders joined
  to the training set, classes matched by name), ``--deepaugment EDSR_DIR,CAE_DIR`` (DeepAugment's copies paired
  by relative path; CE on each, or with --augmix the three sources as one dataset) and ``--init-from CKPT``
  (fine-tuning a classifier, as the paper does).
- Distributed (torchrun): WORLD_SIZE/RANK/LOCAL_RANK from the environment; gloo on CPU, nccl on GPU; a
  DistributedSampler (shuffled by seed + epoch; ``EpochSampler`` adds the mid-epoch skip of a resume); the
  classifier wrapped in DistributedDataParallel; ``--batch-size`` is per process.
  Every rank starts from the same weights (``torch.manual_seed(seed)`` before the model is built, and DDP
  broadcasts rank 0's), then draws its own randomness: the DiffAug times t and Philox seeds come from a
  dedicated generator seeded with ``derive_seed(seed, rank, "diffaug")`` (numpy's SeedSequence of
  (seed, rank, tag)), so no two ranks (and no two --seed values) share a noise stream; torch's global, python
  and numpy generators (dropout, AugMix in the main process) are re-seeded per rank the same way. Only rank 0
  writes checkpoints, logs and progress; the epoch metrics are summed over ranks (all_reduce), so every rank
  holds the same numbers. Validation is sharded without padding (rank r takes samples r, r + W, ...), so the
  accuracy is over the exact val set.
- Checkpoints (``--out DIR`` -> DIR/checkpoint.pt, written atomically by rank 0 at each epoch end, every
  ``--save-every`` steps and when stopping): the classifier (timm's own state_dict keys), optimizer,
  scheduler, epoch and step, the running epoch sums, the args, and every rank's RNG states (torch, CUDA,
  numpy, python and the DiffAug generator). ``--resume`` (DIR/checkpoint.pt, or ``--resume PATH``) continues
  exactly: the data order is a function of (seed, epoch), the mid-epoch position is skipped to, and the
  generators are restored, so an interrupted run ends with the same weights as an uninterrupted one (for
  deterministic data pipelines; with random transforms in DataLoader workers the per-sample transform
  randomness after a mid-epoch resume is fresh, at epoch boundaries it is reproduced). ``--stop-at-step N``
  stops after step N as if interrupted (chunked jobs on time-limited queues).
- Logging: a tqdm bar on rank 0 when stderr is a terminal, plain progress lines otherwise; DIR/log.jsonl gets
  one JSON record per epoch (train loss and accuracy on clean and DiffAug'd images, with --augmix the
  weighted JSD term, val accuracy clean and DiffAug'd, lr, step, time) and a final record; the final clean and
  DiffAug'd val accuracies are printed.
  The DiffAug'd val accuracy draws t ~ U{t_range} per image from a generator reset at every evaluation, so
  epochs are compared on the same noise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..data.recipes import build_datasets
from ..models.classifier import CHECKPOINT_FORMAT, create_classifier, parse_normalize
from ..models.score import resolve_score_model
from ..models.unet import state_mismatch
from ..ops import BACKENDS
from ..utils import Progress, StopRequest, UsageError, atomic_save, ignore_interrupt, torch_load, trim_log
from .distributed import DistInfo, all_gather_object, all_reduce, any_rank, close_distributed, init_distributed
from .options import HelpFormatter, Parser, fraction, non_negative, non_negative_float, positive, positive_float, seed

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
JSD_WEIGHT = 12.0  # AugMix's Jensen-Shannon consistency weight (lambda = 12 in its paper and code)
N_STATS = 7  # train_step's per-batch sums (older checkpoints hold the first 5 or 6: before JSD, DeepAugment)
# args that change what is trained: a resume with different values warns
_RUN_DEFINING = ("data", "model", "seed", "batch_size", "opt", "no_diffaug", "score_model", "score_config",
                 "score_flag", "image_size", "channels", "normalize", "augmix", "augmix_config", "augmix_all_ops",
                 "limit_train", "t_range", "schedule", "lr", "weight_decay", "extra_data", "deepaugment", "init_from")




# ------------------------------------------------------------------------------------------------ args
def _t_range(s: str) -> tuple:
    try:
        lo, hi = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"t-range must look like 0,1000, got {s!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"t-range must be lo,hi with 0 <= lo < hi, got {s!r}")
    return lo, hi


NAME = "train-classifier"
HELP = "train a timm classifier with DiffAug (torchrun-ready)"
DESCRIPTION = ("Train a timm classifier with DiffAug (loss = CE(f(x), y) + CE(f(x0_hat), y), t ~ U{0..999}; with "
               "--augmix, + 12 JSD(x, augmix views)); torchrun-ready. Images are in [-1, 1].")


def build_parser() -> argparse.ArgumentParser:
    """The command's own parser, for the demo, which trains through it."""
    p = Parser(prog="diffaug train-classifier", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's, shipped), 'cifar10:<root>' (python batches) or an ImageFolder "
                        "path (with train/ and val/ inside, or one tree used for both)")
    g.add_argument("--val-data", default=None, help="validation data (default: the held-out split of --data)")
    g.add_argument("--no-val", action="store_true", help="skip validation")
    g.add_argument("--image-size", type=positive, default=None,
                   help="default: 32 for digits and CIFAR-10, 224 for folders")
    g.add_argument("--channels", type=positive, default=None, choices=(1, 3),
                   help="image channels (digits only: 1 default, or 3 = grey repeated)")
    g.add_argument("--num-classes", type=positive, default=None, help="default: from the data")
    g.add_argument("--limit-train", type=positive, default=None, help="use only the first N training samples")
    g.add_argument("--limit-val", type=positive, default=None, help="use only the first N validation samples")
    g.add_argument("--workers", type=non_negative, default=None,
                   help="DataLoader workers per process (default: 0 for in-memory digits, else min(8, cpus))")
    g.add_argument("--augmix", action="store_true",
                   help="AugMix as the DiffAug authors combine it: two AugMix views per image and AugMix's "
                        "Jensen-Shannon consistency loss (weight 12) beside the clean and DiffAug CE terms")
    g.add_argument("--augmix-config", default="augmix-m1-w3",
                   help="timm AugMix config string (default: the AugMix paper's code defaults, severity 1, width "
                        "3, depth 1-3)")
    g.add_argument("--augmix-all-ops", action="store_true",
                   help="keep AugMix's colour, contrast, brightness and sharpness ops (they overlap ImageNet-C)")
    g.add_argument("--extra-data", default=None, metavar="DIR[,DIR...]",
                   help="+Synth: labelled ImageFolders (e.g. generated images) joined to the training set and "
                        "shuffled with it; class folders are matched to the training set's classes by name")
    g.add_argument("--deepaugment", default=None, metavar="EDSR_DIR,CAE_DIR",
                   help="DeepAugment: folders of EDSR and CAE copies of every training image at the same relative "
                        "path; the loss adds CE on both (with --augmix: the three sources as one dataset, AugMix's "
                        "JSD on each); --data must be an ImageFolder tree")

    g = p.add_argument_group("classifier")
    g.add_argument("--model", default="resnet18", help="timm model name (created with pretrained=False)")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="fine-tune: start from a classifier's weights (a train-classifier checkpoint, or a "
                        "state_dict of the same timm model, 'module.' prefixes and a 'state_dict' entry allowed)")
    g.add_argument("--normalize", default=None,
                   help="classifier input normalisation: identity | imagenet | cifar10 | 'm1,m2,m3:s1,s2,s3' "
                        "(default: identity for digits, cifar10 for CIFAR-10, imagenet for folders)")
    g.add_argument("--drop-rate", type=fraction, default=0.0, help="dropout rate before the classifier head")
    g.add_argument("--label-smoothing", type=fraction, default=0.0, help="label smoothing of the cross-entropy")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks")
    g.add_argument("--compile", action="store_true", help="torch.compile the classifier")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format for the classifier")

    g = p.add_argument_group("DiffAug")
    g.add_argument("--no-diffaug", action="store_true", help="train the plain baseline CE(f(x), y)")
    g.add_argument("--score-model", default=None,
                   help="'default' (dk.pretrained's embedded digits model), a guided-diffusion checkpoint "
                        "(.pt state_dict or .safetensors), or 'random' (random init, for tests only). Default: "
                        "'default' with DiffAug; with --no-diffaug none (give one to also report DiffAug'd val "
                        "accuracy)")
    g.add_argument("--score-config", default=None,
                   help="an ADM_CONFIGS name for a checkpoint or 'random' (default: digits32 for digits, "
                        "imagenet256_uncond for folders; CIFAR-10 needs flags)")
    g.add_argument("--score-flag", action="append", default=[], metavar="KEY=VALUE",
                   help="guided-diffusion create_model flag overriding --score-config (repeatable), "
                        "e.g. --score-flag channel_mult=1,2 --score-flag attention_resolutions=")
    g.add_argument("--score-prediction", default=None, choices=("eps", "v", "x0", "score"),
                   help="what the score model predicts (default: the model's own `prediction`, else eps)")
    g.add_argument("--schedule", default="linear", choices=("linear", "cosine"),
                   help="the score model's noise schedule")
    g.add_argument("--diffusion-steps", type=positive, default=1000, help="the schedule's length T")
    g.add_argument("--t-range", type=_t_range, default=None,
                   help="t ~ U{lo..hi-1} (default: the whole schedule, 0,T: the paper's 0..999 for T = 1000)")
    g.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="dk op backend")
    g.add_argument("--compile-score", action="store_true", help="torch.compile the score model (fullgraph)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive, default=64, help="per process")
    g.add_argument("--val-batch-size", type=positive, default=None, help="default: 2 x batch size")
    g.add_argument("--epochs", type=positive, default=10, help="passes over the training data")
    g.add_argument("--steps", type=positive, default=None, help="total optimizer steps (overrides --epochs)")
    g.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    g.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (cosine decay to --min-lr)")
    g.add_argument("--min-lr", type=non_negative_float, default=0.0, help="the cosine schedule's final lr")
    g.add_argument("--warmup-steps", type=non_negative, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    g.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="weight decay")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast for the classifier and the score model")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder: checkpoint.pt, log.jsonl (rank 0 only)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="resume from PATH, or (no value) from OUT/checkpoint.pt when it exists")
    g.add_argument("--save-every", type=non_negative, default=0,
                   help="also checkpoint every N steps (0: epoch ends only)")
    g.add_argument("--stop-at-step", type=positive, default=None,
                   help="checkpoint and stop after this global step, as if interrupted (the schedule is "
                        "unchanged; --resume continues)")
    g.add_argument("--eval-every", type=non_negative, default=1, help="validate every N epochs (0: only at the end)")
    g.add_argument("--log-interval", type=positive, default=10, help="progress every N steps")
    g.add_argument("--seed", type=seed, default=0, help="seed of the init, the data order and the DiffAug noise")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads for this process")
    g.add_argument("--debug-noise", action="store_true",
                   help="each rank writes OUT/debug_noise_rank<r>.json: a hash of its first DiffAug batch's t "
                        "values and seed (to check that ranks draw different noise)")


# ------------------------------------------------------------------------------------------------ seeds
def derive_seed(seed: int, rank: int, tag: str) -> int:
    """A 64-bit seed for the stream `tag` of process `rank` of a run seeded with `seed` (numpy's SeedSequence:
    distinct (seed, rank, tag) give independent streams)."""
    tag_int = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "little")
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), tag_int]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------------------------------ data
class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled by seed + epoch, drop_last: every rank gets len // world samples)
    with the first `skip` samples of this rank's share left out, for a mid-epoch resume:
    set_epoch(epoch, skip)."""

    def __init__(self, dataset, rank: int, world_size: int, seed: int):
        if len(dataset) < world_size:
            raise UsageError(f"{len(dataset)} training samples cannot be split over {world_size} processes")
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


# ------------------------------------------------------------------------------------------------ steps
def diffaug_batch(aug, x: Tensor, gen: torch.Generator):
    """x0_hat = aug(x) with t ~ U{t_range} and a Philox seed drawn from `gen` (a CPU generator); -> (x0_hat, t,
    seed). No autograd graph: the score model is frozen."""
    lo, hi = aug.t_range
    t = torch.randint(lo, hi, (x.shape[0],), generator=gen)
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    with torch.no_grad():
        x0_hat = aug(x, t=t.to(x.device, non_blocking=True), seed=seed)
    return x0_hat, t, seed


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_step(model: nn.Module, aug, x: Tensor, y: Tensor, optimizer, gen: Optional[torch.Generator] = None,
               scheduler=None, label_smoothing: float = 0.0, amp: bool = False, x_da: Optional[Tensor] = None,
               augmix: Optional[Sequence[Tensor]] = None, deepaugment: Optional[Sequence[Tensor]] = None) -> dict:
    """One optimizer step, the DiffAug authors' objective. With aug (a dk.DiffAug): loss = CE(f(x), y) +
    CE(f(x0_hat), y), x0_hat = aug(x_da) (x_da defaults to x); without: CE(f(x), y). With augmix (two AugMix
    views of x) the loss also gets AugMix's Jensen-Shannon consistency of f's predictions on x and the two
    views (timm's JsdCrossEntropy, weight 12). With deepaugment (x's EDSR and CAE copies, diffda.py) the loss
    adds CE(f(v), y) for each. All images go through f as one batch. Returns detached per-batch sums (stats:
    loss_clean, loss_diffaug, correct_clean, correct_diffaug, n, loss_jsd, loss_deepaugment) and, with aug, the
    t values and seed."""
    model.train()
    B = x.shape[0]
    info = {}
    parts = [x, *(augmix or ())]
    if augmix is not None and len(parts) != 3:
        raise ValueError(f"augmix must be two views of x, got {len(parts) - 1}")
    first_da, parts = len(parts) * B, parts + list(deepaugment or ())
    if aug is not None:
        x0_hat, t, seed = diffaug_batch(aug, x if x_da is None else x_da,
                                        gen if gen is not None else torch.default_generator)
        parts.append(x0_hat.to(x.dtype))
        info.update(t=t, seed=seed)
    with _autocast(x.device, amp):
        logits = model(torch.cat(parts) if len(parts) > 1 else x).float()
    loss_clean = F.cross_entropy(logits[:B], y, label_smoothing=label_smoothing)
    loss = loss_clean
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=x.device)
    stats[0] = loss_clean.detach() * B
    stats[2] = (logits[:B].detach().argmax(1) == y).sum()
    stats[4] = B
    if augmix is not None:
        from timm.loss import JsdCrossEntropy

        loss = JsdCrossEntropy(num_splits=3, alpha=JSD_WEIGHT, smoothing=label_smoothing)(logits[:3 * B], y)
        stats[5] = (loss.detach() - loss_clean.detach()) * B  # CE on x plus the weighted JSD term
    if deepaugment:
        loss_da = sum(F.cross_entropy(logits[first_da + k * B:first_da + (k + 1) * B], y,
                                      label_smoothing=label_smoothing) for k in range(len(deepaugment)))
        loss = loss + loss_da
        stats[6] = loss_da.detach() * B
    if aug is not None:
        loss_aug = F.cross_entropy(logits[-B:], y, label_smoothing=label_smoothing)
        loss = loss + loss_aug
        stats[1] = loss_aug.detach() * B
        stats[3] = (logits[-B:].detach().argmax(1) == y).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    info.update(loss=loss.detach(), stats=stats)
    return info


@torch.no_grad()
def evaluate(model: nn.Module, loader, aug, device: torch.device, info: DistInfo, seed: int, amp: bool = False):
    """Clean and DiffAug'd (t ~ U{t_range} per image, noise from a generator reset here) top-1 accuracy over
    the whole val set (each rank holds a disjoint shard; the counts are summed)."""
    model.eval()
    gen = torch.Generator().manual_seed(derive_seed(seed, info.rank, "val-diffaug"))
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            counts[0] += (model(x).argmax(1) == y).sum()
        if aug is not None:
            x0_hat, _, _ = diffaug_batch(aug, x, gen)  # DiffAug handles its own autocast (its dtype)
            with _autocast(device, amp):
                counts[1] += (model(x0_hat).argmax(1) == y).sum()
        counts[2] += y.shape[0]
    all_reduce(counts, info)
    n = counts[2].item()
    return {"val_acc_clean": counts[0].item() / max(n, 1),
            "val_acc_diffaug": counts[1].item() / max(n, 1) if aug is not None else None,
            "val_n": int(n)}


def _cosine_lambda(total: int, warmup: int, floor: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


# ------------------------------------------------------------------------------------------------ RNG, checkpoints
def _rng_state(noise_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, noise_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_init_weights(net: nn.Module, path: str, model_name: str) -> None:
    """--init-from: a train-classifier checkpoint of the same timm model, or a state_dict of it (torchvision and
    DataParallel checkpoints: a 'state_dict' or 'model' entry, 'module.' prefixes), loaded strictly."""
    ck = torch_load(path, "classifier")
    if isinstance(ck, dict) and ck.get("format") == CHECKPOINT_FORMAT:
        if ck.get("model_name") != model_name:
            raise UsageError(f"--init-from {path} holds a {ck.get('model_name')}, not the --model {model_name}")
        ck = ck.get("model")
    elif isinstance(ck, dict) and not all(isinstance(v, Tensor) for v in ck.values()):
        ck = ck.get("state_dict", ck.get("model"))
    if not isinstance(ck, dict) or not ck or not all(isinstance(v, Tensor) for v in ck.values()):
        raise UsageError(f"--init-from {path} holds no classifier state_dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in ck.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UsageError(f"--init-from {path} does not fit the {model_name} built here (classes and channels "
                         f"from the data): {state_mismatch(net, state)}") from None


def _resolve_resume(args) -> Optional[str]:
    if args.resume is None:
        return None
    if args.resume == "auto":
        if args.out is None:
            raise UsageError("--resume without a path needs --out (it resumes from OUT/checkpoint.pt)")
        path = os.path.join(args.out, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume checkpoint not found: {args.resume!r}")
    return args.resume


def _run_defining(a: dict) -> dict:
    """The run-defining args as they act, so a resume compares like with like: t_range None is the whole schedule
    [0, T); the AugMix options only count with --augmix; a checkpoint from before --augmix-all-ops had it off."""
    r = {k: jsonable(a.get(k)) for k in _RUN_DEFINING}
    if r["t_range"] is None:
        r["t_range"] = [0, a.get("diffusion_steps") or 1000]
    r["augmix_all_ops"] = bool(r["augmix_all_ops"])
    if not r["augmix"]:
        r["augmix_config"] = r["augmix_all_ops"] = None
    return r


def jsonable(v):
    return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------------------------------------ the run
def train(args) -> dict:
    """Runs the training that `args` (build_parser's namespace) describes; returns the final metrics
    (identical on every rank)."""
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    try:
        return _train(args, info)
    finally:
        close_distributed(info)
        torch.set_num_threads(old_threads)


def _train(args, info: DistInfo) -> dict:
    from ..augment import DiffAug
    from ..schedule import NoiseSchedule

    device, main = info.device, info.is_main
    say = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    if args.batch_size < 1 or args.epochs < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--batch-size, --epochs and --steps must be positive")

    # data first: a missing path fails before anything is built
    train_ds, val_ds, channels, size, num_classes = build_datasets(args)
    workers = args.workers if args.workers is not None else (
        0 if args.data == "digits" and not args.augmix else min(8, os.cpu_count() or 1))
    if len(train_ds) // info.world_size < args.batch_size:
        raise UsageError(f"{len(train_ds)} training samples over {info.world_size} process(es) do not fill one "
                         f"batch of {args.batch_size}")
    sampler = EpochSampler(train_ds, info.rank, info.world_size, args.seed)
    loader_gen = torch.Generator()
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                              num_workers=workers, pin_memory=device.type == "cuda", generator=loader_gen,
                              worker_init_fn=ignore_interrupt if workers else None)
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = args.steps or args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    val_loader = None
    if val_ds is not None:
        shard = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
        val_loader = DataLoader(shard, batch_size=args.val_batch_size or 2 * args.batch_size, shuffle=False,
                                num_workers=workers, pin_memory=device.type == "cuda",
                                worker_init_fn=ignore_interrupt if workers else None)

    # the classifier: the same init on every rank
    norm_spec = args.normalize or ("identity" if args.data == "digits" else
                                   "cifar10" if args.data.startswith("cifar10:") else "imagenet")
    normalize = parse_normalize(norm_spec, channels)
    torch.manual_seed(args.seed)
    model = create_classifier(args.model, num_classes, channels, normalize, drop_rate=args.drop_rate).to(device)
    if args.init_from:
        load_init_weights(model.net, args.init_from, args.model)
        say(f"initialised {args.model} from {args.init_from}")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # the score model and the augmentation
    aug = None
    score_spec = args.score_model
    if score_spec is None and not args.no_diffaug:
        if args.data != "digits":
            raise UsageError("DiffAug needs a score model for this data: --score-model PATH (a guided-diffusion "
                             "checkpoint with --score-config/--score-flag, or a train-score export); the "
                             "embedded default is for digits only. --no-diffaug trains the baseline.")
        score_spec = "default"
    if score_spec is not None:
        score, schedule = resolve_score_model(score_spec, args.data, args.score_config, args.score_flag, channels)
        if score.in_channels != channels:
            raise UsageError(f"the score model takes {score.in_channels} channels but the images have {channels} "
                             f"(digits: --channels {score.in_channels})")
        if schedule is None:
            schedule = getattr(NoiseSchedule, args.schedule)(args.diffusion_steps)
        prediction = args.score_prediction or getattr(score, "prediction", "eps")
        if args.t_range is not None and args.t_range[1] > schedule.num_timesteps:
            raise UsageError(f"--t-range {args.t_range[0]},{args.t_range[1]} reaches past the score model's schedule "
                             f"(t < {schedule.num_timesteps})")
        aug = DiffAug(score.to(device), schedule, t_range=args.t_range, prediction=prediction, backend=args.backend,
                      compile=args.compile_score, dtype=torch.bfloat16 if args.amp else None)
        if score_spec == "random":
            say("note: --score-model random: an untrained score model (tests and smoke runs only)")
    train_aug = None if args.no_diffaug else aug

    # per-rank randomness (the model is built: from here on ranks differ)
    noise_gen = torch.Generator().manual_seed(derive_seed(args.seed, info.rank, "diffaug"))
    torch.manual_seed(derive_seed(args.seed, info.rank, "torch"))
    random.seed(derive_seed(args.seed, info.rank, "python"))
    np.random.seed(derive_seed(args.seed, info.rank, "numpy") & 0xFFFFFFFF)

    if args.opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_lambda(total_steps, args.warmup_steps, args.min_lr / args.lr if args.lr else 0.0))

    # resume
    epoch, step_in_epoch, global_step = 0, 0, 0
    epoch_stats = torch.zeros(N_STATS, dtype=torch.float64, device=device)
    ckpt_path = _resolve_resume(args)
    if ckpt_path is not None:
        ck = torch_load(ckpt_path, "train_classifier")
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{ckpt_path} is not a train_classifier checkpoint")
        if (ck.get("model_name"), ck.get("num_classes"), ck.get("in_chans")) != (args.model, num_classes, channels):
            raise UsageError(f"{ckpt_path} holds a {ck.get('model_name')} with {ck.get('num_classes')} classes and "
                             f"{ck.get('in_chans')} input channels, not the {args.model} with {num_classes} and "
                             f"{channels} asked for: resume with the same --model and data, or start a new --out")
        model.net.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        epoch, step_in_epoch, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        if main:
            saved = ck["epoch_stats"]  # the epoch's sums so far, over all ranks
            epoch_stats[:len(saved)].copy_(saved)
        old, now = _run_defining(ck["args"]), _run_defining(vars(args))
        changed = [k for k in _RUN_DEFINING if old.get(k) != now.get(k)]
        if changed:
            say(f"warning: resuming with different {', '.join(changed)} than the checkpoint's run")
        if ck["total_steps"] != total_steps:
            say(f"warning: the run now has {total_steps} steps (the checkpoint's had {ck['total_steps']}): "
                f"the cosine schedule is stretched from here")
        if ck["world_size"] == info.world_size:
            _set_rng_state(ck["rng"][info.rank], noise_gen)
        else:
            say(f"warning: the checkpoint was written by {ck['world_size']} processes, this run has "
                f"{info.world_size}: generators are re-seeded from (seed, rank, step), the data order is kept")
            noise_gen.manual_seed(derive_seed(args.seed + global_step, info.rank, "diffaug"))
            step_in_epoch = min(step_in_epoch * ck["world_size"] // info.world_size, steps_per_epoch)
        say(f"resumed from {ckpt_path} at step {global_step} (epoch {epoch}, step {step_in_epoch} of it)")
    elif args.resume == "auto":
        say(f"--resume: no checkpoint in {args.out}, starting fresh")

    if args.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)

    out = args.out
    if main and out:
        os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, LOG_NAME) if out else None
    if main and log_path and ckpt_path is not None:  # the steps after the checkpoint run again: their records go
        trim_log(log_path, global_step)

    def log(record: dict):
        if main and log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_checkpoint():
        reduced = all_reduce(epoch_stats.clone(), info)  # collective: every rank calls this
        rngs = all_gather_object(_rng_state(noise_gen), info)
        if not (main and out):
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT, "model": model.net.state_dict(), "model_name": args.model,
            "num_classes": num_classes, "in_chans": channels,
            "normalize": None if normalize is None else [list(normalize[0]), list(normalize[1])],
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, "total_steps": total_steps,
            "epoch_stats": reduced.cpu(),
            "args": {k: jsonable(v) for k, v in vars(args).items() if k not in ("func", "command")},
            "world_size": info.world_size, "writer_rank": info.rank, "rng": rngs,
        }, os.path.join(out, CHECKPOINT_NAME))

    def epoch_record(stats: Tensor, ep: int, complete: bool) -> dict:
        s = all_reduce(stats.clone(), info).tolist()
        n = max(s[4], 1)
        rec = {"epoch": ep, "complete": complete, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss_clean": s[0] / n, "train_acc_clean": s[2] / n, "train_n": int(s[4])}
        if train_aug is not None:
            rec.update(train_loss_diffaug=s[1] / n, train_acc_diffaug=s[3] / n)
        if args.augmix:
            rec["train_loss_jsd"] = s[5] / n
        if args.deepaugment and not args.augmix:
            rec["train_loss_deepaugment"] = s[6] / n
        rec["train_loss"] = (s[0] + s[1] + s[5] + s[6]) / n
        return rec

    say(f"train_classifier: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
        f"{args.data} ({len(train_ds)} train, {len(val_ds) if val_ds is not None else 0} val, {channels}x{size}x"
        f"{size}, {num_classes} classes), {'DiffAug' if train_aug is not None else 'no DiffAug'}, "
        f"{info.world_size} process(es) on {device}, {total_steps} steps = {num_epochs} epoch(s) of "
        f"{steps_per_epoch}")
    progress = Progress(total_steps, global_step, desc="train", quiet=not main)
    interval = max(1, args.log_interval)
    debug_written = False
    stopped = interrupted = False
    t_start = time.time()
    metrics: dict = {}
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def dev(v: Tensor) -> Tensor:
        return v.to(device, non_blocking=True).contiguous(memory_format=fmt)

    with StopRequest("saving a checkpoint after this step") as stop:
        while global_step < total_steps and not stopped:
            sampler.set_epoch(epoch, skip=step_in_epoch * args.batch_size)
            loader_gen.manual_seed(derive_seed(args.seed, info.rank, f"loader-epoch-{epoch}"))  # worker seeds
            for views, y in train_loader:
                views = views if isinstance(views, dict) else {"x": views}  # TrainViews' dict, else a batch of x
                x, y = dev(views["x"]), y.to(device, non_blocking=True)
                res = train_step(net, train_aug, x, y, optimizer, noise_gen, scheduler, args.label_smoothing,
                                 args.amp, x_da=dev(views["x_da"]) if "x_da" in views else None,
                                 augmix=[dev(v) for v in views["augmix"]] if "augmix" in views else None,
                                 deepaugment=[dev(v) for v in views["deepaugment"]] if "deepaugment" in views else None)
                epoch_stats += res["stats"]
                step_in_epoch += 1
                global_step += 1
                if args.debug_noise and not debug_written and out and "t" in res:
                    os.makedirs(out, exist_ok=True)
                    digest = hashlib.sha256(res["t"].numpy().tobytes() + str(res["seed"]).encode()).hexdigest()
                    with open(os.path.join(out, f"debug_noise_rank{info.rank}.json"), "w") as f:
                        json.dump({"rank": info.rank, "world_size": info.world_size, "step": global_step,
                                   "t_hash": digest, "t": res["t"].tolist(), "seed": res["seed"]}, f)
                    debug_written = True
                lr = optimizer.param_groups[0]["lr"]
                if global_step % interval == 0 or (progress.bar is None and global_step == total_steps):
                    loss = res["loss"].item()  # a host sync, once per log interval
                    if progress.bar is not None:
                        progress.update(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.4g}")
                    else:
                        progress.write(f"step {global_step}/{total_steps} epoch {epoch} loss {loss:.4f} "
                                       f"lr {lr:.4g}")
                else:
                    progress.update()
                if global_step % interval == 0 and not torch.isfinite(res["loss"]):  # no sync per step
                    raise FloatingPointError(f"the loss is {res['loss'].item()} at step {global_step}")
                if not info.distributed or global_step % interval == 0:  # every rank asks at the same steps
                    interrupted = interrupted or any_rank(stop.requested, info)
                if global_step >= total_steps or interrupted or (
                        args.stop_at_step is not None and global_step >= args.stop_at_step):
                    break
                if args.save_every and global_step % args.save_every == 0:
                    save_checkpoint()
            complete = step_in_epoch >= steps_per_epoch
            stopped = global_step < total_steps and (
                interrupted or (args.stop_at_step is not None and global_step >= args.stop_at_step))
            if complete or global_step >= total_steps:
                rec = epoch_record(epoch_stats, epoch, complete)
                last = global_step >= total_steps
                if val_loader is not None and (last or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
                    rec.update(evaluate(model, val_loader, aug, device, info, args.seed, args.amp))
                rec["time_s"] = round(time.time() - t_start, 3)
                log(rec)
                progress.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in rec.items()))
                metrics = rec
                epoch, step_in_epoch = epoch + 1, 0
                epoch_stats.zero_()
            save_checkpoint()
    progress.close()

    if stopped:
        where = (f"checkpoint {os.path.join(out, CHECKPOINT_NAME)}; continue with --resume" if out
                 else "nothing saved (no --out)")
        say(f"{'interrupted' if interrupted else 'stopped'} at step {global_step} of {total_steps}"
            f"{'' if interrupted else ' (--stop-at-step)'}: {where}")
        return {"stopped": True, "interrupted": interrupted, "step": global_step}
    final = {"final": True, "step": global_step, "epoch": epoch, "world_size": info.world_size,
             "val_acc_clean": metrics.get("val_acc_clean"), "val_acc_diffaug": metrics.get("val_acc_diffaug"),
             "val_n": metrics.get("val_n")}
    if val_loader is not None and "val_acc_clean" not in metrics:  # resumed after the last step: evaluate now
        final.update(evaluate(model, val_loader, aug, device, info, args.seed, args.amp))
    log(final)
    if final["val_acc_clean"] is not None:
        da = final["val_acc_diffaug"]
        say(f"final val accuracy ({final['val_n']} images): clean {100 * final['val_acc_clean']:.2f}%, DiffAug'd "
            + (f"{100 * da:.2f}%" if da is not None else "n/a (no score model)"))
    return final


def main(args) -> int:
    """`diffaug train-classifier`: the parsed options -> train(); a bad option or a missing path is one line."""
    try:
        result = train(args)
    except (FileNotFoundError, UsageError) as e:  # a missing path or a bad option: one clear line, no traceback
        raise SystemExit(f"diffaug train-classifier: error: {e}") from None
    return 130 if result.get("interrupted") else 0
