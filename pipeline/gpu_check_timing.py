"""The timing steps of pipeline/gpu_check.py: paper-scale extraction and student steps.

Random weights (no checkpoints offline; the timings hardly depend on them) on the synthetic
shapes dataset resized to the paper's 800x1333 input. The ratios are the figures to keep:
every mode runs in the same process, one after the other, on the same machine and data.
The measurements are bench_extract's bare forward and extract() call and bench_train's
run_mode, with the device synchronised around them and CUDA's peak memory added.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time

import torch

import bench_train
from bench_common import load_teacher
from bench_extract import bare_forward
from gpu_check_setup import Checks, Setup, log

TRAIN_MODES = ("plain", "cache_fp16", "cache_compact", "in_memory", "online")
# A mode is DataLoader-bound when its workers, each making samples at the measured rate, can
# barely keep up: batch x seconds per sample / workers >= this share of the step time.
LOADER_BOUND_SHARE = 0.9


def _canvases(samples: list[dict]) -> dict:
    sizes = [s["geometry"].canvas_size for s in samples]
    return {"canvas_hw_mean": [round(sum(h for h, _ in sizes) / len(sizes)), round(sum(w for _, w in sizes) / len(sizes))],
            "canvas_hw_max": [max(h for h, _ in sizes), max(w for _, w in sizes)]}


def step_time_extract(setup: Setup) -> tuple[dict, Checks]:
    """Teacher extraction at paper scale: the bare teacher forward, then whole extract() calls
    with the fp16 and compact codecs (the caches step_time_train trains from)."""
    from defeat_cache.cache import image_view
    from defeat_cache.cache.extract import extract
    from defeat_cache.data.dataset import ViewDataset, load_dataset
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.views import ViewSet
    checks = Checks()
    sizes = setup.sizes
    name, (proposals, pre_nms) = setup.teacher("paper"), setup.proposals("paper")
    data = load_dataset(setup.data("paper"), "train")
    spec = load_model_spec(name)
    views = ViewSet.parse("orig,hflip")
    vds = ViewDataset(data, spec.preprocessing, views)
    samples = [vds.sample(*image_view(i, len(views))) for i in range(len(data.records) * len(views))]
    figures: dict = {"teacher": name, "items": len(samples), "batch_size": sizes.extract_batch,
                     "workers": sizes.extract_workers, "proposals": proposals, "pre_nms_top_n": pre_nms,
                     **_canvases(samples)}
    teacher = load_teacher(name, str(setup.checkpoint("paper")), data.num_classes, setup.device)
    setup.reset_peak_memory()
    log(f"bare {name} forward on {len(samples)} items")
    bare_s, outs = bare_forward(teacher, samples, sizes.extract_batch, proposals, pre_nms, setup.device)
    figures["bare_forward"] = {"seconds": round(bare_s, 3), "items_per_s": round(len(samples) / bare_s, 2),
                               "peak_gpu_MB": setup.peak_memory_mb()}
    setup.save_partial("time_extract", figures)
    del outs, teacher
    if setup.is_cuda:
        torch.cuda.empty_cache()
    for codec in ("fp16", "compact"):
        out = setup.cache_path("paper", codec)
        shutil.rmtree(out, ignore_errors=True)
        log(f"extract {codec} -> {out}")
        setup.reset_peak_memory()
        t0 = time.perf_counter()
        summary = extract(setup.extract_options("paper", out, codec=codec))
        setup.synchronize()
        wall = time.perf_counter() - t0
        checks.true(f"{codec} cache complete", bool(summary.get("complete")), str(summary))
        figures[f"extract_{codec}"] = {
            "seconds": round(wall, 2), "loop_seconds": summary.get("seconds"),
            "items_per_s": round(len(samples) / wall, 2), "overhead_vs_bare": round(wall / bare_s, 3),
            "loop_overhead_vs_bare": round(summary["seconds"] / bare_s, 3) if summary.get("seconds") else None,
            "peak_gpu_MB": setup.peak_memory_mb(), "cache_MB": round(_folder_bytes(out) / 1e6, 1)}
        setup.save_partial("time_extract", figures)
    figures["method"] = ("bare_forward: teacher_outputs on pre-decoded inputs, one untimed warm-up batch "
                         "(bench_extract.bare_forward); extract_*: the whole extract() call, cold (teacher build, "
                         "DataLoader workers, encoding, writing; compact also fits its basis first); loop_*: "
                         "extract's own loop timer")
    return figures, checks


def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _sample_seconds(setup: Setup, mode: str, caches: dict) -> float:
    """Seconds one DataLoader worker spends making one training sample of `mode` (the mean over
    sizes.loader_samples samples after one untimed): image decoding and views, and for a cache
    reading its item (decoded on the CPU, or left encoded for the GPU as training does)."""
    from defeat_cache.data.dataset import ViewDataset, load_dataset
    from defeat_cache.distill.sources import build_teacher_source
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.views import ViewSet
    data = load_dataset(setup.data("paper"), "train")
    spec = load_model_spec(setup.student("paper"))
    if mode.startswith("cache_"):
        ds = build_teacher_source(data, spec, setup.preset("paper"), setup.device,
                                  cache=str(caches[mode])).dataset(data)
    else:
        ds = ViewDataset(data, spec.preprocessing, ViewSet.parse("orig,hflip"))
    keys = [(i % len(data.records), i % 2) for i in range(setup.sizes.loader_samples + 1)]
    ds[keys[0]]
    t0 = time.perf_counter()
    for key in keys[1:]:
        ds[key]
    return (time.perf_counter() - t0) / (len(keys) - 1)


def _mode_args(setup: Setup, mode: str, caches: dict, run) -> object:
    sizes = setup.sizes
    proposals, pre_nms = setup.proposals("paper")
    bench_mode = "cache" if mode.startswith("cache_") else mode
    cache = caches.get(mode, caches["cache_fp16"])
    return bench_train.parse_args([
        "--mode", bench_mode, "--data", str(setup.data("paper")), "--out", str(run),
        "--student", setup.student("paper"), "--teacher", setup.teacher("paper"),
        "--teacher-checkpoint", str(setup.checkpoint("paper")), "--cache", str(cache),
        "--max-iters", str(sizes.train_iters), "--warmup", str(sizes.train_warmup),
        "--batch-size", str(sizes.train_batch), "--workers", str(sizes.train_workers),
        "--preset", "defeat", "--proposals", str(proposals), "--pre-nms-top-n", str(pre_nms),
        "--device", setup.device_name, "--child-json", str(run) + ".json"])


def step_time_train(setup: Setup) -> tuple[dict, Checks]:
    """r50_fpn student steps, AMP on CUDA: plain, from the fp16 and the compact cache, from
    in-memory teacher outputs (the fp16 cache decoded into RAM first), with the teacher online."""
    checks = Checks()
    sizes = setup.sizes
    caches = {"cache_fp16": setup.cache("paper", "fp16"), "cache_compact": setup.cache("paper", "compact")}
    figures: dict = {"student": setup.student("paper"), "teacher": setup.teacher("paper"),
                     "batch_size": sizes.train_batch, "workers": sizes.train_workers, "iterations": sizes.train_iters,
                     "warmup_dropped": sizes.train_warmup, "amp": setup.is_cuda, "preset": "defeat", "modes": {}}
    for mode in TRAIN_MODES:
        run = setup.work / "time_train" / mode
        args = _mode_args(setup, mode, caches, run)
        log(f"train mode {mode}: {sizes.train_iters} iterations")
        setup.reset_peak_memory()
        t0 = time.perf_counter()
        res = bench_train.run_mode(args)
        wall = time.perf_counter() - t0
        peak = setup.peak_memory_mb()
        # metrics.jsonl's images_per_s (log_every=1) is batch / that step's time at 2 decimals:
        # finer than its `time` field (10 ms), which run_mode's median uses
        lines = sorted((json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()), key=lambda r: r["iter"])
        steps = [sizes.train_batch / r["images_per_s"] for r in lines if r["iter"] > sizes.train_warmup and r["images_per_s"] > 0]
        step_s = statistics.median(steps) if steps else float("nan")
        figures["modes"][mode] = {"step_s": round(step_s, 4), "images_per_s": round(sizes.train_batch / step_s, 2),
                                  "steps_timed": len(steps), "peak_gpu_MB": peak,
                                  "wall_s": round(wall, 1), "final_loss": res["final_loss"]}
        checks.true(f"{mode} trained", len(lines) == sizes.train_iters and all(
            r["loss"] == r["loss"] for r in lines), f"{len(lines)} metrics lines")
        setup.save_partial("time_train", figures)
    m = figures["modes"]
    ratio = lambda a, b: round(m[a]["step_s"] / m[b]["step_s"], 3)  # noqa: E731
    figures["ratios"] = {"cache_vs_online": ratio("cache_fp16", "online"), "cache_vs_plain": ratio("cache_fp16", "plain"),
                         "cache_vs_in_memory": ratio("cache_fp16", "in_memory"),
                         "compact_vs_online": ratio("cache_compact", "online"),
                         "compact_vs_plain": ratio("cache_compact", "plain"),
                         "compact_vs_in_memory": ratio("cache_compact", "in_memory")}
    loader = {}
    for mode in ("plain", "cache_fp16", "cache_compact"):
        per_sample = _sample_seconds(setup, mode, caches)
        share = sizes.train_batch * per_sample / max(sizes.train_workers, 1) / m[mode]["step_s"]
        loader[mode] = {"sample_s": round(per_sample, 4), "loader_share_of_step": round(share, 3),
                        "dataloader_bound": share >= LOADER_BOUND_SHARE}
    figures["dataloader"] = loader
    figures["method"] = ("each mode: bench_train.run_mode (train(), log_every=1) in this process, one after the other; "
                         "step_s = median over iterations after the warm-up of batch / images_per_s; peak_gpu_MB = "
                         "torch.cuda.max_memory_allocated of the mode; dataloader: sample_s = one sample made in this "
                         "process (mean), loader_share_of_step = batch x sample_s / workers / step_s, bound when >= "
                         f"{LOADER_BOUND_SHARE}")
    return figures, checks
