"""Stage 1: run the teacher once over a dataset and write its outputs to a TeacherCache.

Three things overlap: DataLoader workers decode images and apply views, the main thread
runs the teacher, and a writer thread encodes and writes finished shards (bounded queue,
so the teacher never waits on more than one shard of writing). Work is split by whole
shards, each written by one process in one assignment; finished shards are marked, so a
killed run resumes where it stopped and several ranks (torchrun) never share a shard. A
shard's teacher batches are formed from that shard alone (`shard_batches`), so the cache is
bit-identical whatever the rank split or resume point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import queue
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .. import distributed as du
from ..data.dataset import ViewDataset, check_batch, collate, load_dataset
from ..data.records import DataError, DetectionData
from ..errors import UserError
from ..models.checkpoint import file_sha256, load_weights
from ..models.teacher import TeacherOutput, teacher_outputs
from ..models.zoo import ModelSpec, build_detector, load_model_spec, spec_dict
from ..options import check_device, check_int
from ..progress import log, progress
from ..views import Preprocessing, ViewSet, view_geometry
from .codecs import CODECS, get_codec
from .compact import BasisFitter, LevelBasis
from . import storage
from .arrays import read_shard_done
from .errors import NonFiniteError
from .layout import CacheLayout, LevelSpec
from .lock import ExtractLock
from .manifest import MANIFEST_KEY
from .target import probe_out
from .writer import CacheWriter

DEFAULT_CODEC = "fp16"
DEFAULT_BASIS_ITEMS = 64  # compact codec: items the bases are fitted on (a fixed cost per cache)
SHARD_TARGET_BYTES = 128 << 20  # decoded feature bytes per shard: big files, bounded writer memory


@dataclass
class ExtractOptions:
    teacher: str
    checkpoint: str
    data: str
    out: str
    split: str = "train"
    views: str = "orig,hflip"
    codec: str = DEFAULT_CODEC
    proposals: int = 1000
    pre_nms_top_n: int = 2000
    backbone: bool = False
    batch_size: int = 8
    workers: int = 2
    device: str = "cpu"
    amp: bool = False  # fp32 teacher by default: the cache is the reference the students learn from
    items_per_shard: int | None = None
    progress: bool = True
    storage_options: dict | None = None  # fsspec options for a URL `out` (s3://...); never stored
    compact_step: float | None = None  # compact codec: quantisation step / item rms (None: its default)
    basis_items: int = DEFAULT_BASIS_ITEMS  # compact codec: items the per-level bases are fitted on

    def __post_init__(self):
        ViewSet.parse(self.views)
        check_int("--proposals", self.proposals, 1, "RPN proposals kept per image")
        check_int("pre_nms_top_n", self.pre_nms_top_n, 1, "RPN proposals per level before NMS")
        check_int("--batch-size", self.batch_size, 1, "images per teacher forward")
        check_int("--workers", self.workers, 0, "DataLoader worker processes; 0 = decode in the main process")
        check_int("--items-per-shard", self.items_per_shard, 1, "leave it out for ~128 MB shards")
        check_device(self.device)


def codec_options(codec: str, compact_step: float | None) -> dict:
    """The layout's `codec_options` for a codec name and the extract options that tune it."""
    if codec == "compact":
        return get_codec(codec, {"step": compact_step} if compact_step is not None else None).options()
    if compact_step is not None:
        raise DataError(f"--compact-step applies to --codec compact, not {codec}")
    return {}


def feature_level_names(spec: ModelSpec) -> list[str]:
    return [lv.name for lv in spec.fpn_levels]


def plan_layout(spec: ModelSpec, data: DetectionData, pre: Preprocessing, views: ViewSet, codec: str,
                proposals: int, backbone: bool, items_per_shard: int | None,
                options: dict | None = None) -> CacheLayout:
    """Array shapes from annotation sizes alone (no image is decoded)."""
    max_h = max_w = 0
    for r in data.records:
        g = view_geometry((r.height, r.width), pre, False)
        max_h, max_w = max(max_h, g.canvas_size[0]), max(max_w, g.canvas_size[1])
    # ceil(H / stride) is the size torchvision computes at every level, pooled extras included.
    levels = [LevelSpec(m.name, m.channels, math.ceil(max_h / m.stride), math.ceil(max_w / m.stride))
              for m in spec.fpn_levels]
    bb_levels = [LevelSpec(m.name, m.channels, math.ceil(max_h / m.stride), math.ceil(max_w / m.stride))
                 for m in spec.cached_backbone_stages] if backbone else []
    if items_per_shard is None:
        item_bytes = sum(l.channels * l.max_h * l.max_w * 4 for l in levels + bb_levels)
        items_per_shard = int(min(64, max(1, SHARD_TARGET_BYTES // max(item_bytes, 1))))
    num_items = len(data.records) * len(views)
    max_gt = max([len(r.boxes) for r in data.records] + [1])
    return CacheLayout(num_items=num_items, items_per_shard=min(items_per_shard, max(num_items, 1)),
                       feature_levels=levels, backbone_levels=bb_levels,
                       max_proposals=proposals if spec.has_roi_head else 0, max_gt=max_gt,
                       num_logits=data.num_classes if spec.has_roi_head else 0, codec=codec,
                       codec_options=dict(options or {}), logits_dtype=get_codec(codec).logits_dtype,
                       num_views=len(views))


def provenance(spec: ModelSpec, checkpoint_sha: str, data: DetectionData, pre: Preprocessing, views: ViewSet,
               opts: ExtractOptions) -> dict:
    """What the cache depends on; training checks the dataset and preprocessing parts."""
    return {
        "teacher": spec_dict(spec),
        "teacher_checkpoint_sha256": checkpoint_sha,
        "dataset": {"name": data.name, "split": data.split, "fingerprint": data.fingerprint(),
                    "num_images": len(data.records), "num_classes": data.num_classes,
                    "class_names": data.class_names},
        "views": list(views.names),
        "preprocessing": pre.to_dict(),
        "proposals": {"post_nms_top_n": opts.proposals, "pre_nms_top_n_per_level": opts.pre_nms_top_n},
        "backbone_features": opts.backbone,
        "teacher_amp": opts.amp,
        **({"basis_sample": {"items": opts.basis_items, "seed": BASIS_SEED}} if get_codec(opts.codec).needs_basis else {}),
    }


BASIS_SEED = 0


def basis_sample(num_items: int, n: int) -> list[int]:
    """The items a cache's bases are fitted on: a fixed random sample, the same whatever the
    number of ranks or where a resumed run starts (only the creating rank fits, once)."""
    return sorted(random.Random(BASIS_SEED).sample(range(num_items), min(n, num_items)))


def bases_of_outputs(layout: CacheLayout, outputs: Iterable[TeacherOutput], step: float) -> dict[str, LevelBasis]:
    """Per level array of `layout`, the compact basis of these teacher outputs' features."""
    fitters = {name: BasisFitter(spec.channels) for name, spec in layout.all_levels}
    for o in outputs:
        for (name, _), f in zip(layout.all_levels, o.features + (o.backbone_features or [])):
            fitters[name].add(f)
    return {name: f.fit(step) for name, f in fitters.items()}


def fit_bases(teacher, dataset: Dataset, layout: CacheLayout, step: float, items: list[int], opts: ExtractOptions,
              device: torch.device, batch_size: int = 8) -> dict[str, LevelBasis]:
    """Per level array, the basis of the teacher's own features over `items` (compact.py)."""
    use_amp = opts.amp and device.type == "cuda"

    def outputs():  # batch by batch: only one batch of outputs in memory
        for k in range(0, len(items), batch_size):
            batch = check_batch([dataset[i] for i in items[k:k + batch_size]])
            with torch.autocast(device.type, enabled=use_amp):
                yield from teacher_outputs(teacher, [s["image"].to(device) for s in batch], [s["boxes"] for s in batch],
                                           opts.proposals, opts.pre_nms_top_n, opts.backbone)

    bases = bases_of_outputs(layout, outputs(), step)
    log("compact bases (rank kept / channels, explained energy): " + ", ".join(
        f"{name.split('/')[-1]} {b.rank}/{b.channels} {b.explained():.1%}" for name, b in bases.items()))
    return bases


class _ItemDataset(Dataset):
    """Cache item index -> model input (errors come back as values, see ViewDataset)."""

    def __init__(self, views_ds: ViewDataset, layout: CacheLayout):
        self.views_ds, self.layout = views_ds, layout

    def __len__(self):
        return self.layout.num_items

    def __getitem__(self, item: int):
        sample = self.views_ds[self.layout.image_view(item)]
        sample["item"] = item
        return sample


def cache_record(sample: dict, output: TeacherOutput) -> TeacherOutput:
    """The teacher output of one model input as the cache writer takes it: on the CPU and
    carrying the input's item identity (image, view, image and canvas size)."""
    g = sample["geometry"]
    return dataclasses.replace(output.cpu(), image_index=sample["image_index"], view_index=sample["view_index"],
                               image_size=g.image_size, canvas_size=g.canvas_size)


class _ShardWriterThread:
    """Encodes and writes finished shards off the teacher's thread; a bounded queue keeps
    memory to (queue size + 1) shards and stalls the teacher only when writing falls behind."""

    def __init__(self, writer: CacheWriter, data: DetectionData, max_pending: int = 2):
        self.writer, self.data = writer, data
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread will raise it
            shard, items, done = job
            try:
                self.writer.write_shard(shard, items)
                done()
            except BaseException as e:  # re-raised in the main thread
                if isinstance(e, OSError):
                    e.shard = shard  # a full disk's message names it (extract)
                self.error = e

    def put(self, shard: int, items: list[TeacherOutput], done) -> None:
        self.check()
        self.queue.put((shard, items, done))

    def check(self) -> None:
        if self.error is not None:
            e = self.error
            # The store checks every value before writing anything of a shard; name the image.
            if isinstance(e, NonFiniteError):
                where = ""
                if e.image_index is not None:
                    record = self.data.records[e.image_index]
                    where = f" for image id {record.image_id} ({record.file}), view {e.view_index}"
                raise DataError(f"teacher output cannot be cached{where}: {e}; check the teacher checkpoint "
                                "or use --codec fp32. Nothing was written for its shard") from None
            raise e

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()


def shard_batches(items: list[int], batch_size: int) -> list[list[int]]:
    """The teacher batches of one shard: its items in order, `batch_size` at a time, the last
    batch shorter. Batches never cross a shard boundary, so a shard's bytes depend on the shard
    alone: which images share a batch sets the padded batch size (hence the anchors, and the
    kernels picked for that shape) and near-tied NMS scores then keep different proposals. Any
    rank split, any resume and any re-run form the same batches."""
    return [items[k:k + batch_size] for k in range(0, len(items), batch_size)]


def _prepare_teacher(spec: ModelSpec, checkpoint: str, num_classes: int, device: torch.device):
    teacher = build_detector(spec, num_classes)
    load_weights(teacher, checkpoint, backbone_only=False)
    return teacher.eval().to(device).requires_grad_(False)


def extract(opts: ExtractOptions) -> dict:
    """Writes (or finishes) a cache at opts.out; returns a summary. Safe to call again.

    Everything is checked before anything is written at opts.out (options, dataset, what
    opts.out holds, the checkpoint loading into the teacher); the job's extraction lock
    (lock.py, taken by rank 0 for all ranks) is released however this ends."""
    with contextlib.ExitStack() as held:
        try:
            return _extract(opts, held)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(_no_space_message(opts, getattr(e, "shard", None))) from None
            raise


def _no_space_message(opts: ExtractOptions, shard: int | None) -> str:
    """What is intact after a full disk, and how to go on (a shard counts only once marked done)."""
    where = f" (writing shard {shard})" if shard is not None else ""
    try:
        group = storage.open_group(opts.out, "r", opts.storage_options)
        done = read_shard_done(group["shard_done"], opts.out)
        intact = (f"{int(done.sum())} of {done.size} shards are done and intact; nothing half-written is "
                  f"marked done")
    except Exception:  # the cache itself could not be created
        intact = "no shard was written yet"
    return (f"no space left on device writing {opts.out}{where}: {intact}; free space (or extract to a larger "
            f"disk) and run the same command again to resume")


def _extract(opts: ExtractOptions, held: contextlib.ExitStack) -> dict:
    device = du.init_from_env(opts.device)
    spec = load_model_spec(opts.teacher)
    pre = spec.preprocessing
    views = ViewSet.parse(opts.views)
    data = load_dataset(opts.data, opts.split)
    if not Path(opts.checkpoint).is_file():
        raise DataError(f"{opts.checkpoint}: teacher checkpoint not found")
    if opts.codec not in CODECS:
        raise DataError(f"--codec {opts.codec!r}: choose one of {', '.join(CODECS)}")
    try:
        options = codec_options(opts.codec, opts.compact_step)
    except ValueError as e:
        raise DataError(f"--compact-step: {e}") from None
    if opts.basis_items < 2:
        raise DataError(f"--basis-items {opts.basis_items}: need at least 2 items to fit a basis")
    layout = plan_layout(spec, data, pre, views, opts.codec, opts.proposals, opts.backbone, opts.items_per_shard,
                         options)
    prov = provenance(spec, file_sha256(opts.checkpoint), data, pre, views, opts)
    dataset = _ItemDataset(ViewDataset(data, pre, views), layout)
    built: list = []  # the teacher, built on first use: a complete cache needs none

    def get_teacher():
        if not built:
            built.append(_prepare_teacher(spec, opts.checkpoint, data.num_classes, device))
        return built[0]

    so = opts.storage_options
    # What --out holds (a file, other data: refused here) and whether the teacher loads (a text
    # file, another architecture's checkpoint) are checked before anything is written there.
    # A complete cache needs no teacher.
    state = probe_out(opts.out, so)
    manifest = (state.attrs or {}).get(MANIFEST_KEY)
    if not (isinstance(manifest, dict) and manifest.get("complete")):
        get_teacher()

    # Rank 0 takes the job's lock, then creates (or checks) the store, fitting the bases first if
    # the codec needs them; the others open it after it exists, or learn why it will not.
    fit = lambda: fit_bases(get_teacher(), dataset, layout, float(options["step"]),  # noqa: E731
                            basis_sample(layout.num_items, opts.basis_items), opts, device)
    writer, refusal = None, None
    if du.is_main_process():
        try:
            held.enter_context(ExtractLock(opts.out, so))
            writer = CacheWriter.create_or_resume(opts.out, prov, layout, create=True, storage_options=so,
                                                  fit_bases=fit if layout.codec_object().needs_basis else None)
        except UserError as e:
            refusal = e
    message = du.broadcast_object(None if refusal is None else str(refusal))  # also the ranks' barrier
    if message is not None:
        raise refusal or UserError(message)
    if writer is None:
        writer = CacheWriter.create_or_resume(opts.out, prov, layout, create=False, storage_options=so)
    if writer.complete:
        log(f"{opts.out}: cache is already complete ({layout.num_items} items); nothing to do")
        return {"out": opts.out, "complete": True, "written_shards": 0, "items": 0, "ranks": du.world_size()}
    pending = [s for s in writer.pending_shards() if s % du.world_size() == du.rank()]
    total_pending = len(writer.pending_shards())
    log(f"{data.summary()}\nextracting {spec.name} -> {opts.out}: {layout.num_items} items "
        f"({len(data.records)} images x {len(views)} views), {layout.num_shards} shards of "
        f"{layout.items_per_shard}, codec {opts.codec}; {total_pending} shards to do"
        + (f", {len(pending)} on this rank" if du.world_size() > 1 else ""))

    teacher = get_teacher()
    batches = [b for s in pending for b in shard_batches(writer.shard_items(s), opts.batch_size)]
    order = [i for b in batches for i in b]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=opts.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if opts.workers else None)
    bar = progress(len(order), "extract", unit="item", enabled=opts.progress)  # item = (image, view)
    write_thread = _ShardWriterThread(writer, data)
    buffers: dict[int, dict[int, TeacherOutput]] = {s: {} for s in pending}
    shard_of = {i: s for s in pending for i in writer.shard_items(s)}
    start, written = time.time(), [0]
    use_amp = opts.amp and device.type == "cuda"
    try:
        for batch in loader:
            images = [s["image"].to(device, non_blocking=True) for s in check_batch(batch)]
            with torch.autocast(device.type, enabled=use_amp):
                outs = teacher_outputs(teacher, images, [s["boxes"] for s in batch], opts.proposals,
                                       opts.pre_nms_top_n, opts.backbone)
            for s, o in zip(batch, outs):
                shard = shard_of[s["item"]]
                buf = buffers[shard]
                buf[s["item"]] = cache_record(s, o)
                if len(buf) == len(writer.shard_items(shard)):
                    items = [buf[i] for i in writer.shard_items(shard)]
                    del buffers[shard]
                    write_thread.put(shard, items, lambda: written.__setitem__(0, written[0] + 1))
            bar.update(len(batch))
    finally:
        bar.close()
        write_thread.close()
    du.barrier()
    complete = writer.mark_complete() if du.is_main_process() else False
    # under torchrun the one summary line is the job's: all ranks' items over the slowest rank's time
    job = du.job_totals({"items": len(order), "shards": written[0]}, {"seconds": time.time() - start}, device)
    items, shards, seconds = int(job["items"]), int(job["shards"]), job["seconds"]
    summary = {"out": opts.out, "complete": complete, "written_shards": shards, "items": items,
               "seconds": round(seconds, 1), "items_per_s": round(items / max(seconds, 1e-9), 2),
               "ranks": du.world_size()}
    if du.is_main_process():
        log(f"wrote {shards} shards ({items} items) in {seconds:.1f}s"
            + (f" on {du.world_size()} ranks" if du.world_size() > 1 else "")
            + ("; cache complete" if complete else "; other shards remain (run again to finish)"))
    return summary


__all__ = ["DEFAULT_CODEC", "ExtractOptions", "cache_record", "extract", "plan_layout"]
