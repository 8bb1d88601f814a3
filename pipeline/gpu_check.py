#!/usr/bin/env python
"""GPU readiness check: one step of it per call (pipeline/gpu_check.sh runs them all, each under
its own timeout), or the summary of the steps run.

Steps (docs/benchmarks.md#gpu-check):
  env             machine, GPU model, torch / CUDA / cuDNN / NCCL versions
  faithfulness    one DeFeat step from a cache == the step with the teacher online (loss terms
                  and gradients), fp32 and AMP, the cache decoded on the device
  extract_device  extraction on the device == extraction on the CPU, within float tolerance
  sampling        per-image sampling draws on the device do not depend on the batch
  codecs          every lossy codec decodes the same on the device as on the CPU
  torchrun        1-process torchrun (NCCL / gloo): extract, train 2 steps, train 2 steps --sync-bn
  time_extract    r152_fpn extraction at 800x1333: items/s, overhead vs the bare teacher forward
  time_train      r50_fpn steps (AMP): plain, cache fp16 / compact, in-memory, online teacher

Every step prints ONE JSON line {"step", "ok", "seconds", ...figures} to stdout and appends it to
OUT/steps.jsonl; `--summary` turns OUT/steps.jsonl into OUT/summary.md (Markdown tables for
docs/benchmarks.md). `--dry-run` runs the same steps with the CPU-scale models and a few tiny
images (the test suite runs it with --device cpu).

usage: python pipeline/gpu_check.py --step NAME --out OUT --work WORK [--device cuda] [--dry-run]
       python pipeline/gpu_check.py --summary --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = ("env", "faithfulness", "extract_device", "sampling", "codecs", "torchrun", "time_extract", "time_train")


def _step_functions() -> dict:
    import gpu_check_correctness as c
    import gpu_check_timing as t
    return {"env": c.step_env, "faithfulness": c.step_faithfulness, "extract_device": c.step_extract_device,
            "sampling": c.step_sampling, "codecs": c.step_codecs, "torchrun": c.step_torchrun,
            "time_extract": t.step_time_extract, "time_train": t.step_time_train}


def record(out: Path, line: dict) -> None:
    """Print a step's JSON line and append it to OUT/steps.jsonl."""
    text = json.dumps(line)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "steps.jsonl", "a") as f:
        f.write(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_step(name: str, device: str, dry_run: bool, out: Path, work: Path) -> bool:
    t0 = time.perf_counter()
    line: dict = {"step": name, "ok": False, "seconds": None}
    try:
        import torch
        torch.manual_seed(0)
        if dry_run and device == "cpu":  # tiny models on a shared CPU: intra-op threads only contend (as in tests/)
            torch.set_num_threads(1)
        from gpu_check_setup import Setup
        setup = Setup(device, dry_run, work)
        setup.partial_path(name).unlink(missing_ok=True)
        if setup.is_cuda and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
        figures, checks = _step_functions()[name](setup)
        line.update(ok=not checks.failures, **figures)
        if checks.failures:
            line["failures"] = checks.failures
    except Exception as e:  # a broken step is a result too: report it and let the others run
        traceback.print_exc(file=sys.stderr)
        line["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        partial = work / f"partial_{name}.json"  # what a long step measured before it broke
        if partial.is_file():
            line["partial"] = json.loads(partial.read_text())
    line["seconds"] = round(time.perf_counter() - t0, 2)
    # "ok" right after "step": what a reader of the log looks for first
    record(out, {"step": line.pop("step"), "ok": line.pop("ok"), "seconds": line.pop("seconds"), **line})
    return bool(line.get("error") is None and not line.get("failures"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step", choices=STEPS)
    ap.add_argument("--summary", action="store_true", help="write OUT/summary.md from OUT/steps.jsonl and print it")
    ap.add_argument("--list-steps", action="store_true")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes: the CPU-scale models on a few small images")
    ap.add_argument("--out", default="out/gpu_check", help="steps.jsonl and summary.md go here")
    ap.add_argument("--work", default=None, help="data, checkpoints, caches, runs (default OUT/work)")
    ap.add_argument("--torchrun-worker", default=None, metavar="RESULT_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    if args.list_steps:
        print(" ".join(STEPS))
        return 0
    if args.torchrun_worker:
        from gpu_check_correctness import torchrun_worker
        from gpu_check_setup import Setup
        torchrun_worker(Setup(args.device, args.dry_run, work), Path(args.torchrun_worker))
        return 0
    if args.summary:
        from gpu_check_summary import write_summary
        print(write_summary(out))
        return 0
    if not args.step:
        ap.error("give --step NAME, --summary or --list-steps")
    return 0 if run_step(args.step, args.device, args.dry_run, out, work) else 1


if __name__ == "__main__":
    sys.exit(main())
