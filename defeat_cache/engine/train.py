"""Student training: the paper's SGD schedule, with or without DeFeat distillation.

One loop for all modes, read top to bottom. `train` checks the options, takes the run folder's
lock (one training job per folder) and checks the folder (a run in it is only continued with
--resume or started over with --force), sets a run up
(the student; when distilling, the teacher source and the criterion; the data; the optimizer
and lr schedule), resumes it from last.pt if asked, runs `train_one_epoch` until the
schedule's iterations are done or a stop is requested (Ctrl-C / SIGTERM: a checkpoint, then
the summary says which signal), evaluates on the val split every --eval-every epochs and
after the last iteration (best.pt keeps the highest AP), and writes the checkpoints. In each step the teacher source
gives the batch's teacher outputs (the cached items the DataLoader streamed with the batch,
or a teacher's forward in memory) and the criterion turns them into KD loss terms, added to
the detector's own losses.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import FrozenBatchNorm2d

from .. import distributed as du
from ..data.dataset import ViewDataset, ViewSampler, check_batch, collate, load_dataset
from ..data.records import DetectionData
from ..distill.distiller import Distiller, build_distiller
from ..distill.sources import TeacherSource, build_teacher_source
from ..errors import UserError
from ..locking import LockHolder
from ..models.checkpoint import load_weights
from ..models.forward import detector_forward
from ..models.sampling import item_seed, samplers_of, seeded_sampling
from ..models.zoo import ModelSpec, build_detector, load_model_spec
from ..options import check_device, check_int, check_positive
from ..progress import log, log_file
from ..seeding import seeded_init
from ..views import Preprocessing, ViewSet
from .evaluate import evaluate
from .run_files import (RUN_LOCK, Checkpoints, RunLock, check_run_dir, clear_run, resume, run_config, trim_metrics,
                        write_config)
from .run_log import RunClock, RunLog
from .schedule import Optimization, Schedule, build_optimization, plan_schedule, run_epochs


@dataclass
class TrainOptions:
    student: str
    data: str
    out: str
    epochs: float | None = None  # default: 12 x schedule
    schedule: float = 1.0  # 1x = 12 epochs, lr /10 at epochs 8 and 11; 2x doubles everything
    max_iters: int | None = None
    batch_size: int = 4  # per process
    lr: float | None = None  # default: lr_per_image (model config) x global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: tuple[float, ...] | None = None  # epochs after which the lr drops /10; default 8/12, 11/12 of the run
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    grad_clip: float = 35.0  # max gradient norm; 0 = no clipping
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # only on CUDA
    workers: int = 2
    log_every: int = 20
    checkpoint_minutes: float = 10.0
    resume: bool = False
    force: bool = False  # start over in an --out that holds a run (removes that run's files)
    eval_every: int | None = None  # COCO eval on the val split every N epochs and after the last iteration
    keep_epochs: bool = False  # also keep the model after each epoch (epoch_NN.pt)
    init_weights: str | None = None  # detector or ImageNet backbone state dict
    views: str = "orig,hflip"  # random horizontal flip 0.5 = two views, one per (image, epoch)
    sync_bn: bool = False
    progress: bool = True
    distill: dict | None = None  # resolved preset (distill.presets); None = plain training
    cache: str | None = None
    storage_options: dict | None = None  # fsspec options for a URL cache (s3://...); kept out of config.json
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    # cache mode, cls.rois = "student": the teacher checkpoint whose box head alone scores the
    # student's proposals (distill/head_teacher.py), and its model (default: the cache's teacher)
    teacher_head: str | None = None
    teacher_head_model: str | None = None
    # hold the whole cache decoded in RAM (small caches; pipeline/bench_train.py's in-memory mode,
    # which measures a step without cache I/O and decoding)
    cache_in_memory: bool = False

    def __post_init__(self):
        ViewSet.parse(self.views)
        check_int("--batch-size", self.batch_size, 1, "images per process")
        check_int("--workers", self.workers, 0, "DataLoader worker processes; 0 = load data in the main process")
        check_int("--log-every", self.log_every, 1, "iterations between metrics lines")
        check_int("--max-iters", self.max_iters, 1)
        check_int("--warmup-iters", self.warmup_iters, 0)
        check_positive("--epochs", self.epochs)
        check_positive("--schedule", self.schedule, "1 = the 1x schedule of 12 epochs")
        check_positive("--lr", self.lr)
        check_device(self.device)
        _check_sgd_and_run_options(self)


def train(opts: TrainOptions) -> dict:
    """Trains and returns a summary dict; writes RUN_DIR/{config.json,metrics.jsonl,train.log,tb/,
    last.pt,final.pt} (and best.pt with --eval-every, epoch_NN.pt with --keep-epochs).

    A stopped run (Ctrl-C / SIGTERM) writes last.pt and its summary has `stopped_by` (the
    signal's name); `stop_exit_code` turns that into the process's exit status."""
    device = _init_device(opts)
    out = Path(opts.out)
    # the run lock (rank 0's, for all ranks) is held until this returns or raises, whatever ends the run
    with contextlib.ExitStack() as held:
        took_over = _lock_run_dir(out, opts, held)
        data = load_dataset(opts.data, "train")
        spec = load_model_spec(opts.student)
        val = _eval_data(opts, data)
        out.mkdir(parents=True, exist_ok=True)
        # a fresh start (--force, or leftovers of a run that never checkpointed): none of an earlier run's files stay
        removed = clear_run(out) if du.is_main_process() and not opts.resume else []
        with log_file(out / "train.log"):
            if took_over is not None:
                log(f"{out}: took over the stale {RUN_LOCK} of a process that is gone ({took_over.describe()})")
            if removed:
                log(f"{out}: started over, removed the earlier run's {', '.join(removed)}")
            return _train(opts, device, out, data, val, spec)


def _train(opts: TrainOptions, device: torch.device, out: Path, data: DetectionData, val: DetectionData | None,
           spec: ModelSpec) -> dict:
    log(data.summary())
    _set_seed(opts.seed)
    # Each initialisation draws from its own generator (seeding.py): the order things are built
    # in (an online teacher or not) changes nothing.
    model = initial_student(spec, data.num_classes, opts.seed, opts.init_weights, classes=data)
    source = _build_teacher_source(opts, spec, data, device)  # None: plain training
    distiller = initial_distiller(opts.distill, spec, source.facts, opts.seed, source.roi_head) \
        if source is not None else None
    pre, views, dataset = _training_data(opts, spec, data, source)
    step, step_fn = _build_train_step(opts, model, distiller, device)

    sampler = ViewSampler(len(data.records), len(views), seed=opts.seed, rank=du.rank(), world_size=du.world_size())
    schedule = plan_schedule(len(sampler), opts.batch_size, epochs=opts.epochs, schedule=opts.schedule,
                             max_iters=opts.max_iters, lr=opts.lr, lr_step_epochs=opts.lr_steps,
                             lr_per_image=spec.lr_per_image)
    optim = build_optimization(step, schedule, momentum=opts.momentum, weight_decay=opts.weight_decay,
                               warmup_iters=opts.warmup_iters, warmup_factor=opts.warmup_factor,
                               grad_clip=opts.grad_clip, use_amp=opts.amp and device.type == "cuda")

    clock = RunClock()
    checkpoints = Checkpoints(out, spec, data, pre, step, optim, schedule, opts.checkpoint_minutes, clock)
    iteration, pending_eval = 0, False
    if opts.resume:
        config = run_config(asdict(opts), spec, data, pre, schedule)
        iteration, run_state = resume(checkpoints.last, spec, schedule, step, optim, config)
        clock.before, pending_eval = _continue_run_files(out, iteration, run_state, schedule, opts, checkpoints)
    if iteration >= schedule.total_iters:
        log(f"{out}: training already finished ({iteration} iterations)")
        if not checkpoints.final.is_file():  # its writing failed (a full disk): last.pt holds the same model
            checkpoints.save_final(iteration)
        return _summary(out, iteration, schedule, clock, checkpoints, None, None)
    if du.is_main_process():
        write_config(out / "config.json", asdict(opts), spec, data, pre, schedule)

    checkpoints.restart_timer()
    clock.started = time.time()  # setup is not training time
    step.train()
    stopping, last_eval = None, None
    evaluation = _Evaluation(step, val, pre, device, opts, checkpoints, clock, schedule)
    # closed on errors too, so that an error message starts its own line after the progress bar
    with _StopRequest() as stop, RunLog(out, schedule, iteration, opts.log_every, clock, opts.progress, device,
                                        resumed=opts.resume) as metrics:
        if pending_eval:  # the run was stopped right after the epoch this evaluation belongs to
            last_eval = evaluation.run(iteration, metrics)
        while iteration < schedule.total_iters and not stopping:
            epoch, skip = divmod(iteration, schedule.batches_per_epoch)
            loader = _epoch_loader(dataset, sampler, epoch, skip, opts, device)
            iteration, stopping = train_one_epoch(step_fn, source, optim, loader, device, epoch, iteration,
                                                  total_iters=schedule.total_iters, seed=opts.seed,
                                                  metrics=metrics, checkpoints=checkpoints, stop=stop)
            if opts.keep_epochs and iteration % schedule.batches_per_epoch == 0:
                checkpoints.save_epoch(iteration // schedule.batches_per_epoch, iteration)
            if _eval_due(iteration, schedule, opts.eval_every) and (not stopping or iteration >= schedule.total_iters):
                last_eval = evaluation.run(iteration, metrics)
    checkpoints.save_last(iteration)

    summary = _summary(out, iteration, schedule, clock, checkpoints, last_eval, stopping)
    if iteration >= schedule.total_iters:
        checkpoints.save_final(iteration)
        log(f"finished {iteration} iterations in {summary['train_seconds']}s -> {checkpoints.final}")
    else:
        log(f"stopped ({stopping}) at iteration {iteration}/{schedule.total_iters}; {checkpoints.last} is "
            "written: re-run with --resume to continue")
    log("summary " + json.dumps(summary), console=False)  # the console gets it on stdout from the CLI
    du.barrier()
    return summary


#: Exit status of a run stopped by a signal: 128 + the signal's number, as a shell reports it.
STOP_EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def stop_exit_code(summary: dict) -> int:
    """The process's exit status for a run's summary: 0, or 130 / 143 for a run Ctrl-C / SIGTERM stopped."""
    return STOP_EXIT_CODES.get(summary.get("stopped_by"), 0)


def _summary(out: Path, iteration: int, schedule: Schedule, clock: RunClock, checkpoints: Checkpoints,
             last_eval: dict | None, stopped_by: str | None) -> dict:
    summary = {"out": str(out), "iterations": iteration, "total_iters": schedule.total_iters,
               "train_seconds": round(clock.seconds(), 1)}
    if iteration >= schedule.total_iters:
        summary["final"] = str(checkpoints.final)
    if stopped_by:
        summary["stopped_by"] = stopped_by
    if last_eval is not None:
        summary["eval"] = last_eval["eval"]
    if checkpoints.best_eval is not None:
        best = checkpoints.best_eval
        summary["best"] = {"AP": best["AP"], "iter": best["iter"], "epoch": best["epoch"], "path": str(checkpoints.best)}
    return summary


# ---------------------------------------------------------------- options and the run folder
def _check_sgd_and_run_options(opts: TrainOptions) -> None:
    """TrainOptions' checks beyond the counts and positive numbers (`__post_init__`): one clear
    error for a value no run can have, named by its command-line flag."""
    def bad(flag: str, value, need: str):
        raise UserError(f"{flag} {value}: {need}")

    if not 0 <= opts.momentum < 1:
        bad("--momentum", opts.momentum, "must be in [0, 1)")
    if not (math.isfinite(opts.weight_decay) and opts.weight_decay >= 0):
        bad("--weight-decay", opts.weight_decay, "must be 0 or more")
    if not 0 < opts.warmup_factor <= 1:
        bad("--warmup-factor", opts.warmup_factor, "must be in (0, 1]: the warm-up's first lr as a fraction of --lr")
    if not (math.isfinite(opts.grad_clip) and opts.grad_clip >= 0):
        bad("--grad-clip", opts.grad_clip, "must be 0 or more (0 = no clipping)")
    check_positive("--checkpoint-minutes", opts.checkpoint_minutes, "minutes between last.pt rewrites")
    check_int("--eval-every", opts.eval_every, 1, "epochs between evaluations")
    if opts.lr_steps is not None:
        epochs, steps = run_epochs(opts.epochs, opts.schedule), list(opts.lr_steps)
        shown = ",".join(f"{e:g}" for e in steps)
        if any(not (math.isfinite(e) and e > 0) for e in steps) or steps != sorted(set(steps)):
            bad("--lr-steps", shown, "must be increasing epochs > 0, e.g. 8,11")
        if steps and steps[-1] > epochs:
            bad("--lr-steps", shown, f"{steps[-1]:g} is past the run's {epochs:g} epochs")
    if opts.resume and opts.force:
        raise UserError("--resume continues the run in --out and --force starts it over: give one of them")


def _lock_run_dir(out: Path, opts: TrainOptions, held: contextlib.ExitStack) -> LockHolder | None:
    """Rank 0 takes the run lock of `out` into `held` for all ranks, then `run_files.check_run_dir`
    decides under it (other nodes may not see --out); every rank gets rank 0's refusal. Returns
    the holder of the stale lock taken over, if any (rank 0)."""
    problem, took_over = None, None
    if du.is_main_process():
        try:
            if out.is_dir() or not out.exists():  # a file at --out is check_run_dir's to refuse
                took_over = held.enter_context(RunLock(out)).took_over
            check_run_dir(out, resume=opts.resume, force=opts.force)
        except UserError as e:
            problem = str(e)
    problem = du.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    return took_over


def _continue_run_files(out: Path, iteration: int, run_state: dict, schedule: Schedule, opts: TrainOptions,
                        checkpoints: Checkpoints) -> tuple[float, bool]:
    """Resuming at `iteration`: metrics.jsonl back to it, best.pt's AP to beat; returns the
    training seconds before it and whether the evaluation due at it is missing (a run stopped
    right after that epoch evaluates it first). Every rank gets the same answer."""
    seconds, pending = 0.0, False
    if du.is_main_process():
        kept = trim_metrics(out / "metrics.jsonl", iteration)
        # last.pt of older versions has no run state: the last kept line's time is the closest
        seconds = float(run_state.get("train_seconds", kept[-1]["time"] if kept else 0.0))
        evaluated = {r["iter"] for r in kept if "eval" in r}
        pending = _eval_due(iteration, schedule, opts.eval_every) and iteration not in evaluated
        if iteration > 0:
            checkpoints.load_best()
    return seconds, du.broadcast_object(pending)


# ---------------------------------------------------------------- setup: device, models, data
def _init_device(opts: TrainOptions) -> torch.device:
    device = du.init_from_env(opts.device)
    if opts.sync_bn and device.type != "cuda":  # torch's SyncBatchNorm has no CPU implementation
        raise UserError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                        "drop --sync-bn, or use a model with norm = \"frozen_bn\"")
    return device


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initial_student(spec: ModelSpec, num_classes: int, seed: int, init_weights: str | None = None,
                    classes: DetectionData | None = None) -> nn.Module:
    """The student a run of `seed` starts from: its own initialisation, then `init_weights` if given
    (fine-tuning: with the dataset's `classes`, heads of other classes are skipped, and said so)."""
    with seeded_init(seed, "student"):
        model = build_detector(spec, num_classes)
    if init_weights:
        loaded = load_weights(model, init_weights, classes=classes, class_heads="skip")
        log(f"initialised {loaded} from {init_weights}")
    elif any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()):
        # frozen BN at its initial statistics is the identity: from random weights nothing normalises
        log(f"warning: {spec.name} has frozen BatchNorm (norm = \"frozen_bn\") and no --init-weights, so its "
            "BN layers never leave their initial identity statistics and it trains poorly from random weights; "
            "give --init-weights (ImageNet backbone or detector weights) or use a model with norm = \"bn\"")
    return model


def initial_distiller(preset: dict, spec: ModelSpec, teacher_facts, seed: int, teacher_head=None) -> Distiller:
    """The distiller (adaptation layers and any other KD module) a run of `seed` starts from
    (`teacher_head`: the source's `roi_head`, for cls.rois = "student")."""
    with seeded_init(seed, "distiller"):
        return build_distiller(preset, spec, teacher_facts, teacher_head)


def _eval_data(opts: TrainOptions, data: DetectionData) -> DetectionData | None:
    """The val split --eval-every scores on (None without it), checked against the training classes."""
    if opts.eval_every is None:
        return None
    val = load_dataset(opts.data, "val")
    if val.category_ids != data.category_ids:
        raise UserError(f"--eval-every: {opts.data}'s val split has other classes than its train split "
                        f"({len(val.category_ids)} vs {len(data.category_ids)} categories); evaluation needs the same")
    return val


def _build_teacher_source(opts: TrainOptions, spec: ModelSpec, data: DetectionData,
                          device: torch.device) -> TeacherSource | None:
    if opts.distill is None:
        return None
    return build_teacher_source(data, spec, opts.distill, device, cache=opts.cache,
                                storage_options=opts.storage_options, teacher=opts.teacher,
                                teacher_checkpoint=opts.teacher_checkpoint, views=opts.views,
                                cache_in_memory=opts.cache_in_memory, teacher_head=opts.teacher_head,
                                teacher_head_model=opts.teacher_head_model)


def _training_data(opts: TrainOptions, spec: ModelSpec, data: DetectionData,
                   source: TeacherSource | None) -> tuple[Preprocessing, ViewSet, ViewDataset]:
    """(preprocessing, views, dataset) of the student's inputs: a teacher source's when distilling
    (a cache dictates the exact student input, and its dataset carries the cached items)."""
    if source is not None:
        return source.preprocessing, source.views, source.dataset(data)
    views = ViewSet.parse(opts.views)
    return spec.preprocessing, views, ViewDataset(data, spec.preprocessing, views)


class TrainStep(nn.Module):
    """Everything trained, as one module (so DistributedDataParallel wraps a single forward).

    Returns the named loss terms: the detector's own, plus the distiller's KD terms from the
    batch's `teacher` outputs. `seeds` (one per image, `models.sampling.item_seed`) make every
    random draw per image, so the step does not depend on how the global batch is split over ranks.
    """

    def __init__(self, student: nn.Module, distiller: Distiller | None = None):
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(self, images: list[torch.Tensor], targets: list[dict], teacher: list | None = None,
                seeds: list[int] | None = None) -> dict:
        with seeded_sampling(samplers_of(self.student), seeds):
            out = detector_forward(self.student, images, targets)
        losses = dict(out.losses)
        if self.distiller is not None:
            losses.update(self.distiller(self.student, out, teacher, targets, seeds))
        return losses


def _build_train_step(opts: TrainOptions, model: nn.Module, distiller: Distiller | None,
                      device: torch.device) -> tuple[TrainStep, nn.Module]:
    """(the TrainStep, what to call for a step: the TrainStep itself or its DDP wrapper)."""
    model.to(device)
    if opts.sync_bn and du.is_dist():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step = TrainStep(model, distiller.to(device) if distiller is not None else None)
    if not du.is_dist():
        return step, step
    return step, nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------- evaluation during training
def _eval_due(iteration: int, schedule: Schedule, eval_every: int | None) -> bool:
    """--eval-every N: after every N-th epoch and after the last iteration."""
    if not eval_every or iteration <= 0:
        return False
    if iteration >= schedule.total_iters:
        return True
    epochs_done, rest = divmod(iteration, schedule.batches_per_epoch)
    return rest == 0 and epochs_done % eval_every == 0


class _Evaluation:
    """COCO eval of the student on the val split (split over the ranks like `eval`), its
    metrics line and best.pt. Not training time; leaves the RNG and train mode as it found them."""

    def __init__(self, step: TrainStep, val: DetectionData | None, pre: Preprocessing, device: torch.device,
                 opts: TrainOptions, checkpoints: Checkpoints, clock: RunClock, schedule: Schedule):
        self.step, self.val, self.pre, self.device, self.opts = step, val, pre, device, opts
        self.checkpoints, self.clock, self.schedule = checkpoints, clock, schedule

    def run(self, iteration: int, metrics: RunLog) -> dict | None:
        """Evaluates the model at `iteration`; returns its metrics line (rank 0; None on the others)."""
        start = time.time()
        with self.clock.pause(), torch.random.fork_rng(devices=[]):
            scores = evaluate(self.step.student, self.val, self.pre, self.device, batch_size=self.opts.batch_size,
                              workers=self.opts.workers, show_progress=self.opts.progress)
        self.step.train()
        metrics.restart_window()
        if scores is None:  # not rank 0: its detections went to rank 0
            return None
        scores.pop("eval_seconds", None)
        epoch = (iteration - 1) // self.schedule.batches_per_epoch
        record = metrics.write_eval(iteration, epoch, scores, time.time() - start)
        better = self.checkpoints.save_best_if_better(
            iteration, {"AP": scores["AP"], "iter": iteration, "epoch": epoch, "eval": scores})
        best = self.checkpoints.best_eval
        log(f"eval at iteration {iteration} (epoch {epoch}, {self.val.name}/{self.val.split}): {_format_scores(scores)}"
            + (f" -> {self.checkpoints.best}" if better else
               f" (best AP {_percent(best['AP'])} at iteration {best['iter']})" if best else ""))
        return record


def _percent(value: float | None) -> str:
    # pycocotools' -1 (or None): no ground truth in that area range
    return "n/a" if value is None or value < 0 else f"{100 * value:.1f}"


def _format_scores(scores: dict) -> str:
    return " ".join(f"{k} {_percent(v)}" for k, v in scores.items() if v is None or isinstance(v, (int, float)))


# ---------------------------------------------------------------- the loop
def _epoch_loader(dataset: ViewDataset, sampler: ViewSampler, epoch: int, skip: int, opts: TrainOptions,
                  device: torch.device) -> DataLoader:
    """The batches of `epoch` after its first `skip` ones."""
    sampler.set_epoch(epoch)
    # Resume mid-epoch: the epoch's order depends only on (seed, epoch), so skip what was done.
    order = list(sampler)[skip * opts.batch_size:]
    return DataLoader(dataset, batch_size=opts.batch_size, sampler=order, collate_fn=collate,
                      num_workers=opts.workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if opts.workers else None,
                      # its own seed: a loader draws one from the global RNG otherwise,
                      # which would make a resumed run sample RoIs differently
                      generator=torch.Generator().manual_seed(opts.seed * 1_000_003 + epoch))


def train_one_epoch(step_fn: nn.Module, source: TeacherSource | None, optim: Optimization, loader: DataLoader,
                    device: torch.device, epoch: int, iteration: int, *, total_iters: int, seed: int,
                    metrics: RunLog, checkpoints: Checkpoints, stop: _StopRequest) -> tuple[int, str | None]:
    """Trains on `loader`'s batches from `iteration` on, up to `total_iters`.

    Returns (the iteration reached, the signal that stopped it after that step, or None)."""
    stopping = None
    for batch in loader:
        images, targets = _to_device(check_batch(batch), device)
        teacher = source.outputs(batch, images) if source is not None else None
        seeds = [item_seed(seed, epoch, s["image_index"], s["view_index"]) for s in batch]
        with torch.autocast(device.type, enabled=optim.use_amp):
            losses = step_fn(images, targets, teacher, seeds)
        loss = sum(losses.values())
        stopping = _ranks_agree_to_stop(loss, losses, iteration, stop, device)
        grad_norm, lr_used = optim.update(loss)
        iteration += 1
        metrics.count(len(batch) * du.world_size())
        if metrics.due(iteration):
            metrics.write(iteration, epoch, losses, loss, lr_used, grad_norm)
        checkpoints.save_last_if_due(iteration)
        if iteration >= total_iters or stopping:
            break
    return iteration, stopping


def _to_device(batch: list[dict], device: torch.device):
    images = [s["image"].to(device, non_blocking=True) for s in batch]
    targets = [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in batch]
    return images, targets


def _ranks_agree_to_stop(loss: torch.Tensor, losses: dict, iteration: int, stop: _StopRequest,
                         device: torch.device) -> str | None:
    """Whether every rank stops after this step (the signal's name: "SIGINT" if any rank got a
    Ctrl-C, else "SIGTERM"; None: go on); raises FloatingPointError on every rank if any rank's
    loss is not finite.

    Agreed by all ranks once per step, so they all take the same branch (their next
    collectives must pair up): a non-finite loss on any rank stops every rank, and a
    Ctrl-C that reached only some ranks yet stops all of them after this step."""
    finite = bool(torch.isfinite(loss))
    agreed = du.any_rank({"nonfinite": not finite, "SIGINT": stop.signal == "SIGINT",
                          "SIGTERM": stop.signal == "SIGTERM"}, device)
    if agreed["nonfinite"]:
        where = (f"loss is {loss.item()}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                 if not finite else "the loss of another rank is not finite")
        raise FloatingPointError(f"at iteration {iteration}, {where}; lower --lr or check the data")
    return "SIGINT" if agreed["SIGINT"] else "SIGTERM" if agreed["SIGTERM"] else None


class _StopRequest:
    """Turns SIGINT/SIGTERM into a checkpoint at the next step instead of lost work."""

    def __init__(self):
        self.signal: str | None = None  # the first one received: "SIGINT" or "SIGTERM"
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log("stopping after this step; a checkpoint will be written (press Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


__all__ = ["STOP_EXIT_CODES", "TrainOptions", "TrainStep", "stop_exit_code", "train", "train_one_epoch"]
