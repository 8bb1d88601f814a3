"""The only module that knows about torch.distributed; the rest asks `is_main_process()`.

Launched by `torchrun`, the environment carries RANK/WORLD_SIZE/LOCAL_RANK; we then use
NCCL on CUDA and gloo on CPU (how tests exercise it). Alone, everything is rank 0 of 1.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError
from .options import check_device


def init_from_env(device: str) -> torch.device:
    """Joins the process group if started by torchrun; returns this rank's device."""
    check_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _all_reduce_dict(values: dict[str, float], op, device: torch.device) -> dict[str, float]:
    """One collective for a whole dict of scalars (the same keys on every rank)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages logged scalars over ranks."""
    return {k: v / world_size() for k, v in _all_reduce_dict(values, dist.ReduceOp.SUM, device).items()}


def any_rank(flags: dict[str, bool], device: torch.device) -> dict[str, bool]:
    """Each flag True on every rank if it is True on any (one collective for all of them),
    e.g. a Ctrl-C that reached only some ranks yet, or a non-finite loss on one rank."""
    if not is_dist():
        return {k: bool(v) for k, v in flags.items()}
    return {k: v > 0 for k, v in _all_reduce_dict(flags, dist.ReduceOp.MAX, device).items()}


def job_totals(sums: dict[str, float], maxima: dict[str, float], device: torch.device) -> dict[str, float]:
    """Counts summed and durations maxed over ranks: what one summary line of a job reports."""
    return {**_all_reduce_dict(sums, dist.ReduceOp.SUM, device),
            **_all_reduce_dict(maxima, dist.ReduceOp.MAX, device)}


def batch_normaliser(count: torch.Tensor, minimum: float = 1.0) -> torch.Tensor:
    """A loss normaliser that counts over the batch (mask cells, RoIs), as one rank uses it.

    DeFeat normalises by counts over the whole batch. Under DDP each rank sees part of it
    and DDP averages the ranks' gradients, so a rank divides its own sum by the global
    count / world size: the averaged gradient is then that of sum / global count, which is
    what one process computes on the global batch. Alone: max(count, minimum). Detached.
    """
    c = count.detach().float()
    if not is_dist():
        return c.clamp(min=minimum)
    c = c.clone()
    dist.all_reduce(c)
    return c.clamp(min=minimum) / world_size()


class _GlobalSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient: every rank's inputs get
    the gradient of the sum of all ranks' losses through the statistic they share."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """A batch statistic's sum over the global batch, differentiable (PKD's channel means and
    variances). With `batch_normaliser` for the loss's own count, DDP's averaged gradient is
    the single-process gradient of the global batch. Alone: `x`."""
    return _GlobalSum.apply(x) if is_dist() else x


def gather_to_main(items: list) -> list | None:
    """Rank 0: every rank's list concatenated (rank order); other ranks: None. Alone: `items`."""
    if not is_dist():
        return items
    box = [None] * world_size() if is_main_process() else None
    dist.gather_object(items, box, dst=0)
    return [x for part in box for x in part] if is_main_process() else None


def broadcast_object(obj):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
