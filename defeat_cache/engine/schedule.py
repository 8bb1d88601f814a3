"""The paper's SGD schedule: how long a run is, its lr warm-up and steps, and the optimizer that follows it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed as du
from ..errors import UserError


@dataclass(frozen=True)
class Schedule:
    """The run's length and lr schedule. Iterations count global batches (all ranks' together)."""

    batch_size: int  # per process
    global_batch: int  # batch_size x ranks
    batches_per_epoch: int
    schedule_iters: int  # the full schedule's length: warm-up and lr steps follow it
    total_iters: int  # where this run stops: schedule_iters, or --max-iters if fewer
    lr_steps: list[int]  # iterations where the lr drops by 10
    lr: float


def plan_schedule(samples_per_epoch: int, batch_size: int, *, epochs: float | None, schedule: float,
                  max_iters: int | None, lr: float | None, lr_per_image: float,
                  lr_step_epochs: tuple[float, ...] | None = None) -> Schedule:
    """12 x `schedule` epochs unless `epochs` is given, lr /10 after 8/12 and 11/12 of them
    (or after each of `lr_step_epochs`); `lr` default: `lr_per_image` x the global batch.
    `samples_per_epoch`: this rank's."""
    batches_per_epoch = max(1, math.ceil(samples_per_epoch / batch_size))
    epochs = run_epochs(epochs, schedule)
    schedule_iters = max(1, int(round(epochs * batches_per_epoch)))
    # --max-iters only decides when to stop: the schedule (warm-up, steps) stays the full run's.
    total_iters = min(schedule_iters, max_iters) if max_iters else schedule_iters
    if lr_step_epochs is None:
        lr_steps = [int(round(epochs * batches_per_epoch * f / 12)) for f in (8, 11)]
    else:
        lr_steps = [int(round(e * batches_per_epoch)) for e in lr_step_epochs]
    global_batch = batch_size * du.world_size()
    lr = lr if lr is not None else lr_per_image * global_batch
    return Schedule(batch_size, global_batch, batches_per_epoch, schedule_iters, total_iters, lr_steps, lr)


def run_epochs(epochs: float | None, schedule: float) -> float:
    """The run's length in epochs: `epochs`, or 12 x `schedule` (the paper's 1x = 12)."""
    return epochs if epochs is not None else 12 * schedule


def parse_lr_steps(text: str) -> tuple[float, ...]:
    """`--lr-steps 8,11` -> (8.0, 11.0): the epochs after which the lr drops by 10 ("" = never)."""
    steps = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            steps.append(float(part))
        except ValueError:
            raise UserError(f"--lr-steps {text!r}: {part!r} is not a number; give epochs, e.g. --lr-steps 8,11") from None
    return tuple(steps)


def _lr_lambda(steps: list[int], warmup_iters: int, warmup_factor: float):
    def f(it: int) -> float:
        factor = 0.1 ** sum(it >= s for s in steps)
        if it < warmup_iters:  # linear warm-up, as mmdetection and torchvision references
            alpha = it / warmup_iters
            factor *= warmup_factor * (1 - alpha) + alpha
        return factor
    return f


@dataclass
class Optimization:
    """SGD with the lr schedule and AMP's gradient scaler: what a step updates and last.pt keeps."""

    params: list[nn.Parameter]
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    grad_clip: float  # max gradient norm; 0 = no clipping
    use_amp: bool

    def update(self, loss: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """One SGD step on `loss`; returns (the gradient norm before clipping or None, the lr used)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip else None
        lr_used = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm, lr_used

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def build_optimization(module: nn.Module, schedule: Schedule, *, momentum: float, weight_decay: float,
                       warmup_iters: int, warmup_factor: float, grad_clip: float, use_amp: bool) -> Optimization:
    """SGD over `module`'s trainable parameters, linear warm-up (at most a third of the schedule), then the steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=momentum, weight_decay=weight_decay)
    warmup_iters = min(warmup_iters, schedule.schedule_iters // 3 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(schedule.lr_steps, warmup_iters, warmup_factor))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return Optimization(params, optimizer, scheduler, scaler, grad_clip, use_amp)


__all__ = ["Optimization", "Schedule", "build_optimization", "parse_lr_steps", "plan_schedule", "run_epochs"]
