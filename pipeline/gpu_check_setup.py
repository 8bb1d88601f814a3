"""What every step of pipeline/gpu_check.py shares: the sizes of a run (paper scale on a GPU,
tiny for `--dry-run`), its work folder with the synthetic data, random teacher checkpoints and
small caches (made on first use, reused by later steps), and the device helpers that keep the
CUDA-only calls in one place.

Not a script; gpu_check.py imports it (it puts this folder on sys.path, as the benches do).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_common import log


@dataclass(frozen=True)
class Sizes:
    """How big each step's work is. `small_*`: the correctness steps (seconds each on a GPU);
    `paper_*`: the timing steps."""

    small_teacher: str
    small_student: str
    small_images: int
    small_sides: tuple[int, int]  # min_side, max_side of the generated images
    small_proposals: int
    small_pre_nms: int
    paper_teacher: str
    paper_student: str
    paper_images: int
    paper_sides: tuple[int, int]
    paper_proposals: int
    paper_pre_nms: int
    extract_batch: int
    extract_workers: int
    train_batch: int
    train_iters: int
    train_warmup: int
    train_workers: int
    loader_samples: int  # samples timed per mode for the DataLoader-bound estimate


# On a GPU: the small models are the CPU-scale zoo models; the timing uses the paper's pair at
# 800x1333 (images of 480..800 px sides are resized to an 800-px short side, long side <= 1333).
GPU_SIZES = Sizes(
    small_teacher="r18_fpn_cpu", small_student="r18q_fpn_cpu", small_images=12, small_sides=(96, 192),
    small_proposals=100, small_pre_nms=300,
    paper_teacher="r152_fpn", paper_student="r50_fpn", paper_images=24, paper_sides=(480, 800),
    paper_proposals=1000, paper_pre_nms=2000,
    extract_batch=8, extract_workers=4, train_batch=4, train_iters=20, train_warmup=4, train_workers=6,
    loader_samples=16)

# --dry-run: the same steps with the CPU-scale models everywhere and a handful of small images.
DRY_SIZES = Sizes(
    small_teacher="r18_fpn_cpu", small_student="r18q_fpn_cpu", small_images=4, small_sides=(64, 128),
    small_proposals=30, small_pre_nms=100,
    paper_teacher="r18_fpn_cpu", paper_student="r18q_fpn_cpu", paper_images=4, paper_sides=(64, 128),
    paper_proposals=30, paper_pre_nms=100,
    extract_batch=2, extract_workers=0, train_batch=2, train_iters=3, train_warmup=1, train_workers=0,
    loader_samples=2)


class Setup:
    """The run's device, sizes and work folder; builds shared inputs once (idempotent, so a step
    that was stopped leaves nothing a later step trips over: extraction resumes)."""

    def __init__(self, device: str, dry_run: bool, work: str | Path):
        self.device_name, self.dry_run = device, dry_run
        self.sizes = DRY_SIZES if dry_run else GPU_SIZES
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_name)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    # ---- data and checkpoints
    def data(self, which: str) -> Path:
        """data.toml of the 'small' or 'paper' synthetic dataset."""
        from defeat_cache.data.shapes import generate_shapes
        n = self.sizes.small_images if which == "small" else self.sizes.paper_images
        lo, hi = self.sizes.small_sides if which == "small" else self.sizes.paper_sides
        return generate_shapes(self.work / f"data_{which}", num_train=n, num_val=2, seed=0, min_side=lo,
                               max_side=hi, progress=False)

    def teacher(self, which: str) -> str:
        return self.sizes.small_teacher if which == "small" else self.sizes.paper_teacher

    def student(self, which: str) -> str:
        return self.sizes.small_student if which == "small" else self.sizes.paper_student

    def proposals(self, which: str) -> tuple[int, int]:
        s = self.sizes
        return (s.small_proposals, s.small_pre_nms) if which == "small" else (s.paper_proposals, s.paper_pre_nms)

    def checkpoint(self, which: str) -> Path:
        """A randomly initialised teacher (seed 0) for the dataset's classes, its BatchNorm statistics
        set from two images (bench_common.calibrate_norm_statistics: a deep random ResNet's features
        overflow float16 otherwise). No weights exist offline, and random weights time as trained ones."""
        from bench_common import calibrate_norm_statistics
        from defeat_cache.data.dataset import ViewDataset, load_dataset
        from defeat_cache.models.zoo import build_detector, load_model_spec
        from defeat_cache.views import ViewSet
        name = self.teacher(which)
        path = self.work / f"{name}_{which}_random.pt"
        if not path.is_file():
            data = load_dataset(self.data(which), "train")
            torch.manual_seed(0)
            model = build_detector(name, data.num_classes)
            views = ViewDataset(data, load_model_spec(name).preprocessing, ViewSet.parse("orig"))
            calibrate_norm_statistics(model, [views.sample(i, 0)["image"] for i in range(2)], self.device)
            model.cpu()
            tmp = path.with_suffix(".part")
            torch.save({"model_state": model.state_dict()}, tmp)
            tmp.replace(path)
        return path

    def extract_options(self, which: str, out: Path, **overrides):
        from defeat_cache.cache.extract import ExtractOptions
        proposals, pre_nms = self.proposals(which)
        options = dict(teacher=self.teacher(which), checkpoint=str(self.checkpoint(which)),
                       data=str(self.data(which)), out=str(out), codec="fp16", proposals=proposals,
                       pre_nms_top_n=pre_nms, batch_size=self.sizes.extract_batch,
                       workers=0 if which == "small" else self.sizes.extract_workers,
                       device=self.device_name, progress=False)
        return ExtractOptions(**{**options, **overrides})

    def cache_path(self, which: str, codec: str, **overrides) -> Path:
        tag = "_".join([which, codec] + [f"{k}{v}" for k, v in sorted(overrides.items())])
        return self.work / f"cache_{tag}.zarr"

    def cache(self, which: str, codec: str, **overrides) -> Path:
        """A complete cache of `which`'s teacher over its dataset (extracted on the run's device;
        an existing complete one is reused, a partial one finished)."""
        from defeat_cache.cache.extract import extract
        out = self.cache_path(which, codec, **overrides)
        extract(self.extract_options(which, out, codec=codec, **overrides))
        return out

    def preset(self, which: str, name: str = "defeat") -> dict:
        from defeat_cache.distill.presets import load_preset
        proposals, pre_nms = self.proposals(which)
        return load_preset(name, [f"teacher.proposals={proposals}", f"teacher.pre_nms_top_n={pre_nms}"])

    # ---- partial results of a long step (kept if the step dies or runs out of time)
    def partial_path(self, step: str) -> Path:
        return self.work / f"partial_{step}.json"

    def save_partial(self, step: str, figures: dict) -> None:
        write_json(self.partial_path(step), figures)

    # ---- device helpers (the only CUDA-specific calls of the check)
    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float | None:
        """torch.cuda.max_memory_allocated since the last reset, MB; None off CUDA."""
        if not self.is_cuda:
            return None
        torch.cuda.synchronize(self.device)
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def amp_dtype(self) -> torch.dtype:
        """What torch.autocast uses on this device by default (float16 on CUDA, bfloat16 on CPU)."""
        return torch.get_autocast_dtype(self.device.type)

    @contextmanager
    def timed(self, into: dict, key: str):
        """Wall seconds of the block, the device synchronised at both ends, stored as into[key]."""
        self.synchronize()
        t0 = time.perf_counter()
        yield
        self.synchronize()
        into[key] = round(time.perf_counter() - t0, 4)


class Checks:
    """Collects a step's failed bounds; a step is ok when none failed."""

    def __init__(self):
        self.failures: list[str] = []

    def bound(self, name: str, value: float, limit: float, kind: str = "<=") -> float:
        ok = value <= limit if kind == "<=" else value >= limit
        if not ok:
            self.failures.append(f"{name} = {value:.4g} (bound {kind} {limit:g})")
        return value

    def true(self, name: str, cond: bool, detail: str = "") -> bool:
        if not cond:
            self.failures.append(f"{name}{': ' + detail if detail else ''}")
        return cond


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| over all elements, in float64 on the CPU."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


__all__ = ["Checks", "DRY_SIZES", "GPU_SIZES", "Setup", "Sizes", "log", "rel_l2", "write_json"]
