"""What a training run reports while it runs, and its clock.

`RunLog` keeps the progress bar and writes RUN_DIR/metrics.jsonl (one JSON object a line),
TensorBoard event files under RUN_DIR/tb/ and the progress lines of RUN_DIR/train.log (the
log messages get there through `progress.log_file`). Rank 0 writes the files; every rank calls
`write` at the same iterations (it averages the loss terms over ranks).

metrics.jsonl has two kinds of lines, both with `iter`, `epoch` (0-based, the epoch that
iteration belongs to) and `time` (cumulative training seconds over all of a run's resumes,
evaluations excluded):
- every --log-every iterations and at the last one: each loss term by name, `loss` (their
  sum), `lr`, `images_per_s` (all ranks together) and `grad_norm` (before clipping);
- one per evaluation (--eval-every): `eval` (the COCO numbers by name, as `engine.evaluate`
  returns them), `epochs_done` and `eval_seconds`.
TensorBoard gets the same numbers as scalars named `train/<key>` and `val/<name>`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import distributed as du
from ..progress import log, progress
from .schedule import Schedule


class RunClock:
    """Cumulative training seconds of a run: the seconds of earlier sessions (`before`, from
    last.pt when resuming) plus this session's, without the time spent evaluating."""

    def __init__(self, before: float = 0.0):
        self.before = before
        self.started = time.time()
        self.paused = 0.0

    def seconds(self) -> float:
        return self.before + time.time() - self.started - self.paused

    @contextmanager
    def pause(self):
        t = time.time()
        try:
            yield
        finally:
            self.paused += time.time() - t


class RunLog:
    """The progress bar, metrics.jsonl (appended), TensorBoard events and train.log's progress lines.

    `iteration`: where this session starts; a resumed session's TensorBoard writer drops the
    events a killed session logged after it (TensorBoard's purge_step), as `run_files.trim_metrics`
    does for metrics.jsonl."""

    def __init__(self, out: Path, schedule: Schedule, iteration: int, log_every: int, clock: RunClock,
                 show_progress: bool, device: torch.device, resumed: bool = False):
        self.log_every, self.schedule, self.clock, self.device = log_every, schedule, clock, device
        self.total_iters = schedule.total_iters
        main = du.is_main_process()
        self.file = open(out / "metrics.jsonl", "a") if main else None
        self.tb = _summary_writer(out / "tb", iteration + 1 if resumed else None) if main else None
        self.bar = progress(schedule.total_iters * schedule.global_batch, "train", unit="img",
                            initial=iteration * schedule.global_batch, enabled=show_progress)
        self.session_start, self.session_iter = time.time(), iteration
        self.restart_window()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()

    def restart_window(self) -> None:
        """Starts a new images/s window (after an evaluation, which is not training time)."""
        self.window_start, self.window_images = time.time(), 0

    def count(self, images: int) -> None:
        """`images` more were trained on (all ranks together)."""
        self.window_images += images
        self.bar.update(images)

    def due(self, iteration: int) -> bool:
        return iteration % self.log_every == 0 or iteration == self.total_iters

    def write(self, iteration: int, epoch: int, losses: dict, loss: torch.Tensor, lr: float,
              grad_norm: torch.Tensor | None) -> None:
        """One metrics line; a collective (every rank calls it at the same iterations)."""
        now = time.time()
        record = {k: float(v.detach()) for k, v in losses.items()}
        record["loss"] = float(loss.detach())
        record = du.all_reduce_mean(record, self.device)
        ips = self.window_images / max(now - self.window_start, 1e-9)
        record.update(iter=iteration, epoch=epoch, lr=lr, images_per_s=round(ips, 2),
                      time=round(self.clock.seconds(), 2))
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{ips:.1f}")
        self.restart_window()
        if not du.is_main_process():
            return
        self._append(record)
        for key, value in record.items():
            if key not in ("iter", "epoch", "time"):
                self.tb.add_scalar(f"train/{key}", value, iteration)
        self.tb.flush()
        log(self._progress_line(record), console=False)

    def write_eval(self, iteration: int, epoch: int, metrics: dict, eval_seconds: float) -> dict:
        """One evaluation's line (rank 0: `metrics` from `engine.evaluate`); returns it."""
        record = {"iter": iteration, "epoch": epoch,
                  "epochs_done": round(iteration / self.schedule.batches_per_epoch, 3),
                  "time": round(self.clock.seconds(), 2), "eval_seconds": round(eval_seconds, 1), "eval": metrics}
        self._append(record)
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and value >= 0:  # pycocotools' -1: no ground truth in that area range, nothing to plot
                self.tb.add_scalar(f"val/{name}", value, iteration)
        self.tb.flush()
        return record

    def _append(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def _progress_line(self, record: dict) -> str:
        """train.log's line for a metrics line: what the bar and its postfix show, in words."""
        it, s = record["iter"], self.schedule
        done = it - self.session_iter
        eta = (time.time() - self.session_start) / done * (self.total_iters - it) if done else 0.0
        terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
        return (f"train iter {it}/{self.total_iters} ({it * s.global_batch}/{self.total_iters * s.global_batch} img, "
                f"epoch {record['epoch']}) loss {record['loss']:.4f} [{terms}] lr {record['lr']:.4g} "
                f"{record['images_per_s']:.1f} img/s eta {_hms(eta)}")


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _summary_writer(path: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where a run writes
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


__all__ = ["RunClock", "RunLog"]
