"""What a training run writes to its folder and how --resume reads it back.

RUN_DIR holds config.json, metrics.jsonl, train.log, tb/ (TensorBoard events; engine.run_log
writes those three), last.pt, final.pt, best.pt and epoch_NN.pt. last.pt is the trained model
(`models.checkpoint.trained_model_payload`) plus the training state (the TrainStep with its
adapters, optimizer, lr scheduler, AMP scaler, RNG) and the run's state (cumulative training
time); final.pt, best.pt (the evaluation with the highest AP, with its metrics) and
epoch_NN.pt (after NN epochs, --keep-epochs) are the trained model alone, which is all
`load_trained` and `eval` need.

A folder holding a run is only ever continued (--resume) or started over (--force, which
removes these files and nothing else), by one job at a time: the job holds RUN_DIR/train.lock
(`RunLock`, the same lock as extraction's, defeat_cache/locking.py) from before it checks,
clears or writes anything there until it ends.
"""

from __future__ import annotations

import errno
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
from ..locking import FolderLock, LocalFiles
from ..models.checkpoint import read_checkpoint, save_checkpoint, trained_model_payload
from ..models.zoo import ModelSpec, spec_dict
from ..progress import log
from ..views import Preprocessing
from .schedule import Optimization, Schedule


def run_config(options: dict, spec: ModelSpec, data: DetectionData, pre: Preprocessing, schedule: Schedule) -> dict:
    """What config.json holds: the run's options and what they resolved to, as JSON values."""
    # storage options may hold credentials: config.json records only which were given
    options = dict(options, storage_options=sorted(options.get("storage_options") or {}))
    config = {"options": options, "model": spec_dict(spec), "lr": schedule.lr, "total_iters": schedule.total_iters,
              "lr_steps": schedule.lr_steps, "global_batch": schedule.global_batch, "num_classes": data.num_classes,
              "class_names": data.class_names, "dataset_fingerprint": data.fingerprint(),
              "preprocessing": pre.to_dict(), "version": __version__}
    return json.loads(json.dumps(config, default=str))


def write_config(path: Path, options: dict, spec: ModelSpec, data: DetectionData, pre: Preprocessing,
                 schedule: Schedule) -> None:
    """config.json: the run's options and what they resolved to."""
    path.write_text(json.dumps(run_config(options, spec, data, pre, schedule), indent=2))


def read_config(path: Path) -> dict | None:
    """A run's config.json, or None if there is none (or it is unreadable: then nothing can be compared)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


# Options a resumed run may change, since they do not change what is computed: where and how fast it
# runs, what it prints, how often last.pt is written, when it stops (--max-iters only cuts the
# schedule short), what else it writes (evaluations, epoch checkpoints; evaluating changes no
# weight) and how the folder was started (--force). --batch-size may change while the global batch
# stays (`resume` checks that).
# The dataset and the student are compared by what they resolve to (the dataset's fingerprint, the
# model's config), so a moved dataset folder or a model named by path resumes. Storage options are
# endpoints and credentials. Every other option, and a --cache or --teacher given by another path, is
# a change: resuming would mix two computations under one config.json.
RESUME_MAY_CHANGE = frozenset({"out", "resume", "force", "device", "workers", "progress", "log_every",
                               "checkpoint_minutes", "eval_every", "keep_epochs", "max_iters", "batch_size", "data",
                               "student", "storage_options", "cache_in_memory"})
# What the options resolved to, compared too (total_iters follows --max-iters; global_batch has its own check).
_RESOLVED = {"model": "student model", "dataset_fingerprint": "dataset fingerprint", "lr": "resolved lr",
             "lr_steps": "lr steps", "num_classes": "classes", "class_names": "class names",
             "preprocessing": "preprocessing"}
_ABSENT = object()


def _differences(old, new, label: str, prefix: str):
    """(label, old, new) of every difference; nested dicts (a preset, a model config) key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            if k == "description":  # a preset's or model's prose changes nothing computed
                continue
            yield from _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}", f"{prefix}{k}.")
    elif old != new:
        yield label, old, new


def _show(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, dict):
        return f"preset {value['name']}" if "name" in value else "{...}"
    return repr(value)


def check_resume_config(old: dict, new: dict, where: str | Path) -> None:
    """Refuses to resume the run of config.json `old` (at `where`) as the run of config `new` if that
    changes the computation; one line says what differs (old -> new)."""
    found = []
    old_options, new_options = old.get("options", {}), new.get("options", {})
    for k in old_options:  # keys of both only: a config written by an older version lacks some
        if k in new_options and k not in RESUME_MAY_CHANGE:
            found += _differences(old_options[k], new_options[k], f"--{k.replace('_', '-')}", f"{k}.")
    for k, label in _RESOLVED.items():
        if k in old and k in new:
            found += _differences(old[k], new[k], label, f"{label}.")
    if found:
        shown = ", ".join(f"{label} {_show(a)} -> {_show(b)}" for label, a, b in found[:5])
        more = f" (+{len(found) - 5} more)" if len(found) > 5 else ""
        raise UserError(f"{where}: --resume with a changed computation: {shown}{more}; resume with this run's "
                        "options (its config.json), or train into a new --out")


# ---------------------------------------------------------------- the run folder
#: The files that make a folder a run: training into it needs --resume or --force.
RUN_MARKERS = ("config.json", "last.pt", "metrics.jsonl", "final.pt")
#: Every file a run writes at the top of its folder (epoch_NN.pt and tb/'s event files besides).
RUN_FILES = (*RUN_MARKERS, "best.pt", "train.log")
_EPOCH_FILE = re.compile(r"epoch_\d+\.pt")
_TB_EVENTS = "events.out.tfevents."


RUN_LOCK = "train.lock"


class RunLock(FolderLock):
    """``with RunLock(out): ...`` holds the run folder `out` (a local folder, made if missing):
    a second training job into it is refused naming the holder; a stale lock (its process gone
    from this host) is taken over (`took_over` names the holder it was taken from). A folder
    the lock made is removed again on release if nothing else was written into it (a run
    refused before it wrote anything leaves nothing behind)."""

    name = RUN_LOCK
    held_message = ("{path} is being trained by another process ({holder}); wait for it to finish, or if that "
                    "process is gone, delete {lock} and run again")
    broken_message = ("{path}: {break_file} was left by a process that died while taking over a stale run lock; "
                      "delete it and run again")

    def __init__(self, out: Path):
        out = Path(out)
        super().__init__(out, LocalFiles(out))
        self._made_folder = False

    def acquire(self) -> None:
        existed = self.path.is_dir()
        super().acquire()
        self._made_folder = not existed

    def release(self) -> None:
        held = self.held
        super().release()
        if held and self._made_folder:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass


def check_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuses to train into a folder that holds a run unless told to continue or restart it.
    Called holding the folder's `RunLock` (a run that finished meanwhile is seen)."""
    if resume and force:
        raise UserError("--resume continues the run in --out and --force starts it over: give one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found and not (resume or force):
        raise UserError(f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume, "
                        "start it over with --force (removes that run's files, nothing else), or choose another --out")


def _our_files(out: Path) -> list[Path]:
    """The files a run wrote in `out` (with their .partial leftovers); nothing else. The run
    lock's files are the run's too but never listed: clearing happens holding the lock, and a
    lock file of another job (its temporary file, its break lock) is that job's to remove."""
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
        self.saved_iteration: int | None = None  # of the last.pt this process wrote
        self.restart_timer()

    def restart_timer(self) -> None:
        self._written_at = time.time()

    def _trained_model(self, iteration: int) -> dict:
        return trained_model_payload(self.spec, self.data.num_classes, self.data.class_names, self.pre,
                                     iteration, self.step.student.state_dict(), self.data.category_ids)

    def save_last(self, iteration: int) -> None:
        if du.is_main_process():
            run_state = {"train_seconds": self.clock.seconds()} if self.clock is not None else {}
            self._save(self.last, **self._trained_model(iteration), total_iters=self.schedule.total_iters,
                       global_batch=self.schedule.global_batch, train_state=self.step.state_dict(),
                       **self.optim.state_dict(), rng={"torch": torch.get_rng_state()}, run_state=run_state)
            self.saved_iteration = iteration

    def save_last_if_due(self, iteration: int) -> None:
        if time.time() - self._written_at > self.every_seconds:
            self.save_last(iteration)
            self.restart_timer()

    def save_final(self, iteration: int) -> None:
        if du.is_main_process():
            self._save(self.final, **self._trained_model(iteration))

    def _save(self, path: Path, **payload) -> None:
        """save_checkpoint; a full disk is a one-line error saying what is intact and how to go on
        (save_checkpoint leaves the previous file, and no partial one)."""
        try:
            save_checkpoint(path, **payload)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(f"{path}: no space left on device while writing the checkpoint of iteration "
                            f"{payload['iteration']}; {self._intact()}; free space, then re-run with --resume"
                            + (" (it writes final.pt)" if path == self.final else "")) from None

    def _intact(self) -> str:
        """What a failed write leaves: the last.pt written before, if any."""
        iteration = self.saved_iteration
        if iteration is None and self.last.is_file():  # written by an earlier process of this run
            try:
                iteration = int(read_checkpoint(self.last)["iteration"])
            except (UserError, KeyError, TypeError, ValueError):
                return f"{self.last.name} of an earlier iteration is intact"
        if iteration is None:
            return "no checkpoint was written yet (a re-run starts from iteration 0)"
        return f"{self.last.name} of iteration {iteration} is intact"

    def save_epoch(self, epochs_done: int, iteration: int) -> Path:
        """epoch_NN.pt: the model after `epochs_done` epochs (--keep-epochs)."""
        path = self.out / f"epoch_{epochs_done:02d}.pt"
        if du.is_main_process():
            self._save(path, **self._trained_model(iteration))
        return path

    def load_best(self) -> None:
        """Resuming: best.pt's evaluation is the one to beat (rank 0)."""
        if du.is_main_process() and self.best.is_file():
            self.best_eval = read_checkpoint(self.best).get("best")

    def save_best_if_better(self, iteration: int, evaluation: dict | None) -> bool:
        """Writes best.pt when `evaluation` (`{"AP", "iter", "epoch", ...}`; None on ranks
        other than 0) has a higher AP than best.pt's; returns whether it did. Ties keep the
        earlier model; an AP of None (no ground truth to score) is never the best."""
        if evaluation is None or evaluation["AP"] is None or (
                self.best_eval is not None and evaluation["AP"] <= self.best_eval["AP"]):
            return False
        self._save(self.best, **self._trained_model(iteration), best=evaluation)
        self.best_eval = evaluation
        return True


def resume(last: Path, spec: ModelSpec, schedule: Schedule, step: nn.Module, optim: Optimization,
           config: dict | None = None) -> tuple[int, dict]:
    """Loads `last` (if it exists) into the step and optimizer; returns the iteration to continue
    from and the run state saved with it (`{"train_seconds": ...}`; {} from scratch).

    `config` (`run_config` of this run) is checked against the run's config.json first."""
    # Rank 0 reads last.pt and config.json and hands them to the others (ranks on other nodes may not
    # see its --out), so every rank resumes from the same state or none does.
    config_path = last.parent / "config.json"
    ck, old_config = du.broadcast_object((read_checkpoint(last), read_config(config_path))
                                         if du.is_main_process() and last.is_file() else (None, None))
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
    if config is not None and old_config is not None:
        check_resume_config(old_config, config, config_path)
    _check_state_fits(last, step, ck["train_state"])
    step.load_state_dict(ck["train_state"])
    optim.load_state_dict(ck)
    iteration = int(ck["iteration"])
    torch.set_rng_state(ck["rng"]["torch"])
    log(f"resumed from {last} at iteration {iteration}/{schedule.total_iters}")
    return iteration, dict(ck.get("run_state") or {})


def _check_state_fits(last: Path, step: nn.Module, state: dict) -> None:
    """A one-line refusal where load_state_dict would raise its multi-line RuntimeError: a last.pt
    of other modules (config.json edited or missing, another version)."""
    own = step.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {what} keys (e.g. {keys[0]})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("reshaped", shapes)) if keys]
        raise UserError(f"{last}: its training state does not fit this run's modules: {', '.join(parts)}; "
                        "resume with this run's options, or train into a new --out")


__all__ = ["Checkpoints", "RUN_FILES", "RUN_LOCK", "RUN_MARKERS", "RunLock", "check_resume_config", "check_run_dir", "clear_run",
           "read_config", "resume", "run_config", "trim_metrics", "write_config"]
