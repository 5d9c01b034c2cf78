"""The classifier model of the training and evaluation recipes: a timm network behind the input normalisation
(images in [-1, 1] in, logits out), and the loader of train_classifier checkpoints."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..utils import UsageError, torch_load

CHECKPOINT_FORMAT = "diffaug_kernels.train_classifier/1"
NORMS = {
    "identity": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def parse_normalize(spec: Optional[str], channels: int):
    """None / 'identity' -> None; 'imagenet' | 'cifar10' | 'm1,m2,m3:s1,s2,s3' -> (mean, std) tuples of
    `channels` floats (a 3-channel preset on grey images takes the channel average)."""
    if spec is None or spec == "identity":
        return None
    if spec in NORMS:
        mean, std = NORMS[spec]
    else:
        try:
            m, s = spec.split(":")
            mean, std = tuple(float(v) for v in m.split(",")), tuple(float(v) for v in s.split(","))
        except ValueError:
            raise UsageError(f"--normalize must be identity, imagenet, cifar10 or 'm1,m2,m3:s1,s2,s3', "
                             f"got {spec!r}") from None
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise UsageError(f"--normalize needs as many means as stds, stds positive; got {spec!r}")
    if len(mean) != channels:
        if channels == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        elif len(mean) == 1:
            mean, std = mean * channels, std * channels
        else:
            raise UsageError(f"--normalize {spec!r} has {len(mean)} channels but the images have {channels}")
    return tuple(mean), tuple(std)


class NormalizedClassifier(nn.Module):
    """x in [-1, 1] -> net(normalised x). normalize=None feeds x as is; (mean, std) maps x to [0, 1] first and
    then applies (x - mean) / std per channel (the affine is folded: x * a + b)."""

    def __init__(self, net: nn.Module, normalize=None):
        super().__init__()
        self.net = net
        self.normalize = normalize
        if normalize is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in normalize)
            self.register_buffer("scale", (0.5 / std).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("shift", ((0.5 - mean) / std).view(1, -1, 1, 1), persistent=False)

    def _normalized(self, x: Tensor) -> Tensor:
        if self.normalize is not None:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self._normalized(x))

    def penultimate(self, x: Tensor) -> Tensor:
        """The pooled features the final linear layer reads, [N, D] (timm's forward_head(pre_logits=True)):
        what ReAct, ASH and SCALE reshape (dk.ood)."""
        return self.net.forward_head(self.net.forward_features(self._normalized(x)), pre_logits=True)

    def linear_head(self) -> Optional[nn.Linear]:
        """The final nn.Linear (logits = head(penultimate(x))), or None when the net has none."""
        head = self.net.get_classifier() if hasattr(self.net, "get_classifier") else None
        return head if isinstance(head, nn.Linear) else None


def create_classifier(name: str, num_classes: int, in_chans: int, normalize=None, **kwargs) -> NormalizedClassifier:
    """timm.create_model(name, pretrained=False, ...) behind the input normalisation (nothing is downloaded)."""
    import timm

    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UsageError(f"--model {name!r} is not a timm model ({e}); see timm.list_models()") from None
        raise
    return NormalizedClassifier(net, normalize)


def load_classifier(path, device=None) -> NormalizedClassifier:
    """The classifier of a train_classifier checkpoint, in eval mode, with its normalisation."""
    ck = torch_load(path, "train_classifier")
    if not isinstance(ck, dict):
        raise UsageError(f"{path} is not a train_classifier checkpoint (it holds a {type(ck).__name__}, not a dict)")
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a train_classifier checkpoint (format {ck.get('format')!r})")
    try:
        norm = ck["normalize"]
        model = create_classifier(ck["model_name"], ck["num_classes"], ck["in_chans"],
                                  None if norm is None else (tuple(norm[0]), tuple(norm[1])))
        model.net.load_state_dict(ck["model"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        if isinstance(e, UsageError):
            raise
        why = f"missing entry {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise UsageError(f"{path} is a broken train_classifier checkpoint ({why})") from None
    args = ck.get("args") if isinstance(ck.get("args"), dict) else {}
    data = args.get("data")
    # the image size it was trained at (None when the checkpoint does not say): evaluate uses it by default
    model.trained_image_size = args.get("image_size") or (
        None if data is None else 32 if data == "digits" or str(data).startswith("cifar10:") else 224)
    return model.to(device or "cpu").eval()
