"""What a training run writes to its folder (config.json, last.pt, final.pt) and how --resume reads last.pt back.

last.pt is the trained model (`models.checkpoint.trained_model_payload`) plus the training
state (the TrainStep with its adapters, optimizer, lr scheduler, AMP scaler, RNG); final.pt
is the trained model alone, which is all `load_trained` and `eval` need.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from .. import distributed as du
from ..data.records import DetectionData
from ..errors import UserError
from ..models.checkpoint import read_checkpoint, save_checkpoint, trained_model_payload
from ..models.zoo import ModelSpec, spec_dict
from ..progress import log
from ..views import Preprocessing
from .schedule import Optimization, Schedule


def write_config(path: Path, options: dict, spec: ModelSpec, data: DetectionData, pre: Preprocessing,
                 schedule: Schedule) -> None:
    """config.json: the run's options and what they resolved to."""
    # storage options may hold credentials: config.json records only which were given
    options = dict(options, storage_options=sorted(options.get("storage_options") or {}))
    config = {"options": options, "model": spec_dict(spec), "lr": schedule.lr, "total_iters": schedule.total_iters,
              "lr_steps": schedule.lr_steps, "global_batch": schedule.global_batch, "num_classes": data.num_classes,
              "class_names": data.class_names, "preprocessing": pre.to_dict(), "version": __version__}
    path.write_text(json.dumps(config, indent=2, default=str))


class Checkpoints:
    """RUN_DIR/last.pt (rewritten every `every_minutes` and at the end) and final.pt (when the
    schedule is done). `step` is the engine.train.TrainStep: its `student` is the trained model.
    Rank 0 writes them; every rank may call."""

    def __init__(self, out: Path, spec: ModelSpec, data: DetectionData, pre: Preprocessing, step: nn.Module,
                 optim: Optimization, schedule: Schedule, every_minutes: float):
        self.last, self.final = out / "last.pt", out / "final.pt"
        self.spec, self.data, self.pre = spec, data, pre
        self.step, self.optim, self.schedule = step, optim, schedule
        self.every_seconds = every_minutes * 60
        self.restart_timer()

    def restart_timer(self) -> None:
        self._written_at = time.time()

    def _trained_model(self, iteration: int) -> dict:
        return trained_model_payload(self.spec, self.data.num_classes, self.data.class_names, self.pre,
                                     iteration, self.step.student.state_dict(), self.data.category_ids)

    def save_last(self, iteration: int) -> None:
        if du.is_main_process():
            save_checkpoint(self.last, **self._trained_model(iteration), total_iters=self.schedule.total_iters,
                            global_batch=self.schedule.global_batch, train_state=self.step.state_dict(),
                            **self.optim.state_dict(), rng={"torch": torch.get_rng_state()})

    def save_last_if_due(self, iteration: int) -> None:
        if time.time() - self._written_at > self.every_seconds:
            self.save_last(iteration)
            self.restart_timer()

    def save_final(self, iteration: int) -> None:
        if du.is_main_process():
            save_checkpoint(self.final, **self._trained_model(iteration))


def resume(last: Path, spec: ModelSpec, schedule: Schedule, step: nn.Module, optim: Optimization) -> int:
    """Loads `last` (if it exists) into the step and optimizer; returns the iteration to continue from."""
    # Rank 0 reads last.pt and hands it to the others (ranks on other nodes may not see its --out),
    # so every rank resumes from the same state or none does.
    ck = du.broadcast_object(read_checkpoint(last) if du.is_main_process() and last.is_file() else None)
    if ck is None:
        log(f"--resume: no {last} yet, starting from scratch")
        return 0
    if ck.get("model", {}).get("name") != spec.name:
        raise UserError(f"{last}: checkpoint is of model {ck.get('model', {}).get('name')!r}, not {spec.name!r}")
    # Iterations, epochs and the lr schedule count global batches: another size would
    # silently skip or repeat data and shift the lr steps.
    if ck.get("global_batch", schedule.global_batch) != schedule.global_batch:
        raise UserError(f"{last}: was trained with a global batch of {ck['global_batch']} images "
                        f"(ranks x --batch-size), this run has {du.world_size()} x {schedule.batch_size} = "
                        f"{schedule.global_batch}; resume with the same global batch, or start a new --out")
    step.load_state_dict(ck["train_state"])
    optim.load_state_dict(ck)
    iteration = int(ck["iteration"])
    torch.set_rng_state(ck["rng"]["torch"])
    log(f"resumed from {last} at iteration {iteration}/{schedule.total_iters}")
    return iteration


__all__ = ["Checkpoints", "resume", "write_config"]
