#!/usr/bin/env python
"""Benchmark of stage 1 (teacher -> cache): extraction overhead, codecs, reads, padding.

Measures, on the synthetic shapes dataset and a CPU-scale teacher (r18_fpn_cpu by default):

* overhead_ratio   wall time of the whole ``extract(ExtractOptions(...))`` call (teacher build,
                   data loading, views, forward, encoding, writing; codec fp16, views orig,hflip)
                   over the wall time of the bare teacher forward (``teacher_outputs`` on the
                   same (image, view) inputs, pre-decoded in memory, same batch size, device and
                   torch threads).  The bare forward runs first (after one untimed warm-up
                   batch), then extract, --repeats times alternately; the fastest of each count.
                   Target <= 1.10.
* codecs           per codec (fp32, fp16, bf16, int8), on the REAL teacher features of these
                   images (the bare forward's outputs): bytes per (image, view) stored in a real
                   cache with the extracted layout (CacheWriter + TeacherCache.inspect), relative
                   L2 error of TeacherCache.read overall and per level, encode / decode MB/s (of
                   float32 values) from ``defeat_cache.cache.codec_bench.measure_codec``, plus an
                   extrapolation to COCO train2017 with r152_fpn at 800x1216 (bench_extract_codecs.py).
* read_throughput  whole items read via ``TeacherCache.read`` from the fp16 cache just written,
                   shuffled, through a DataLoader with num_workers 0, 1, 2.
* padding_effect   relative L2 change of the teacher's FPN features inside an image's own canvas
                   when it is run in a zero-padded batch with a differently sized image
                   (torchvision's batching, ``teacher.transform``) instead of alone.

Progress goes to stderr; the LAST stdout line is one JSON object (also written to --json).
usage: python pipeline/bench_extract.py [--images 96] [--json out.json] [--teacher-checkpoint PT]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_common_args, command_line, emit, loadavg, load_teacher, log,  # noqa: E402
                          make_dataset, resolve_teacher_checkpoint, work_folder)
from bench_extract_codecs import CODEC_NAMES, coco_extrapolation, measure_codecs, real_layout_codecs  # noqa: E402


# --------------------------------------------------------------------------- measurements
def bare_forward(teacher, samples: list[dict], batch_size: int, proposals: int, pre_nms: int, device):
    """Times teacher_outputs alone on pre-decoded inputs; returns (seconds, per-item TeacherOutput)."""
    import torch
    from defeat_cache.models.teacher import teacher_outputs
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]

    def run(batch):
        return teacher_outputs(teacher, [s["image"].to(device) for s in batch], [s["boxes"] for s in batch],
                               proposals, pre_nms, False)

    run(batches[0])  # warm-up (allocator, kernels), not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
    outs = []
    t0 = time.perf_counter()
    for k, b in enumerate(batches):
        outs.extend(run(b))
        if (k + 1) % max(1, len(batches) // 4) == 0:
            log(f"  bare forward: {min(len(samples), (k + 1) * batch_size)}/{len(samples)} items")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, outs



class _ReadItems:
    """Map-style dataset: item index -> decoded TeacherOutput (opens the store lazily per process)."""

    def __init__(self, path: str):
        from defeat_cache.cache import TeacherCache
        self.cache = TeacherCache(path)

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return self.cache.read(int(i))


def read_throughput(cache_path: str, workers_list, min_seconds: float, seed: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    ds = _ReadItems(cache_path)
    out = {}
    for w in workers_list:
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=None, shuffle=True, generator=g, num_workers=w,
                            persistent_workers=w > 0, prefetch_factor=4 if w else None)
        t_start = time.perf_counter()
        t_first = None
        items = nbytes = 0
        epochs = 0
        while True:
            for item in loader:
                if t_first is None:
                    t_first = time.perf_counter()  # steady state starts after worker start-up
                else:
                    items += 1
                    nbytes += sum(f.numel() * f.element_size() for f in item.features)
            epochs += 1
            if time.perf_counter() - t_first >= min_seconds:
                break
        sec = time.perf_counter() - t_first
        del loader
        out[str(w)] = {"images_per_s": round(items / sec, 1), "decoded_MBps": round(nbytes / sec / 1e6, 1),
                       "items": items, "epochs": epochs, "seconds": round(sec, 2),
                       "startup_s": round(t_first - t_start, 3)}
        log(f"  read num_workers={w}: {out[str(w)]['images_per_s']} items/s, {out[str(w)]['decoded_MBps']} MB/s decoded")
    return out


def padding_effect(teacher, samples: list[dict], num_views: int, pairs: int, seed: int, level_names, device) -> dict:
    """Run each image alone (own canvas) and in a zero-padded batch of two with a different
    canvas size; compare the features inside its own canvas, per level."""
    import torch
    from defeat_cache.models.forward import backbone_features
    sd = teacher.transform.size_divisible
    imgs = [samples[i] for i in range(0, len(samples), num_views)]  # view 0 of each image

    def canvas(s):
        return (-(-s["image"].shape[1] // sd) * sd, -(-s["image"].shape[2] // sd) * sd)

    order = list(range(len(imgs)))
    random.Random(seed).shuffle(order)
    chosen, used = [], set()
    for a in order:
        if len(chosen) >= pairs or a in used:
            continue
        for b in order:
            if b != a and b not in used and canvas(imgs[b]) != canvas(imgs[a]):
                chosen.append((a, b))
                used.update((a, b))
                break

    @torch.no_grad()
    def fpn_of(images):
        image_list, _ = teacher.transform([im.to(device) for im in images])
        fpn, _ = backbone_features(teacher, image_list)
        return [v.float().cpu() for v in fpn.values()], tuple(image_list.tensors.shape[-2:])

    padded_err = {n: [] for n in level_names}
    padded_overall, unpadded_max, records = [], 0.0, []
    for a, b in chosen:
        batch_fpn, batch_canvas = fpn_of([imgs[a]["image"], imgs[b]["image"]])
        for j, k in enumerate((a, b)):
            alone, own = fpn_of([imgs[k]["image"]])
            num = den = 0.0
            errs = []
            for lv_alone, lv_batch in zip(alone, batch_fpn):
                h, w = lv_alone.shape[-2:]
                ref = lv_alone[0].double()
                d = float(torch.linalg.vector_norm(lv_batch[j, :, :h, :w].double() - ref))
                r = float(torch.linalg.vector_norm(ref))
                errs.append(d / max(r, 1e-30))
                num += d * d
                den += r * r
            overall = math.sqrt(num / max(den, 1e-300))
            if own == batch_canvas:  # this image got no extra padding: float noise only
                unpadded_max = max(unpadded_max, max(errs))
                continue
            for n, e in zip(level_names, errs):
                padded_err[n].append(e)
            padded_overall.append(overall)
            records.append({"image": int(imgs[k]["image_index"]), "own_canvas": list(own),
                            "batch_canvas": list(batch_canvas), "rel_l2": round(overall, 5)})
    per_level = {n: {"mean": float(f"{sum(v) / len(v):.4g}"), "max": float(f"{max(v):.4g}")}
                 for n, v in padded_err.items() if v}
    res = {
        "pairs": len(chosen),
        "padded_images": len(padded_overall),
        "rel_l2_per_level": per_level,
        "rel_l2_overall": ({"mean": float(f"{sum(padded_overall) / len(padded_overall):.4g}"),
                            "max": float(f"{max(padded_overall):.4g}")} if padded_overall else None),
        "unpadded_images_max_rel_l2": float(f"{unpadded_max:.3g}"),
        "examples": records[:6],
        "method": "teacher backbone+FPN on the image alone (own canvas, padded to size_divisible) vs in a "
                  "zero-padded batch of two (teacher.transform), cropped to the image's own extent per level; "
                  "relative L2 = ||batch - alone|| / ||alone||, over images that got extra padding",
    }
    if padded_overall:
        log(f"  padding: {len(padded_overall)} padded images, overall rel L2 mean {res['rel_l2_overall']['mean']:.3g} "
            f"max {res['rel_l2_overall']['max']:.3g}")
    return res


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(ap, images=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--views", default="orig,hflip")
    ap.add_argument("--batch-size", type=int, default=8, help="extract batch size (the CLI default)")
    ap.add_argument("--workers", type=int, default=2, help="extract DataLoader workers (the CLI default)")
    ap.add_argument("--proposals", type=int, default=300, help="post-NMS proposals (the quickstart's)")
    ap.add_argument("--pre-nms-top-n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=2, help="bare-forward / extract pairs, alternated")
    ap.add_argument("--codecs", default=",".join(CODEC_NAMES))
    ap.add_argument("--codec-items", type=int, default=0, help="items given to measure_codec (encode/decode speed, own-extent bytes; 0 = all); the real-cache figures use all")
    ap.add_argument("--codec-repeats", type=int, default=3)
    ap.add_argument("--read-workers", default="0,1,2")
    ap.add_argument("--read-seconds", type=float, default=2.0, help="min seconds timed per read setting")
    ap.add_argument("--padding-pairs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_all = time.perf_counter()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from defeat_cache.cache.extract import ExtractOptions, extract, feature_level_names
    from defeat_cache.cache import TeacherCache, image_view
    from defeat_cache.data.dataset import ViewDataset, load_dataset
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.views import ViewSet
    from defeat_cache.distill.distiller import PAPER_MIN_SIZE
    from defeat_cache.distill.masks import FINEST_SCALE

    result: dict = {"benchmark": "extract", "command": command_line(), "device": args.device,
                    "torch_threads": threads, "cpu_count": os.cpu_count(), "loadavg_start": loadavg()}
    with work_folder(args.work, "bench_extract_") as work:
        data_toml = make_dataset(work, args.images, args.seed)
        ckpt, ckpt_kind = resolve_teacher_checkpoint(args.teacher_checkpoint, args.teacher, data_toml, work, args.seed)
        spec = load_model_spec(args.teacher)
        views = ViewSet.parse(args.views)
        data = load_dataset(data_toml, "train")
        device = torch.device(args.device)
        level_names = feature_level_names(spec)
        result.update(teacher=args.teacher, teacher_checkpoint=ckpt, teacher_weights=ckpt_kind,
                      images=len(data.records), views=list(views.names), items=len(data.records) * len(views),
                      batch_size=args.batch_size, extract_workers=args.workers, proposals=args.proposals,
                      pre_nms_top_n=args.pre_nms_top_n)

        # 1. bare teacher forward on pre-decoded inputs (same item order and batches as extract)
        log("decoding all (image, view) inputs into memory")
        vds = ViewDataset(data, spec.preprocessing, views)
        samples = [vds.sample(*image_view(i, len(views))) for i in range(len(data.records) * len(views))]
        teacher = load_teacher(args.teacher, ckpt, data.num_classes, device)
        cache_path = work / "cache_fp16.zarr"
        opts = ExtractOptions(teacher=args.teacher, checkpoint=ckpt, data=str(data_toml), out=str(cache_path),
                              views=args.views, codec="fp16", proposals=args.proposals,
                              pre_nms_top_n=args.pre_nms_top_n, batch_size=args.batch_size,
                              workers=args.workers, device=args.device)
        compact_path = work / "cache_compact.zarr"
        compact_opts = dataclasses.replace(opts, out=str(compact_path), codec="compact")
        fwd_times, ext_times, loop_times, compact_times, compact_loops = [], [], [], [], []
        outs = None
        for rep in range(args.repeats):
            log(f"[{rep + 1}/{args.repeats}] bare forward: {len(samples)} items, batch {args.batch_size}, "
                f"{threads} torch threads")
            t_fwd, o = bare_forward(teacher, samples, args.batch_size, args.proposals, args.pre_nms_top_n, device)
            outs = outs or o
            fwd_times.append(t_fwd)
            log(f"bare forward: {t_fwd:.2f}s ({len(samples) / t_fwd:.1f} items/s)")
            # 2. the whole extract call, fp16, into a fresh folder
            if cache_path.exists():
                shutil.rmtree(cache_path)
            log(f"[{rep + 1}/{args.repeats}] extract (fp16): timing the whole call")
            t0 = time.perf_counter()
            summary = extract(opts)
            t_ext = time.perf_counter() - t0
            ext_times.append(t_ext)
            loop_times.append(summary.get("seconds"))
            log(f"extract: {t_ext:.2f}s whole call ({summary.get('seconds')}s in its loop), "
                f"ratio {t_ext / t_fwd:.3f}")
            # 2b. the same with the compact codec (its basis fit included), same machine, same round
            if compact_path.exists():
                shutil.rmtree(compact_path)
            log(f"[{rep + 1}/{args.repeats}] extract (compact): timing the whole call")
            t0 = time.perf_counter()
            compact_summary = extract(compact_opts)
            compact_times.append(time.perf_counter() - t0)
            compact_loops.append(compact_summary.get("seconds"))
            log(f"extract compact: {compact_times[-1]:.2f}s whole call, ratio {compact_times[-1] / t_fwd:.3f}")
        n = len(samples)
        t_fwd, t_ext = min(fwd_times), min(ext_times)
        ratio = t_ext / t_fwd
        result["extract"] = {
            "overhead_ratio": round(ratio, 3),
            "target": "<= 1.10",
            "meets_target": ratio <= 1.10,
            "overhead_ratio_per_repeat": [round(e / f, 3) for e, f in zip(ext_times, fwd_times)],
            "compact_overhead_ratio": round(min(compact_times) / t_fwd, 3),
            "compact_over_fp16_extract": round(min(compact_times) / t_ext, 3),
            "compact_extract_seconds": [round(x, 2) for x in compact_times],
            # the loop alone (extract's own timer) leaves out the basis fit, a teacher pass over
            # --basis-items items before the first shard: a fixed cost (64 items by default)
            "compact_overhead_ratio_loop": round(min(compact_loops) / t_fwd, 3) if all(compact_loops) else None,
            "compact_over_fp16_loop": round(min(compact_loops) / min(loop_times), 3)
            if all(compact_loops) and all(loop_times) else None,
            "overhead_ratio_loop": round(min(loop_times) / t_fwd, 3) if all(loop_times) else None,
            "extract_seconds": [round(x, 2) for x in ext_times],
            "extract_loop_seconds": loop_times,
            "bare_forward_seconds": [round(x, 2) for x in fwd_times],
            "extract_items_per_s": round(n / t_ext, 2),
            "bare_forward_items_per_s": round(n / t_fwd, 2),
            "method": "per repeat: the bare forward (1 untimed warm-up batch, then every item once), then the "
                      "whole extract() call into a fresh folder (cold: teacher build, data loading with its "
                      "DataLoader workers, fp16 encoding, writing). overhead_ratio = min(extract) / min(bare) "
                      "over repeats (the least disturbed run of each on a shared machine); "
                      "overhead_ratio_loop uses extract's own loop timer (no setup)",
        }
        result["overhead_ratio"] = result["extract"]["overhead_ratio"]
        result["extract_items_per_s"] = result["extract"]["extract_items_per_s"]
        result["bare_forward_items_per_s"] = result["extract"]["bare_forward_items_per_s"]
        cache = TeacherCache(str(cache_path))
        insp = cache.inspect()
        result["extract"]["fp16_cache_feature_bytes_per_view"] = round(insp["feature_bytes_per_item"], 1)
        result["extract"]["fp16_cache_bytes_per_view"] = round(insp["bytes_per_item"], 1)

        # 3. codecs on the real teacher features
        codec_names = [c for c in args.codecs.split(",") if c]
        k = args.codec_items or len(outs)
        log(f"codecs: measure_codec on {k} items of real teacher features")
        mc = measure_codecs([[f.cpu() for f in o.features] for o in outs[:k]], codec_names, args.codec_repeats,
                            level_names)
        log(f"codecs: real caches (extracted layout, one per codec) from all {len(outs)} items")
        student_like = load_model_spec(args.teacher)
        finest = FINEST_SCALE * student_like.preprocessing.min_size / PAPER_MIN_SIZE
        real = real_layout_codecs(str(cache_path), samples, outs, codec_names, work, level_names,
                                  strides=student_like.strides, finest_scale=finest)
        codecs = {}
        for name in codec_names:
            m, r = mc["by_codec"][name], real[name]
            codecs[name] = {
                "bytes_per_view": r["bytes_per_view"],
                "feature_bytes_per_view": r["feature_bytes_per_view"],
                "params_bytes_per_view": r["params_bytes_per_view"],
                "ratio_vs_fp32": None,
                "rel_l2": r["rel_l2"],
                "rel_l2_per_level": r["rel_l2_per_level"],
                "encode_MBps": m["encode_MBps"],
                "decode_MBps": m["decode_MBps"],
                "cache_write_MBps": r["write_MBps"],
                "cache_read_MBps": r["read_MBps"],
                "cache_read_items_per_s": r["read_items_per_s"],
                "own_extent_bytes_per_view": m["bytes_per_view"],
                "own_extent_feature_bytes_per_value": m["feature_bytes_per_value"],
                "real_over_own_extent": round(r["bytes_per_view"] / m["bytes_per_view"], 3),
                "tiled_over_own_values": r["tiled_over_own_values"],
                # stored bytes of one zero-padded value relative to one data value (0: free, 1: as costly)
                "zero_padding_cost": round((r["feature_bytes_per_view"] / (m["bytes_per_view"] - m["params_bytes_per_view"]) - 1)
                                           / max(r["tiled_over_own_values"] - 1, 1e-9), 3),
                "rel_l2_measure_codec": m["rel_l2"],
            }
            for key in ("options", "roi_arrays_bytes_per_view", "side_data_bytes", "ranks", "explained_energy",
                        "basis_fit_s", "kd_fidelity", "vs_extracted_cache"):
                if r.get(key) is not None:
                    codecs[name][key] = r[key]
            log(f"  {name}: {r['bytes_per_view'] / 1e3:.1f} kB/view in the cache ({m['bytes_per_view'] / 1e3:.1f} kB "
                f"own extent), rel L2 {r['rel_l2']:.3g}, encode {m['encode_MBps']:.0f} MB/s, "
                f"decode {m['decode_MBps']:.0f} MB/s")
        if "fp32" in codecs:
            for c in codecs.values():
                c["ratio_vs_fp32"] = round(c["bytes_per_view"] / codecs["fp32"]["bytes_per_view"], 4)
        if "fp16" in codecs:  # the compact goal is stated against fp16
            for c in codecs.values():
                c["fp16_over_this_features"] = round(codecs["fp16"]["feature_bytes_per_view"] /
                                                     max(c["feature_bytes_per_view"], 1e-9), 2)
        result["codecs"] = codecs
        result["codec_measurement"] = {
            "items_measure_codec": mc["items"], "items_real_cache": len(outs), "values_per_view": mc["values_per_view"],
            "shape_groups": mc["groups"], "repeats": mc["repeats"],
            "bytes_per_view": "stored feature (+ int8 params) bytes per (image, view) in a real cache with the "
                              "extracted layout (TeacherCache.inspect), i.e. incl. zero-padded edge tiles",
            "own_extent_bytes_per_view": "measure_codec: the same values stored at their own extent only",
            "rel_l2": "||TeacherCache.read - fp32 teacher features|| / ||fp32||, all items (per level: same per level)",
            "encode_MBps/decode_MBps": "measure_codec (zarr + codec, in-memory store, best of repeats), MB of "
                                       "float32 values per s, one process",
            "cache_write_MBps/cache_read_MBps": "CacheWriter.write_shard / TeacherCache.read on local disk, "
                                                "one process, item by item",
        }
        result["coco_extrapolation"] = coco_extrapolation(codecs, len(views))

        # 4. reading whole items from the fp16 cache
        log("read throughput (fp16 cache, shuffled)")
        result["read_throughput"] = {
            "codec": "fp16", "items": len(cache),
            "by_num_workers": read_throughput(str(cache_path), [int(w) for w in args.read_workers.split(",") if w != ""],
                                              args.read_seconds, args.seed),
            "method": "DataLoader(batch_size=None, shuffle) over TeacherCache.read; timed from the first item "
                      "received (worker start-up excluded, shown as startup_s); decoded MB/s of float32 features",
        }

        # 5. batch padding
        log(f"padding effect on {args.padding_pairs} pairs")
        result["padding_effect"] = padding_effect(teacher, samples, len(views), args.padding_pairs, args.seed,
                                                  level_names, device)
    result["loadavg_end"] = loadavg()
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    log(f"done in {result['total_seconds']}s")
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
