"""The commands' runs under torchrun: the process group, the device of each rank and the few collectives they use.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; with more than one process a command joins the process group
(nccl on CUDA, gloo on CPU) and rank r runs on cuda:LOCAL_RANK when CUDA is used. Every collective here is a
no-op returning the local value in a lone process, so a command calls them unconditionally.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from ..utils import UsageError


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Reads torchrun's WORLD_SIZE / RANK / LOCAL_RANK; with more than one process, joins the process group
    (nccl on CUDA, gloo on CPU). The device: cuda:LOCAL_RANK when CUDA is there (and not --device cpu); a
    device with an index (cuda:1) is taken as given."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but torch sees no CUDA device")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        info.initialized_here = True
    return info


def close_distributed(info: DistInfo) -> None:
    """Leaves the process group that init_distributed joined."""
    if info.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
        info.initialized_here = False


def all_reduce(t: Tensor, info: DistInfo) -> Tensor:
    """t summed over the ranks, in place (t on info.device: nccl reduces CUDA tensors only)."""
    if info.distributed:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether flag is set on any rank (a collective: every rank calls it at the same step)."""
    if not info.distributed:
        return flag
    return bool(all_reduce(torch.tensor([int(flag)], device=info.device), info).item())


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class Relayed(UsageError):
    """An error another rank met, raised here so that every rank stops; rank 0 says it."""


def together(info: DistInfo, fn, main_only: bool = False, share: bool = False):
    """fn() run on every rank (main_only: on rank 0 alone), then a collective: when it failed anywhere, every rank
    raises (a rank its own error; the others Relayed, rank 0's words, or 'rank r: ...'), so no rank waits for
    one that has stopped. Returns fn's result here, or rank 0's on every rank with share."""
    res = err = None
    if info.is_main or not main_only:
        try:
            res = fn()
        except Exception as e:  # every rank must hear of it, whatever it is
            if not info.distributed:
                raise
            err = e
    if not info.distributed:
        return res
    said = None if err is None else (str(err) if isinstance(err, (UsageError, FileNotFoundError))
                                     else f"{type(err).__name__}: {err}")
    got = all_gather_object((said, res if share and info.is_main else None), info)
    failed = [(r, m) for r, (m, _) in enumerate(got) if m is not None]
    if failed:
        if err is not None and (info.is_main or not isinstance(err, (UsageError, FileNotFoundError))):
            raise err  # a rank's own error other than a usage error keeps its traceback there
        r, msg = failed[0]
        raise Relayed(msg if r == 0 else f"rank {r}: {msg}")
    return got[0][1] if share else res
