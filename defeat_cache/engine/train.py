"""Student training: the paper's SGD schedule, with or without DeFeat distillation.

One loop for all modes. A *distiller* (defeat_cache.distill) adds named KD loss terms to
the detector's own losses; where its teacher targets come from (the cache, streamed by the
DataLoader, or a teacher run online) is the distiller's business, not the loop's.
"""

from __future__ import annotations

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

from .. import __version__
from .. import distributed as du
from ..data.dataset import ViewDataset, ViewSampler, check_batch, collate, load_dataset
from ..data.records import DataError
from ..models.checkpoint import load_weights, read_checkpoint, save_checkpoint
from ..models.forward import detector_forward
from ..models.sampling import item_seed, samplers_of, seeded_sampling
from ..models.zoo import ModelSpec, build_detector, load_model_spec, spec_dict
from ..progress import log, progress
from ..views import Preprocessing, ViewSet


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


def _lr_lambda(steps: list[int], warmup_iters: int, warmup_factor: float):
    def f(it: int) -> float:
        factor = 0.1 ** sum(it >= s for s in steps)
        if it < warmup_iters:  # linear warm-up, as mmdetection and torchvision references
            alpha = it / warmup_iters
            factor *= warmup_factor * (1 - alpha) + alpha
        return factor
    return f


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: list[dict], device: torch.device):
    images = [s["image"].to(device, non_blocking=True) for s in batch]
    targets = [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in batch]
    return images, targets


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


class TrainStep(nn.Module):
    """Everything trained, as one module (so DistributedDataParallel wraps a single forward).

    Returns the named loss terms: the detector's own, plus the distiller's KD terms.
    `seeds` (one per image, `models.sampling.item_seed`) make every random draw per image,
    so the step does not depend on how the global batch is split over ranks.
    """

    def __init__(self, student: nn.Module, distiller: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(self, images: list[torch.Tensor], targets: list[dict], batch: list[dict],
                seeds: list[int] | None = None) -> dict:
        with seeded_sampling(samplers_of(self.student), seeds):
            out = detector_forward(self.student, images, targets)
        losses = dict(out.losses)
        if self.distiller is not None:
            losses.update(self.distiller(self.student, out, batch, images, targets, seeds))
        return losses


def train(opts: TrainOptions) -> dict:
    """Trains and returns a summary dict; writes RUN_DIR/{config.json,metrics.jsonl,last.pt,final.pt}."""
    device = du.init_from_env(opts.device)
    if opts.sync_bn and device.type != "cuda":  # torch's SyncBatchNorm has no CPU implementation
        raise DataError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                        "drop --sync-bn, or use a model with norm = \"frozen_bn\"")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(opts.data, "train")
    spec = load_model_spec(opts.student)
    pre = spec.preprocessing
    log(data.summary())
    _set_seed(opts.seed)
    model = build_detector(spec, data.num_classes)
    if opts.init_weights:
        log(f"initialised {load_weights(model, opts.init_weights)} weights from {opts.init_weights}")

    distiller = None
    if opts.distill is not None:
        from ..distill.distiller import build_distiller  # distill sits above engine's data/models
        distiller = build_distiller(opts, spec, data, pre, device)
        pre = distiller.preprocessing  # a cache dictates the exact student input
    views = distiller.views if distiller is not None else ViewSet.parse(opts.views)

    model.to(device)
    if opts.sync_bn and du.is_dist():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_modules = TrainStep(model, distiller.to(device) if distiller is not None else None)
    step_fn = train_modules
    if du.is_dist():
        step_fn = nn.parallel.DistributedDataParallel(
            train_modules, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = distiller.dataset(data, pre) if distiller is not None else ViewDataset(data, pre, views)
    sampler = ViewSampler(len(data.records), len(views), seed=opts.seed, rank=du.rank(), world_size=du.world_size())
    batches_per_epoch = max(1, math.ceil(len(sampler) / opts.batch_size))
    epochs = opts.epochs if opts.epochs is not None else 12 * opts.schedule
    schedule_iters = max(1, int(round(epochs * batches_per_epoch)))
    # --max-iters only decides when to stop: the schedule (warm-up, steps) stays the full run's.
    total_iters = min(schedule_iters, opts.max_iters) if opts.max_iters else schedule_iters
    steps = [int(round(epochs * batches_per_epoch * f / 12)) for f in (8, 11)]
    global_batch = opts.batch_size * du.world_size()
    lr = opts.lr if opts.lr is not None else float(spec.config.get("train", {}).get("lr_per_image", 0.02 / 16)) * global_batch

    params = [p for p in train_modules.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps, min(opts.warmup_iters, schedule_iters // 3 + 1), opts.warmup_factor))
    use_amp = opts.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # storage options may hold credentials: config.json records only which were given
    options = dict(asdict(opts), storage_options=sorted(opts.storage_options or {}))
    config = {"options": options, "model": spec_dict(spec), "lr": lr, "total_iters": total_iters,
              "lr_steps": steps, "global_batch": global_batch, "num_classes": data.num_classes,
              "class_names": data.class_names, "preprocessing": pre.to_dict(), "version": __version__}
    iteration, start = 0, time.time()
    last = out / "last.pt"
    # Rank 0 reads last.pt and hands it to the others (ranks on other nodes may not see its --out),
    # so every rank resumes from the same state or none does.
    ck = None
    if opts.resume:
        ck = du.broadcast_object(read_checkpoint(last) if du.is_main_process() and last.is_file() else None)
    if ck is not None:
        if ck.get("model", {}).get("name") != spec.name:
            raise DataError(f"{last}: checkpoint is of model {ck.get('model', {}).get('name')!r}, not {spec.name!r}")
        # Iterations, epochs and the lr schedule count global batches: another size would
        # silently skip or repeat data and shift the lr steps.
        if ck.get("global_batch", global_batch) != global_batch:
            raise DataError(f"{last}: was trained with a global batch of {ck['global_batch']} images "
                            f"(ranks x --batch-size), this run has {du.world_size()} x {opts.batch_size} = "
                            f"{global_batch}; resume with the same global batch, or start a new --out")
        train_modules.load_state_dict(ck["train_state"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        iteration = int(ck["iteration"])
        torch.set_rng_state(ck["rng"]["torch"])
        log(f"resumed from {last} at iteration {iteration}/{total_iters}")
    elif opts.resume:
        log(f"--resume: no {last} yet, starting from scratch")
    if iteration >= total_iters:
        log(f"{out}: training already finished ({iteration} iterations)")
        return {"out": str(out), "iterations": iteration, "final": str(out / "final.pt")}
    if du.is_main_process():
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def weights(it: int) -> dict:
        """What `load_trained`/`eval` need; last.pt adds the training state to it."""
        return dict(model=spec_dict(spec), num_classes=data.num_classes, class_names=data.class_names,
                    preprocessing=pre.to_dict(), iteration=it, model_state=model.state_dict(), version=__version__)

    def save(path: Path, it: int) -> None:
        if du.is_main_process():
            save_checkpoint(path, **weights(it), total_iters=total_iters, global_batch=global_batch, train_state=train_modules.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict(), rng={"torch": torch.get_rng_state()})

    metrics_file = open(out / "metrics.jsonl", "a") if du.is_main_process() else None
    bar = progress(total_iters * global_batch, "train", initial=iteration * global_batch, enabled=opts.progress)
    last_ckpt_time = time.time()
    window_start, window_images = time.time(), 0
    train_modules.train()
    stopping = False
    with _StopRequest() as stop, bar:  # the bar closes on errors too, so an error starts its own line
        while iteration < total_iters and not stopping:
            epoch, skip = divmod(iteration, batches_per_epoch)
            sampler.set_epoch(epoch)
            # Resume mid-epoch: the epoch's order depends only on (seed, epoch), so skip what was done.
            order = list(sampler)[skip * opts.batch_size:]
            loader = DataLoader(dataset, batch_size=opts.batch_size, sampler=order, collate_fn=collate,
                                num_workers=opts.workers, pin_memory=device.type == "cuda",
                                persistent_workers=False, prefetch_factor=4 if opts.workers else None,
                                # its own seed: a loader draws one from the global RNG otherwise,
                                # which would make a resumed run sample RoIs differently
                                generator=torch.Generator().manual_seed(opts.seed * 1_000_003 + epoch))
            for batch in loader:
                images, targets = _to_device(check_batch(batch), device)
                seeds = [item_seed(opts.seed, epoch, s["image_index"], s["view_index"]) for s in batch]
                with torch.autocast(device.type, enabled=use_amp):
                    losses = step_fn(images, targets, batch, seeds)
                loss = sum(losses.values())
                # Agreed by all ranks once per step, so they all take the same branch (their next
                # collectives must pair up): a non-finite loss on any rank stops every rank, and a
                # Ctrl-C that reached only some ranks yet stops all of them after this step.
                finite = bool(torch.isfinite(loss))
                agreed = du.any_rank({"nonfinite": not finite, "stop": stop.requested}, device)
                if agreed["nonfinite"]:
                    where = (f"loss is {loss.item()}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                             if not finite else "the loss of another rank is not finite")
                    raise FloatingPointError(f"at iteration {iteration}, {where}; lower --lr or check the data")
                stopping = agreed["stop"]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(params, opts.grad_clip) if opts.grad_clip else None
                lr_used = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                window_images += len(batch) * du.world_size()
                bar.update(len(batch) * du.world_size())
                if iteration % opts.log_every == 0 or iteration == total_iters:
                    now = time.time()
                    record = {k: float(v.detach()) for k, v in losses.items()}
                    record["loss"] = float(loss.detach())
                    record = du.all_reduce_mean(record, device)
                    ips = window_images / max(now - window_start, 1e-9)
                    record.update(iter=iteration, epoch=epoch, lr=lr_used,
                                  images_per_s=round(ips, 2), time=round(now - start, 2))
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    if metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{ips:.1f}")
                    window_start, window_images = now, 0
                if time.time() - last_ckpt_time > opts.checkpoint_minutes * 60:
                    save(last, iteration)
                    last_ckpt_time = time.time()
                if iteration >= total_iters or stopping:
                    break
    save(last, iteration)
    if metrics_file:
        metrics_file.close()
    summary = {"out": str(out), "iterations": iteration, "total_iters": total_iters,
               "train_seconds": round(time.time() - start, 1)}
    if iteration >= total_iters:
        if du.is_main_process():
            save_checkpoint(out / "final.pt", **weights(iteration))
        summary["final"] = str(out / "final.pt")
        log(f"finished {iteration} iterations in {summary['train_seconds']}s -> {out / 'final.pt'}")
    else:
        log(f"stopped at iteration {iteration}/{total_iters}; re-run with --resume to continue")
    du.barrier()
    return summary


def load_trained(checkpoint: str | Path, model_name: str | None = None, device: str | torch.device = "cpu"):
    """(model, preprocessing) from a checkpoint written by `train` (or a full torchvision state dict)."""
    ck = read_checkpoint(checkpoint)
    if "model_state" in ck:
        m = ck["model"]
        if model_name and m["name"] not in (model_name, Path(model_name).stem):
            raise DataError(f"{checkpoint}: holds a {m['name']!r} model, not {model_name!r}")
        # Rebuilt from what the checkpoint stores, so models given as TOML paths load too.
        spec = ModelSpec(name=m["name"], family=m["family"], config=m["config"],
                         preprocessing=Preprocessing.from_dict(ck["preprocessing"]))
        model = build_detector(spec, int(ck["num_classes"]))
        model.load_state_dict(ck["model_state"])
        return model.to(device), Preprocessing.from_dict(ck["preprocessing"]), ck
    raise DataError(f"{checkpoint}: not a defeat-cache training checkpoint (no 'model_state'); "
                    "use --init-weights to start training from foreign weights")


__all__ = ["TrainOptions", "TrainStep", "load_trained", "train"]
