"""The digits comparison of FP8 score models: DiffAug-Ensemble (DE) accuracy and a DiffAug-trained classifier's
accuracy with the reference score model against its FP8 copy (dk.models.to_fp8), on scikit-learn's digits.

    python tools/fp8_digits.py [--epochs 5] [--threads 1] [--json out/fp8_digits.json]

Two resnet10t classifiers are trained the same way (the demo's recipe: 5 epochs, batch 64, SGD lr 0.05 with
cosine decay, CE(x) + CE(DiffAug(x)), same seed, data order and DiffAug draws), one with the reference score model
in DiffAug, one with the FP8 model. Each is then scored on the test digits, clean and under ImageNet-C's gaussian
noise at severity 5: plain, and DE (t in {0, 50, ..., 450}) with either score model. The reference is the model in
float32 on the CPU (a CPU without BF16 instructions runs bf16 convolutions some 25x slower) and under bf16
autocast on a GPU; the FP8 model is emulated (float32 quantise-dequantise) off Hopper and the FP8 kernel on it.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import diffaug_kernels as dk
from diffaug_kernels.bench import fp8 as bench_fp8
from diffaug_kernels.commands.train_classifier import train_step
from diffaug_kernels.data import digits
from diffaug_kernels.data.corruptions import corrupt
from diffaug_kernels.models import fp8 as f8
from diffaug_kernels.models.classifier import create_classifier

DE_TIMES = tuple(range(0, 451, 50))


def train(aug: dk.DiffAug, x, y, epochs: int, batch: int, lr: float, seed: int, model: str):
    """A classifier trained with CE(x) + CE(aug(x)); the same seed gives the same init, order and t / noise draws."""
    torch.manual_seed(seed)
    clf = create_classifier(model, 10, x.shape[1])
    steps = epochs * math.ceil(len(x) / batch)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    order, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            train_step(clf, aug, x[idx], y[idx], opt, gen=noise, scheduler=sched)
    return clf.eval()


@torch.no_grad()
def accuracy(clf, x, y, aug=None, seed: int = 0, batch: int = 60) -> float:
    """Top-1 accuracy: plain (aug None) or DE over DE_TIMES with aug's score model."""
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        p = clf(xb) if aug is None else dk.diffaug_ensemble(clf, aug, xb, times=DE_TIMES, seed=seed + i)
        correct += (p.argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--model", default="resnet10t", help="timm classifier (test_resnet: a smoke run)")
    p.add_argument("--granularity", choices=f8.GRANULARITIES, default="channel")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--limit-train", type=int, default=None, help="first N training digits only (smoke runs)")
    p.add_argument("--limit-test", type=int, default=None, help="first N test digits only (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == f8.REQUIRED_CAPABILITY
    dtype = torch.bfloat16 if device.type == "cuda" else None
    t0 = time.time()

    score, schedule = dk.load_default_score_model(device=device)
    score.eval().requires_grad_(False)
    xtr, ytr = (v.to(device) for v in digits("train", 32, 1).tensors)
    xte, yte = (v.to(device) for v in digits("test", 32, 1).tensors)
    xtr, ytr = xtr[:args.limit_train], ytr[:args.limit_train]
    xte, yte = xte[:args.limit_test], yte[:args.limit_test]
    calib = bench_fp8.noisy_batches(xtr[:args.calib_images], schedule, bench_fp8.TIMES, batch=64)
    fp8 = f8.to_fp8(score, calib, granularity=args.granularity, emulate=not hopper)
    augs = {"reference": dk.DiffAug(score, schedule, dtype=dtype), "fp8": dk.DiffAug(fp8, schedule, dtype=dtype)}
    tests = {"clean": xte, "gaussian_noise:5": corrupt(xte.cpu(), "gaussian_noise", 5, seed=args.seed,
                                                       preset="imagenet").to(device)}
    result = dict(device=str(device), reference=str(dtype or torch.float32).removeprefix("torch."),
                  fp8_path="kernel" if hopper else "emulated", granularity=args.granularity, model=args.model,
                  epochs=args.epochs, train_images=len(xtr), test_images=len(xte), threads=torch.get_num_threads(),
                  de_times=list(DE_TIMES), rows=[])
    for trained_with, aug in augs.items():
        t1 = time.time()
        clf = train(aug, xtr, ytr, args.epochs, args.batch, args.lr, args.seed, args.model)
        row = dict(trained_with=trained_with, train_s=round(time.time() - t1, 1))
        for name, x in tests.items():
            row[f"{name} plain"] = accuracy(clf, x, yte)
            for de_with, de_aug in augs.items():
                row[f"{name} DE {de_with}"] = accuracy(clf, x, yte, de_aug, seed=args.seed)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["wall_s"] = round(time.time() - t0, 1)
    cols = [k for k in result["rows"][0] if k not in ("trained_with", "train_s")]
    print(f"\ndigits, {len(xte)} test images; reference score model {result['reference']}, FP8 {result['fp8_path']} "
          f"({args.granularity} scales); {args.model}, {args.epochs} epochs; accuracy %")
    print(f"{'classifier trained with':<26}" + "".join(f" {c:>31}" for c in cols))
    for r in result["rows"]:
        print(f"{'DiffAug, ' + r['trained_with'] + ' score':<26}" + "".join(f" {100 * r[c]:31.1f}" for c in cols))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
