#!/usr/bin/env python
"""Train a timm classifier with DiffAug (loss = CE(f(x), y) + CE(f(x0_hat), y)); torchrun-ready.

    python python/train_classifier.py --data digits --out runs/digits-diffaug
    torchrun --nproc_per_node=8 python/train_classifier.py --data /data/imagenet --model resnet50 \\
        --score-model 256x256_diffusion_uncond.pt --score-config imagenet256_uncond --out runs/in1k

The same as `python -m diffaug_kernels train-classifier ...` (diffaug_kernels/commands/train_classifier.py),
as a file path for torchrun; `--help` lists the options.
"""
import os
import sys

try:
    from diffaug_kernels.cli import main
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffaug_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))
