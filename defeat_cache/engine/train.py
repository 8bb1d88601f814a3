"""Student training: the paper's SGD schedule, with or without DeFeat distillation.

One loop for all modes, read top to bottom. `train` sets a run up (the student; when
distilling, the teacher source and the criterion; the data; the optimizer and lr schedule),
resumes it from last.pt if asked, runs `train_one_epoch` until the schedule's iterations are
done or a stop is requested, and writes the checkpoints. In each step the teacher source
gives the batch's teacher outputs (the cached items the DataLoader streamed with the batch,
or a teacher's forward in memory) and the criterion turns them into KD loss terms, added to
the detector's own losses.
"""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as du
from ..data.dataset import ViewDataset, ViewSampler, check_batch, collate, load_dataset
from ..data.records import DetectionData
from ..distill.distiller import Distiller, build_distiller
from ..distill.sources import TeacherSource, build_teacher_source
from ..errors import UserError
from ..models.checkpoint import load_weights
from ..models.forward import detector_forward
from ..models.sampling import item_seed, samplers_of, seeded_sampling
from ..models.zoo import ModelSpec, build_detector, load_model_spec
from ..options import check_device, check_int, check_positive
from ..progress import log, progress
from ..seeding import seeded_init
from ..views import Preprocessing, ViewSet
from .run_files import Checkpoints, resume, run_config, write_config
from .schedule import Optimization, Schedule, build_optimization, plan_schedule


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
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    grad_clip: float = 35.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # only on CUDA
    workers: int = 2
    log_every: int = 20
    checkpoint_minutes: float = 10.0
    resume: bool = False
    init_weights: str | None = None  # detector or ImageNet backbone state dict
    views: str = "orig,hflip"  # random horizontal flip 0.5 = two views, one per (image, epoch)
    sync_bn: bool = False
    progress: bool = True
    distill: dict | None = None  # resolved preset (distill.presets); None = plain training
    cache: str | None = None
    storage_options: dict | None = None  # fsspec options for a URL cache (s3://...); kept out of config.json
    teacher: str | None = None
    teacher_checkpoint: str | None = None
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


def train(opts: TrainOptions) -> dict:
    """Trains and returns a summary dict; writes RUN_DIR/{config.json,metrics.jsonl,last.pt,final.pt}."""
    device = _init_device(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(opts.data, "train")
    spec = load_model_spec(opts.student)
    log(data.summary())

    _set_seed(opts.seed)
    # Each initialisation draws from its own generator (seeding.py): the order things are built
    # in (an online teacher or not) changes nothing.
    model = initial_student(spec, data.num_classes, opts.seed, opts.init_weights)
    source = _build_teacher_source(opts, spec, data, device)  # None: plain training
    distiller = initial_distiller(opts.distill, spec, source.facts, opts.seed) if source is not None else None
    pre, views, dataset = _training_data(opts, spec, data, source)
    step, step_fn = _build_train_step(opts, model, distiller, device)

    sampler = ViewSampler(len(data.records), len(views), seed=opts.seed, rank=du.rank(), world_size=du.world_size())
    schedule = plan_schedule(len(sampler), opts.batch_size, epochs=opts.epochs, schedule=opts.schedule,
                             max_iters=opts.max_iters, lr=opts.lr,
                             lr_per_image=float(spec.config.get("train", {}).get("lr_per_image", 0.02 / 16)))
    optim = build_optimization(step, schedule, momentum=opts.momentum, weight_decay=opts.weight_decay,
                               warmup_iters=opts.warmup_iters, warmup_factor=opts.warmup_factor,
                               grad_clip=opts.grad_clip, use_amp=opts.amp and device.type == "cuda")

    start = time.time()
    checkpoints = Checkpoints(out, spec, data, pre, step, optim, schedule, opts.checkpoint_minutes)
    config = run_config(asdict(opts), spec, data, pre, schedule)
    iteration = resume(checkpoints.last, spec, schedule, step, optim, config) if opts.resume else 0
    if iteration >= schedule.total_iters:
        log(f"{out}: training already finished ({iteration} iterations)")
        if not checkpoints.final.is_file():  # its writing failed (a full disk): last.pt holds the same model
            checkpoints.save_final(iteration)
        return {"out": str(out), "iterations": iteration, "final": str(checkpoints.final)}
    if du.is_main_process():
        write_config(out / "config.json", asdict(opts), spec, data, pre, schedule)

    checkpoints.restart_timer()
    step.train()
    stopping = False
    # closed on errors too, so that an error message starts its own line after the progress bar
    with _StopRequest() as stop, MetricsLog(out / "metrics.jsonl", schedule, iteration, opts.log_every, start,
                                            opts.progress, device) as metrics:
        while iteration < schedule.total_iters and not stopping:
            epoch, skip = divmod(iteration, schedule.batches_per_epoch)
            loader = _epoch_loader(dataset, sampler, epoch, skip, opts, device)
            iteration, stopping = train_one_epoch(step_fn, source, optim, loader, device, epoch, iteration,
                                                  total_iters=schedule.total_iters, seed=opts.seed,
                                                  metrics=metrics, checkpoints=checkpoints, stop=stop)
    checkpoints.save_last(iteration)

    summary = {"out": str(out), "iterations": iteration, "total_iters": schedule.total_iters,
               "train_seconds": round(time.time() - start, 1)}
    if iteration >= schedule.total_iters:
        checkpoints.save_final(iteration)
        summary["final"] = str(checkpoints.final)
        log(f"finished {iteration} iterations in {summary['train_seconds']}s -> {checkpoints.final}")
    else:
        log(f"stopped at iteration {iteration}/{schedule.total_iters}; re-run with --resume to continue")
    du.barrier()
    return summary


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


def initial_student(spec: ModelSpec, num_classes: int, seed: int, init_weights: str | None = None) -> nn.Module:
    """The student a run of `seed` starts from: its own initialisation, then `init_weights` if given."""
    with seeded_init(seed, "student"):
        model = build_detector(spec, num_classes)
    if init_weights:
        log(f"initialised {load_weights(model, init_weights)} weights from {init_weights}")
    return model


def initial_distiller(preset: dict, spec: ModelSpec, teacher_facts, seed: int) -> Distiller:
    """The distiller (adaptation layers and any other KD module) a run of `seed` starts from."""
    with seeded_init(seed, "distiller"):
        return build_distiller(preset, spec, teacher_facts)


def _build_teacher_source(opts: TrainOptions, spec: ModelSpec, data: DetectionData,
                          device: torch.device) -> TeacherSource | None:
    if opts.distill is None:
        return None
    return build_teacher_source(data, spec, opts.distill, device, cache=opts.cache,
                                storage_options=opts.storage_options, teacher=opts.teacher,
                                teacher_checkpoint=opts.teacher_checkpoint, views=opts.views,
                                cache_in_memory=opts.cache_in_memory)


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
                    metrics: MetricsLog, checkpoints: Checkpoints, stop: _StopRequest) -> tuple[int, bool]:
    """Trains on `loader`'s batches from `iteration` on, up to `total_iters`.

    Returns (the iteration reached, whether a stop was requested: then it ends after that step)."""
    stopping = False
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
                         device: torch.device) -> bool:
    """Whether every rank stops after this step; raises FloatingPointError on every rank if any
    rank's loss is not finite.

    Agreed by all ranks once per step, so they all take the same branch (their next
    collectives must pair up): a non-finite loss on any rank stops every rank, and a
    Ctrl-C that reached only some ranks yet stops all of them after this step."""
    finite = bool(torch.isfinite(loss))
    agreed = du.any_rank({"nonfinite": not finite, "stop": stop.requested}, device)
    if agreed["nonfinite"]:
        where = (f"loss is {loss.item()}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                 if not finite else "the loss of another rank is not finite")
        raise FloatingPointError(f"at iteration {iteration}, {where}; lower --lr or check the data")
    return agreed["stop"]


class _StopRequest:
    """Turns SIGINT/SIGTERM into a checkpoint at the next step instead of lost work."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log("stopping after this step; a checkpoint will be written (press Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- logging
class MetricsLog:
    """The progress bar, and RUN_DIR/metrics.jsonl (rank 0, appended): every `log_every`
    iterations and at the last one, the loss terms averaged over ranks, lr and throughput."""

    def __init__(self, path: Path, schedule: Schedule, iteration: int, log_every: int, start: float,
                 show_progress: bool, device: torch.device):
        self.log_every, self.total_iters, self.start, self.device = log_every, schedule.total_iters, start, device
        self.file = open(path, "a") if du.is_main_process() else None
        self.bar = progress(schedule.total_iters * schedule.global_batch, "train",
                            initial=iteration * schedule.global_batch, enabled=show_progress)
        self.window_start, self.window_images = time.time(), 0

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.file:
            self.file.close()

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
        record.update(iter=iteration, epoch=epoch, lr=lr, images_per_s=round(ips, 2), time=round(now - self.start, 2))
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{ips:.1f}")
        self.window_start, self.window_images = now, 0


__all__ = ["TrainOptions", "TrainStep", "train", "train_one_epoch"]
