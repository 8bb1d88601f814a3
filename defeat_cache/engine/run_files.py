"""What a training run writes to its folder and how --resume reads it back.

RUN_DIR holds config.json, metrics.jsonl, train.log, tb/ (TensorBoard events; engine.run_log
writes those three), last.pt, final.pt, best.pt and epoch_NN.pt. last.pt is the trained model
(`models.checkpoint.trained_model_payload`) plus the training state (the TrainStep with its
adapters, optimizer, lr scheduler, AMP scaler, RNG) and the run's state (cumulative training
time); final.pt, best.pt (the evaluation with the highest AP, with its metrics) and
epoch_NN.pt (after NN epochs, --keep-epochs) are the trained model alone, which is all
`load_trained` and `eval` need.

A folder holding a run is only ever continued (--resume) or started over (--force, which
removes these files and nothing else).
"""

from __future__ import annotations

import json
import re
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


# ---------------------------------------------------------------- the run folder
#: The files that make a folder a run: training into it needs --resume or --force.
RUN_MARKERS = ("config.json", "last.pt", "metrics.jsonl", "final.pt")
#: Every file a run writes at the top of its folder (epoch_NN.pt and tb/'s event files besides).
RUN_FILES = (*RUN_MARKERS, "best.pt", "train.log")
_EPOCH_FILE = re.compile(r"epoch_\d+\.pt")
_TB_EVENTS = "events.out.tfevents."


def check_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuses to train into a folder that holds a run unless told to continue or restart it."""
    if resume and force:
        raise UserError("--resume continues the run in --out and --force starts it over: give one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found and not (resume or force):
        raise UserError(f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume, "
                        "start it over with --force (removes that run's files, nothing else), or choose another --out")


def _our_files(out: Path) -> list[Path]:
    """The files a run wrote in `out` (with their .partial leftovers); nothing else."""
    names = [*RUN_FILES, *(p.name for p in out.glob("epoch_*.pt") if _EPOCH_FILE.fullmatch(p.name))]
    files = [out / n for n in names] + [out / (n + ".partial") for n in names]
    tb = out / "tb"
    if tb.is_dir():
        files += [p for p in tb.iterdir() if p.is_file() and p.name.startswith(_TB_EVENTS)]
    return [f for f in files if f.is_file()]


def clear_run(out: Path) -> list[str]:
    """Removes an earlier run's files from `out` (a fresh start, or --force) and returns their
    names; files the run did not write stay, and so does tb/ when anything else is in it."""
    removed = _our_files(out)
    for f in removed:
        f.unlink()
    tb = out / "tb"
    if tb.is_dir() and not any(tb.iterdir()):
        tb.rmdir()
    return [str(f.relative_to(out)) for f in removed]


def trim_metrics(path: Path, iteration: int) -> list[dict]:
    """Keeps the metrics.jsonl lines up to `iteration` (where a resumed run continues) and
    returns them: what a killed run logged after its last checkpoint is trained and logged
    again, so the file keeps one line per logged iteration (and a cut-off last line goes)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("iter", iteration + 1) <= iteration:
            kept.append(record)
    tmp = path.with_suffix(".jsonl.partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


# ---------------------------------------------------------------- checkpoints
class Checkpoints:
    """RUN_DIR/last.pt (rewritten every `every_minutes` and at the end), final.pt (when the
    schedule is done), best.pt (the evaluation with the highest AP) and epoch_NN.pt.
    `step` is the engine.train.TrainStep: its `student` is the trained model; `clock` gives
    the cumulative training seconds last.pt keeps. Rank 0 writes them; every rank may call."""

    def __init__(self, out: Path, spec: ModelSpec, data: DetectionData, pre: Preprocessing, step: nn.Module,
                 optim: Optimization, schedule: Schedule, every_minutes: float, clock=None):
        self.out = out
        self.last, self.final, self.best = out / "last.pt", out / "final.pt", out / "best.pt"
        self.spec, self.data, self.pre = spec, data, pre
        self.step, self.optim, self.schedule = step, optim, schedule
        self.every_seconds = every_minutes * 60
        self.clock = clock
        self.best_eval: dict | None = None  # {"AP", "iter", "epoch", ...} of best.pt (rank 0)
        self.restart_timer()

    def restart_timer(self) -> None:
        self._written_at = time.time()

    def _trained_model(self, iteration: int) -> dict:
        return trained_model_payload(self.spec, self.data.num_classes, self.data.class_names, self.pre,
                                     iteration, self.step.student.state_dict())

    def save_last(self, iteration: int) -> None:
        if du.is_main_process():
            run_state = {"train_seconds": self.clock.seconds()} if self.clock is not None else {}
            save_checkpoint(self.last, **self._trained_model(iteration), total_iters=self.schedule.total_iters,
                            global_batch=self.schedule.global_batch, train_state=self.step.state_dict(),
                            **self.optim.state_dict(), rng={"torch": torch.get_rng_state()}, run_state=run_state)

    def save_last_if_due(self, iteration: int) -> None:
        if time.time() - self._written_at > self.every_seconds:
            self.save_last(iteration)
            self.restart_timer()

    def save_final(self, iteration: int) -> None:
        if du.is_main_process():
            save_checkpoint(self.final, **self._trained_model(iteration))

    def save_epoch(self, epochs_done: int, iteration: int) -> Path:
        """epoch_NN.pt: the model after `epochs_done` epochs (--keep-epochs)."""
        path = self.out / f"epoch_{epochs_done:02d}.pt"
        if du.is_main_process():
            save_checkpoint(path, **self._trained_model(iteration))
        return path

    def load_best(self) -> None:
        """Resuming: best.pt's evaluation is the one to beat (rank 0)."""
        if du.is_main_process() and self.best.is_file():
            self.best_eval = read_checkpoint(self.best).get("best")

    def save_best_if_better(self, iteration: int, evaluation: dict | None) -> bool:
        """Writes best.pt when `evaluation` (`{"AP", "iter", "epoch", ...}`; None on ranks
        other than 0) has a higher AP than best.pt's; returns whether it did. Ties keep the
        earlier model."""
        if evaluation is None or (self.best_eval is not None and evaluation["AP"] <= self.best_eval["AP"]):
            return False
        save_checkpoint(self.best, **self._trained_model(iteration), best=evaluation)
        self.best_eval = evaluation
        return True


def resume(last: Path, spec: ModelSpec, schedule: Schedule, step: nn.Module, optim: Optimization) -> tuple[int, dict]:
    """Loads `last` (if it exists) into the step and optimizer; returns the iteration to continue
    from and the run state saved with it (`{"train_seconds": ...}`; {} from scratch)."""
    # Rank 0 reads last.pt and hands it to the others (ranks on other nodes may not see its --out),
    # so every rank resumes from the same state or none does.
    ck = du.broadcast_object(read_checkpoint(last) if du.is_main_process() and last.is_file() else None)
    if ck is None:
        log(f"--resume: no {last} yet, starting from scratch")
        return 0, {}
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
    return iteration, dict(ck.get("run_state") or {})


__all__ = ["Checkpoints", "RUN_FILES", "RUN_MARKERS", "check_run_dir", "clear_run", "resume", "trim_metrics",
           "write_config"]
