#!/usr/bin/env python
"""Benchmark of stage 2: student step time with no teacher, the cache, or an online teacher.

On the synthetic shapes dataset, CPU-scale pair r18_fpn_cpu (teacher) -> r18q_fpn_cpu (student),
same student, data, seed and batch in three modes:

  plain   TrainOptions without distillation
  cache   distill = the "defeat" preset, cache = a cache extracted first from the same teacher
          weights (extraction time reported but NOT counted), read and decoded per step
  in_memory  the same, but the whole cache read and decoded into RAM before training
          (TrainOptions.cache_in_memory): the KD compute without cache I/O and decoding, so
          cache / in_memory measures what reading the cache costs a step
  online  distill = the same preset, teacher = r18_fpn_cpu in memory (teacher.proposals and
          teacher.pre_nms_top_n set to the extraction's values)

Each mode runs ``train()`` (max_iters, log_every=1) in its OWN subprocess, so ``peak_rss_MB``
(ru_maxrss of that process at its end) is per mode; the modes are interleaved over --rounds
rounds (the order rotates each round) so slow drifts of a shared machine hit all modes alike.
Step time = median of the per-iteration deltas of the ``time`` field of RUN/metrics.jsonl,
after dropping the first --warmup iterations, pooled over rounds.

It also times the paper-scale models (r152_fpn teacher forward, r50_fpn forward and one
r50_fpn training step, ONE image at 800x1216, random weights, CPU) to estimate
cache_vs_online at paper scale as student_step / (student_step + teacher_forward).

Progress goes to stderr; the LAST stdout line is one JSON object (also written to --json).
usage: python pipeline/bench_train.py [--images 96] [--max-iters 35] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_common_args, command_line, emit, loadavg, log, make_dataset,  # noqa: E402
                          resolve_teacher_checkpoint, work_folder)

MODES = ("plain", "cache", "in_memory", "online")
PAPER_CANVAS = (800, 1216)


def _preset(args):
    from defeat_cache.distill.presets import load_preset
    return load_preset(args.preset, [f"teacher.proposals={args.proposals}",
                                     f"teacher.pre_nms_top_n={args.pre_nms_top_n}"])


def _maxrss_mb(who) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: KiB


def _peak_rss_mb() -> float:
    """This process's peak RSS.  Linux keeps ru_maxrss across execve, so a child started by a
    big parent reports at least the parent's peak; VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return _maxrss_mb(resource.RUSAGE_SELF)


# --------------------------------------------------------------------------- child: one mode
def run_mode(args) -> dict:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from defeat_cache.engine.train import TrainOptions, train
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    common = dict(student=args.student, data=args.data, out=str(out), max_iters=args.max_iters,
                  batch_size=args.batch_size, seed=args.seed, device=args.device, workers=args.workers,
                  log_every=1, checkpoint_minutes=1e9, progress=True)
    if args.mode == "plain":
        opts = TrainOptions(**common)
    elif args.mode == "cache":
        opts = TrainOptions(**common, distill=_preset(args), cache=args.cache)
    elif args.mode == "in_memory":
        opts = TrainOptions(**common, distill=_preset(args), cache=args.cache, cache_in_memory=True)
    elif args.mode == "online":
        opts = TrainOptions(**common, distill=_preset(args), teacher=args.teacher,
                            teacher_checkpoint=args.teacher_checkpoint)
    else:
        raise SystemExit(f"--mode {args.mode}: not a training mode")
    t0 = time.perf_counter()
    train(opts)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records.sort(key=lambda r: r["iter"])
    deltas = [(b["iter"], b["time"] - a["time"]) for a, b in zip(records, records[1:]) if b["iter"] == a["iter"] + 1]
    kept = [round(d, 3) for it, d in deltas if it > args.warmup]
    res = {
        "mode": args.mode, "iterations": len(records), "warmup_dropped": args.warmup, "deltas_s": kept,
        "median_step_s": statistics.median(kept) if kept else None,
        "first_iter_time_s": records[0]["time"] if records else None,
        "train_wall_s": round(wall, 2),
        "peak_rss_MB": _peak_rss_mb(),
        "ru_maxrss_MB": _maxrss_mb(resource.RUSAGE_SELF),
        "workers_peak_rss_MB": _maxrss_mb(resource.RUSAGE_CHILDREN),
        "torch_threads": torch.get_num_threads(),
        "final_loss": records[-1].get("loss") if records else None,
        "loss_terms": sorted(k for k in records[-1] if k.startswith("loss_")) if records else [],
    }
    return res


# --------------------------------------------------------------------------- child: paper scale
def run_paper(args) -> dict:
    """r152_fpn / r50_fpn on ONE random 800x1216 image, random weights, CPU. Writes partial results
    to --child-json after each measurement, so a parent timeout keeps what finished."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from defeat_cache.models.forward import detector_forward
    from defeat_cache.models.teacher import teacher_outputs
    from defeat_cache.models.zoo import build_detector
    torch.manual_seed(args.seed)
    H, W = PAPER_CANVAS
    x = torch.randn(3, H, W)  # a normalised image; random pixels, the timing hardly depends on content
    boxes = torch.tensor([[100., 120., 400., 500.], [600., 200., 900., 700.], [50., 600., 300., 780.],
                          [700., 50., 1200., 400.], [300., 300., 500., 450.]])
    labels = torch.tensor([1, 5, 12, 40, 80])
    res: dict = {"canvas_hw": [H, W], "num_classes": 81, "threads": torch.get_num_threads(),
                 "repeats": args.paper_repeats, "warmup": args.paper_warmup}

    def save():
        Path(args.child_json).write_text(json.dumps(res))

    def timed(fn) -> float:
        for _ in range(args.paper_warmup):
            fn()
        ts = []
        for _ in range(args.paper_repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return round(min(ts), 3)

    for name in ("r152_fpn", "r50_fpn"):
        model = build_detector(name, 81).eval().requires_grad_(False)
        if name == "r152_fpn":  # what an online teacher computes per image
            log(f"paper scale: {name} teacher forward (teacher_outputs, {args.paper_proposals} proposals)")
            res[f"{name}_teacher_forward_s"] = timed(lambda: teacher_outputs(
                model, [x], [boxes], args.paper_proposals, args.paper_pre_nms_top_n, False))
            save()
        log(f"paper scale: {name} eval forward (model([image]))")
        with torch.no_grad():
            res[f"{name}_eval_forward_s"] = timed(lambda: model([x]))
        save()
        log(f"paper scale: {name} eval forward {res[f'{name}_eval_forward_s']}s")
        if name == "r50_fpn":
            model = build_detector(name, 81).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

            def step():
                out = detector_forward(model, [x], [{"boxes": boxes, "labels": labels}])
                loss = sum(out.losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            log("paper scale: r50_fpn training step (forward + backward + SGD, one image)")
            res["r50_fpn_train_step_s"] = timed(step)
            save()
            log(f"paper scale: r50_fpn training step {res['r50_fpn_train_step_s']}s")
        del model
    res["peak_rss_MB"] = _peak_rss_mb()
    save()
    return res


# --------------------------------------------------------------------------- parent
def _child(args, extra: list[str], json_path: Path, timeout: float | None = None) -> tuple[dict | None, str | None]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--child-json", str(json_path),
           "--seed", str(args.seed), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if json_path.exists():
        json_path.unlink()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=timeout)
        err = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout:.0f}s (partial results kept)"
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    return data, err


def parent(args) -> dict:
    t_all = time.perf_counter()
    import torch
    from defeat_cache.cache.extract import ExtractOptions, extract
    result: dict = {"benchmark": "train", "command": command_line(), "device": args.device,
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                    "loadavg_start": loadavg()}
    with work_folder(args.work, "bench_train_") as work:
        data_toml = make_dataset(work, args.images, args.seed)
        ckpt, kind = resolve_teacher_checkpoint(args.teacher_checkpoint, args.teacher, data_toml, work, args.seed)
        result.update(teacher=args.teacher, student=args.student, teacher_checkpoint=ckpt, teacher_weights=kind,
                      images=args.images, batch_size=args.batch_size, max_iters=args.max_iters,
                      warmup_iters_dropped=args.warmup, workers=args.workers, preset=args.preset,
                      proposals=args.proposals, pre_nms_top_n=args.pre_nms_top_n, codec=args.codec)

        cache = work / f"cache_{args.codec}.zarr"
        if cache.exists():
            shutil.rmtree(cache)
        log(f"extracting the cache (not counted): {args.teacher} -> {cache}")
        t0 = time.perf_counter()
        extract(ExtractOptions(teacher=args.teacher, checkpoint=ckpt, data=str(data_toml), out=str(cache),
                               views="orig,hflip", codec=args.codec, proposals=args.proposals,
                               pre_nms_top_n=args.pre_nms_top_n, workers=args.workers, device=args.device,
                               compact_step=args.compact_step))
        result["extract_seconds_not_counted"] = round(time.perf_counter() - t0, 1)

        modes = [m for m in args.modes.split(",") if m]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        schedule = []
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            schedule.append(order)
            for m in order:
                log(f"round {r + 1}/{args.rounds}: mode {m} ({args.max_iters} iterations, own process)")
                extra = ["--mode", m, "--data", str(data_toml), "--out", str(work / f"run_{m}_{r}"),
                         "--student", args.student, "--teacher", args.teacher, "--teacher-checkpoint", ckpt,
                         "--cache", str(cache), "--max-iters", str(args.max_iters), "--warmup", str(args.warmup),
                         "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                         "--preset", args.preset, "--proposals", str(args.proposals),
                         "--pre-nms-top-n", str(args.pre_nms_top_n)]
                res, err = _child(args, extra, work / f"child_{m}_{r}.json")
                if err or res is None:
                    raise SystemExit(f"mode {m} round {r + 1} failed: {err or 'no result'}")
                runs[m].append(res)
                log(f"  {m}: median step {res['median_step_s']:.3f}s, peak RSS {res['peak_rss_MB']} MB")
        per_mode = {}
        for m, rs in runs.items():
            pooled = [d for r in rs for d in r["deltas_s"]]
            step = statistics.median(pooled)
            q = statistics.quantiles(pooled, n=4) if len(pooled) >= 4 else [None, None, None]
            per_mode[m] = {
                "step_s": round(step, 4),
                "images_per_s": round(args.batch_size / step, 2),
                "step_s_per_round": [round(r["median_step_s"], 4) for r in rs],
                "step_s_quartiles": [round(v, 4) if v is not None else None for v in q],
                "steps_timed": len(pooled),
                "peak_rss_MB": max(r["peak_rss_MB"] for r in rs),
                "ru_maxrss_MB": max(r["ru_maxrss_MB"] for r in rs),
                "workers_peak_rss_MB": max(r["workers_peak_rss_MB"] for r in rs),
                "train_wall_s_per_round": [r["train_wall_s"] for r in rs],
                "loss_terms": rs[-1]["loss_terms"],
                "final_loss": rs[-1]["final_loss"],
            }
        result["modes"] = per_mode
        result["interleaving"] = {"rounds": args.rounds, "order_per_round": schedule,
                                  "how": "each round runs every mode once, each in a fresh subprocess; the order "
                                         "rotates by one mode per round; step times pool all rounds' deltas"}
        result["peak_rss_method"] = (
            "peak_rss_MB: VmHWM of the mode's own training process at its end (/proc/self/status); "
            "ru_maxrss_MB: getrusage(RUSAGE_SELF).ru_maxrss, which Linux carries across execve, so it is at "
            "least the launching benchmark process's peak; workers_peak_rss_MB: RUSAGE_CHILDREN, the largest "
            "DataLoader worker, pages shared with the main process included")
        result["step_time_method"] = (f"median of metrics.jsonl 'time' deltas (log_every=1, 10 ms resolution) "
                                      f"after dropping iterations 1..{args.warmup}")
        result["targets"] = {"cache_vs_online": "<= 0.75", "cache_vs_plain": "<= 1.10",
                             "cache_vs_in_memory": "<= 1.10"}
        result["meets_targets"] = {}
        if "cache" in per_mode and "online" in per_mode:
            v = per_mode["cache"]["step_s"] / per_mode["online"]["step_s"]
            result["cache_vs_online"] = round(v, 3)
            result["meets_targets"]["cache_vs_online"] = v <= 0.75
        if "cache" in per_mode and "plain" in per_mode:
            v = per_mode["cache"]["step_s"] / per_mode["plain"]["step_s"]
            result["cache_vs_plain"] = round(v, 3)
            result["meets_targets"]["cache_vs_plain"] = v <= 1.10

        if "cache" in per_mode and "in_memory" in per_mode:
            v = per_mode["cache"]["step_s"] / per_mode["in_memory"]["step_s"]
            result["cache_vs_in_memory"] = round(v, 3)
            result["meets_targets"]["cache_vs_in_memory"] = v <= 1.10

        if args.paper:
            log("paper-scale timings (own process)")
            paper, err = _child(args, ["--mode", "paper", "--paper-repeats", str(args.paper_repeats),
                                       "--paper-warmup", str(args.paper_warmup),
                                       "--paper-proposals", str(args.paper_proposals),
                                       "--paper-pre-nms-top-n", str(args.paper_pre_nms_top_n)],
                                work / "child_paper.json", timeout=args.paper_timeout)
            paper = paper or {}
            if err:
                paper["error"] = err
            result["paper_scale"] = paper
            s, t = paper.get("r50_fpn_train_step_s"), paper.get("r152_fpn_teacher_forward_s")
            source = "r50_fpn_train_step_s"
            if s is None and paper.get("r50_fpn_eval_forward_s") is not None:
                s, source = 3.0 * paper["r50_fpn_eval_forward_s"], "3 x r50_fpn_eval_forward_s (train step did not finish)"
            if s is not None and t is not None:
                result["paper_scale_estimate"] = round(s / (s + t), 3)
                paper.update(student_step_s=s, student_step_source=source, teacher_forward_s=t,
                             teacher_forward_source="r152_fpn_teacher_forward_s",
                             formula="cache_vs_online ~ student_step_s / (student_step_s + teacher_forward_s)")
        result["notes"] = notes(result)
    result["loadavg_end"] = loadavg()
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    log(f"done in {result['total_seconds']}s")
    return result


def notes(result: dict) -> str:
    parts = []
    m = result.get("modes", {})
    if {"cache", "in_memory"} <= set(m):
        c, i = m["cache"]["step_s"], m["in_memory"]["step_s"]
        parts.append(f"cache {c:.3f}s vs in-memory teacher outputs {i:.3f}s per step: reading and decoding the "
                     f"{result['codec']} cache costs {c - i:+.3f}s a step ({c / i:.2f}x).")
    if {"plain", "cache", "online"} <= set(m):
        p, c, o = (m[k]["step_s"] for k in ("plain", "cache", "online"))
        parts.append(
            f"CPU scale (batch {result['batch_size']}): plain {p:.3f}s, cache {c:.3f}s, online {o:.3f}s per step. "
            f"cache - plain = {c - p:+.3f}s is the DeFeat loss terms plus reading the cache; "
            f"online - cache = {o - c:+.3f}s is the teacher's forward ({result['teacher']}, "
            f"{result['proposals']} proposals, pre-NMS {result['pre_nms_top_n']}/level), which the cache removes.")
    est = result.get("paper_scale") or {}
    if result.get("paper_scale_estimate") is not None:
        parts.append(
            f"Paper scale (r152_fpn -> r50_fpn, one 800x1216 image, CPU, random weights): student step "
            f"{est['student_step_s']:.2f}s ({est['student_step_source']}), teacher forward "
            f"{est['teacher_forward_s']:.2f}s (teacher_outputs: backbone+FPN, RPN, RoI logits of its proposals "
            f"and the GT). If the online teacher runs serially in the training process (OnlineSource) and the "
            f"cache read is hidden in DataLoader workers, cache/online = student/(student+teacher) = "
            f"{result['paper_scale_estimate']:.2f}. The DeFeat loss terms are left out of the student step "
            f"(they appear in both modes), which makes the estimate slightly optimistic; GPU ratios of "
            f"forward to training-step time are similar but not equal, so treat it as an estimate.")
    if "random" in str(result.get("teacher_weights", "")):
        parts.append("The CPU-scale teacher had random weights: step times do not depend on them much, "
                     "but pass --teacher-checkpoint (or run the quickstart first) for the real setting.")
    return " ".join(parts)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(ap, images=96)
    ap.add_argument("--max-iters", type=int, default=35)
    ap.add_argument("--warmup", type=int, default=5, help="iterations dropped before timing")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all modes")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (train and extract)")
    ap.add_argument("--student", default="r18q_fpn_cpu")
    ap.add_argument("--preset", default="defeat")
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--compact-step", type=float, default=None, help="--codec compact: its step (default 2.0)")
    ap.add_argument("--proposals", type=int, default=300, help="extraction's post-NMS proposals (= online's)")
    ap.add_argument("--pre-nms-top-n", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paper", action=argparse.BooleanOptionalAction, default=True,
                    help="time r152_fpn / r50_fpn at 800x1216 for the paper-scale estimate")
    ap.add_argument("--paper-repeats", type=int, default=1)
    ap.add_argument("--paper-warmup", type=int, default=0)
    ap.add_argument("--paper-proposals", type=int, default=1000)
    ap.add_argument("--paper-pre-nms-top-n", type=int, default=2000)
    ap.add_argument("--paper-timeout", type=float, default=240.0, help="seconds before the paper child is stopped")
    # internal: one mode in its own process
    ap.add_argument("--mode", choices=MODES + ("paper",), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.mode:
        res = run_paper(args) if args.mode == "paper" else run_mode(args)
        Path(args.child_json).write_text(json.dumps(res))
        return res
    result = parent(args)
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
