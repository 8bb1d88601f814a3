"""Sizing a cache before spending the disk: `defeat-cache plan`.

Runs the teacher on a small fixed sample of the dataset, writes that sample with each codec into
a temporary cache with the real layout (the whole dataset's extents, so edge-tile padding costs
what it will), and extrapolates: bytes per (image, view) by kind, the total for every image and
view, the teacher's and the encoder's time per item (so the extraction time on N ranks), and
whether the target filesystem has the room. It writes nothing at the target path.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed as du
from ..data.dataset import ViewDataset, check_batch, load_dataset
from ..data.records import DataError
from ..models.checkpoint import file_sha256
from ..models.teacher import teacher_outputs
from ..models.zoo import load_model_spec
from ..options import check_device, check_int
from ..views import ViewSet
from .codecs import CODECS, get_codec
from .extract import (DEFAULT_BASIS_ITEMS, ExtractOptions, _prepare_teacher, bases_of_outputs, basis_sample, cache_record,
                      codec_options, plan_layout, provenance)
from .reader import TeacherCache
from .storage import is_url
from .writer import CacheWriter

__all__ = ["PlanOptions", "plan_cache", "format_plan"]

PLAN_SEED = 0


@dataclass
class PlanOptions:
    teacher: str
    checkpoint: str
    data: str
    split: str = "train"
    views: str = "orig,hflip"
    codecs: tuple[str, ...] = tuple(CODECS)  # the ones to size (default: every codec)
    compact_step: float | None = None
    proposals: int = 1000
    pre_nms_top_n: int = 2000
    backbone: bool = False
    sample_images: int = 16
    batch_size: int = 8
    device: str = "cpu"
    amp: bool = False
    ranks: int = 1  # for the extraction time estimate
    out: str | None = None  # where the cache would go: only its filesystem's free space is read

    def __post_init__(self):
        ViewSet.parse(self.views)
        check_int("--proposals", self.proposals, 1, "RPN proposals kept per image")
        check_int("--sample", self.sample_images, 1, "images the teacher runs on")
        check_int("--batch-size", self.batch_size, 1, "images per teacher forward")
        check_int("--ranks", self.ranks, 1)
        check_device(self.device)


def _free_bytes(out: str | None) -> int | None:
    """Free space of the filesystem `out` would be on (its nearest existing folder)."""
    if not out or is_url(out):
        return None
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def plan_cache(opts: PlanOptions) -> dict:
    device = du.init_from_env(opts.device)  # one process: checks that a CUDA device exists
    spec = load_model_spec(opts.teacher)
    views = ViewSet.parse(opts.views)
    data = load_dataset(opts.data, opts.split)
    if not Path(opts.checkpoint).is_file():
        raise DataError(f"{opts.checkpoint}: teacher checkpoint not found")
    for c in opts.codecs:
        if c not in CODECS:
            raise DataError(f"--codec {c!r}: choose from {', '.join(CODECS)}")
    if opts.sample_images < 1:
        raise DataError(f"--sample {opts.sample_images}: need at least one image")
    if opts.compact_step is not None:
        try:
            codec_options("compact", opts.compact_step)
        except ValueError as e:
            raise DataError(f"--compact-step: {e}") from None
    n_img = len(data.records)
    images = sorted(random.Random(PLAN_SEED).sample(range(n_img), min(opts.sample_images, n_img)))
    # the sample as a dataset of its own: image k of the sample is image images[k] of the data
    sample_data = dataclasses.replace(data, records=[data.records[i] for i in images])
    vds = ViewDataset(sample_data, spec.preprocessing, views)
    samples = [vds[(k, v)] for k in range(len(images)) for v in range(len(views))]
    check_batch(samples)
    teacher = _prepare_teacher(spec, opts.checkpoint, data.num_classes, device)
    use_amp = opts.amp and device.type == "cuda"
    outs, t0 = [], time.perf_counter()
    for k in range(0, len(samples), opts.batch_size):
        batch = samples[k:k + opts.batch_size]
        with torch.autocast(device.type, enabled=use_amp):
            outs += teacher_outputs(teacher, [s["image"].to(device) for s in batch], [s["boxes"] for s in batch],
                                    opts.proposals, opts.pre_nms_top_n, opts.backbone)
    if device.type == "cuda":
        torch.cuda.synchronize()
    teacher_s = (time.perf_counter() - t0) / len(samples)
    records = [cache_record(s, o) for s, o in zip(samples, outs)]

    n_items = n_img * len(views)
    result = {"teacher": spec.name, "dataset": f"{data.name}/{data.split}", "images": n_img, "views": list(views.names),
              "items": n_items, "sample_images": len(images), "sample_items": len(samples), "device": str(device),
              "teacher_s_per_item": round(teacher_s, 4), "ranks": opts.ranks, "codecs": {}}
    base_opts = ExtractOptions(teacher=opts.teacher, checkpoint=opts.checkpoint, data=opts.data, out="(plan)",
                               views=opts.views, proposals=opts.proposals, pre_nms_top_n=opts.pre_nms_top_n,
                               backbone=opts.backbone)
    sha = file_sha256(opts.checkpoint)
    with tempfile.TemporaryDirectory(prefix="defeat_cache_plan_") as tmp:
        for name in opts.codecs:
            options = codec_options(name, opts.compact_step if name == "compact" else None)
            # the real layout (whole-dataset extents), holding just the sample's items
            layout = plan_layout(spec, data, spec.preprocessing, views, name, opts.proposals, opts.backbone,
                                 None, options)
            layout = dataclasses.replace(layout, num_items=len(samples), items_per_shard=len(samples))
            prov = provenance(spec, sha, sample_data, spec.preprocessing, views, dataclasses.replace(base_opts, codec=name))
            path = Path(tmp) / f"{name}.zarr"
            t_fit = time.perf_counter()

            def fit(layout=layout, codec=get_codec(name, options)):  # the items extraction would fit on
                sample = basis_sample(len(records), DEFAULT_BASIS_ITEMS)
                return bases_of_outputs(layout, (records[i] for i in sample), codec.step)

            writer = CacheWriter.create_or_resume(str(path), prov, layout, create=True,
                                                  fit_bases=fit if get_codec(name).needs_basis else None)
            t_fit = time.perf_counter() - t_fit
            t0 = time.perf_counter()
            writer.write_shard(0, records)
            encode_s = (time.perf_counter() - t0) / len(records)
            writer.mark_complete()
            info = TeacherCache(str(path)).inspect()
            kinds = info["bytes_per_item_by_kind"]
            per_view = kinds["features"] + kinds["roi_arrays"] + kinds["meta"]
            side = kinds["side_data"] * len(records)  # stored once per cache, not per item
            total = per_view * n_items + side
            result["codecs"][name] = {
                "bytes_per_view": round(per_view, 1), "feature_bytes_per_view": round(kinds["features"], 1),
                "roi_bytes_per_view": round(kinds["roi_arrays"], 1), "side_data_bytes": round(side),
                "total_bytes": round(total), "encode_s_per_item": round(encode_s, 4),
                "basis_fit_s": round(t_fit, 2) if get_codec(name).needs_basis else None,
                "options": options,
                # the teacher and the encoder overlap (writer thread): the slower one sets the pace
                "extract_hours": round(n_items * max(teacher_s, encode_s) / max(opts.ranks, 1) / 3600, 3),
            }
    free = _free_bytes(opts.out)
    result["out"] = opts.out
    result["free_bytes"] = free
    for c in result["codecs"].values():
        c["fits_on_out"] = None if free is None else c["total_bytes"] <= free
    return result


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def format_plan(p: dict) -> str:
    lines = [f"plan: {p['teacher']} on {p['dataset']}: {p['images']} images x {len(p['views'])} views = "
             f"{p['items']} items; measured on {p['sample_images']} images ({p['sample_items']} items), {p['device']}",
             f"teacher {p['teacher_s_per_item'] * 1e3:.1f} ms per item",
             f"{'codec':9s} {'per view':>10s} {'features':>10s} {'RoI arrays':>10s} {'total':>10s} "
             f"{'encode/item':>11s} {'extract (' + str(p['ranks']) + ' rank' + ('s' if p['ranks'] > 1 else '') + ')':>14s}"
             + ("  fits" if p["free_bytes"] is not None else "")]
    for name, c in p["codecs"].items():
        h = c["extract_hours"]
        lines.append(f"{name:9s} {_size(c['bytes_per_view']):>10s} {_size(c['feature_bytes_per_view']):>10s} "
                     f"{_size(c['roi_bytes_per_view']):>10s} {_size(c['total_bytes']):>10s} "
                     f"{c['encode_s_per_item'] * 1e3:>8.1f} ms {h * 60:>11.1f} min"
                     + (f"  {'yes' if c['fits_on_out'] else 'NO'}" if c["fits_on_out"] is not None else ""))
    if p["free_bytes"] is not None:
        lines.append(f"{p['out']}: {_size(p['free_bytes'])} free on its filesystem (nothing was written there)")
    elif p["out"]:
        lines.append(f"{p['out']}: free space of object storage is not known; nothing was written there")
    return "\n".join(lines)
