#!/usr/bin/env python
"""Benchmark of both stages on 1 process vs `torchrun --nproc_per_node=N` (gloo on CPU, NCCL on GPU).

Extraction: `defeat-cache extract` of the same data and teacher, alone and under torchrun;
images/s = items written / the slowest rank's loop time (the job summary line), and also
over the whole command's wall time (start-up included).

Training: `defeat-cache train --cache` with the same per-rank batch (so N ranks train on an
N-times larger global batch, as DDP users scale), alone and under torchrun; images/s =
median of metrics.jsonl's `images_per_s` (global images over each logging window) after the
first --warmup iterations, plus the wall time of the whole command.

On a CPU, one process uses --threads torch threads (default: all cores) and each of N ranks
gets cores / N, so the comparison is "the same machine, split by ranks instead of threads".
One more single-process run with a rank's share of threads gives the scaling efficiency:
N-rank throughput / (N x that run's), i.e. what DDP (gradient all-reduce, N processes and
their loaders sharing the machine) costs against N independent copies of one rank.

Progress goes to stderr; the LAST stdout line is one JSON object (also written to --json).
usage: python pipeline/bench_scaling.py [--images 96] [--nproc 2] [--max-iters 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_common_args, command_line, emit, loadavg, log, make_dataset,  # noqa: E402
                          resolve_teacher_checkpoint, work_folder)


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "defeat_cache"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "defeat_cache"]


def _run(cmd: list[str], threads: int) -> tuple[dict, float]:
    """(the command's JSON summary line, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1]), wall


def time_extraction(args, data: Path, ckpt: str, work: Path, nproc: int, threads: int) -> tuple[dict, str]:
    out = work / f"cache_{nproc}x{threads}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cmd = _launcher(nproc) + ["extract", "--teacher", args.teacher, "--checkpoint", ckpt, "--data", str(data),
                              "--out", str(out), "--codec", "fp16", "--proposals", str(args.proposals),
                              "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                              "--items-per-shard", str(args.items_per_shard), "--device", args.device]
    summary, wall = _run(cmd, threads)
    log(f"extract {nproc} rank(s) x {threads} thread(s): {summary['items_per_s']} items/s in the loop, {summary['items'] / wall:.1f} over {wall:.1f}s wall")
    return {"ranks": nproc, "threads_per_rank": threads, "items": summary["items"],
            "loop_items_per_s": summary["items_per_s"], "wall_s": round(wall, 1),
            "wall_items_per_s": round(summary["items"] / wall, 2)}, str(out)


def time_training(args, data: Path, cache: str, work: Path, nproc: int, threads: int) -> dict:
    out = work / f"train_{nproc}x{threads}"
    shutil.rmtree(out, ignore_errors=True)
    distill = [] if args.preset == "none" else ["--cache", cache, "--distill", args.preset]
    cmd = _launcher(nproc) + ["train", "--student", args.student, "--data", str(data), "--out", str(out),
                              *distill, "--max-iters", str(args.max_iters),
                              "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                              "--log-every", "1", "--device", args.device]
    _, wall = _run(cmd, threads)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ips = [m["images_per_s"] for m in lines if m["iter"] > args.warmup]
    images = args.max_iters * args.batch_size * nproc
    result = {"ranks": nproc, "threads_per_rank": threads, "global_batch": args.batch_size * nproc,
              "images_per_s": round(statistics.median(ips), 2), "wall_s": round(wall, 1),
              "wall_images_per_s": round(images / wall, 2)}
    log(f"train {nproc} rank(s) x {threads} thread(s): {result['images_per_s']} images/s (median), {wall:.1f}s wall")
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, images=96)
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun runs")
    ap.add_argument("--student", default="r18q_fpn_cpu")
    ap.add_argument("--preset", default="defeat_cpu", help="distillation preset; none = plain training")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4, help="per rank, both stages")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    ap.add_argument("--items-per-shard", type=int, default=8)
    ap.add_argument("--proposals", type=int, default=300)
    ap.add_argument("--max-iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="iterations left out of the median")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the 1-process runs")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with work_folder(args.work, "bench_scaling_") as work:
        data = make_dataset(work, args.images)
        ckpt, ckpt_kind = resolve_teacher_checkpoint(args.teacher_checkpoint, args.teacher, data, work)
        per_rank_threads = max(1, args.threads // args.nproc)
        ex1, cache = time_extraction(args, data, ckpt, work, 1, args.threads)
        ex1r, _ = time_extraction(args, data, ckpt, work, 1, per_rank_threads)
        exn, _ = time_extraction(args, data, ckpt, work, args.nproc, per_rank_threads)
        tr1 = time_training(args, data, cache, work, 1, args.threads)
        tr1r = time_training(args, data, cache, work, 1, per_rank_threads)
        trn = time_training(args, data, cache, work, args.nproc, per_rank_threads)
        result = {
            "command": command_line(), "cpu_count": os.cpu_count(), "loadavg": loadavg(),
            "device": args.device, "teacher": args.teacher, "teacher_checkpoint": ckpt_kind,
            "student": args.student, "preset": args.preset, "images": args.images,
            "extract": {"one": ex1, "one_rank_share": ex1r, "ranks": exn,
                        "speedup_loop": round(exn["loop_items_per_s"] / ex1["loop_items_per_s"], 2),
                        "efficiency": round(exn["loop_items_per_s"] / (args.nproc * ex1r["loop_items_per_s"]), 2),
                        "speedup_wall": round(exn["wall_items_per_s"] / ex1["wall_items_per_s"], 2)},
            "train": {"one": tr1, "one_rank_share": tr1r, "ranks": trn,
                      "speedup": round(trn["images_per_s"] / tr1["images_per_s"], 2),
                      "efficiency": round(trn["images_per_s"] / (args.nproc * tr1r["images_per_s"]), 2),
                      "speedup_wall": round(trn["wall_images_per_s"] / tr1["wall_images_per_s"], 2)},
        }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
