"""OUT/steps.jsonl of pipeline/gpu_check.sh -> OUT/summary.md: the machine and versions, one row
per step (ok, seconds, its main figures), and the timing tables docs/benchmarks.md takes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gpu_check import STEPS


def load_steps(out: Path) -> dict[str, dict]:
    """The last line of each step in OUT/steps.jsonl (a re-run step replaces its earlier line)."""
    path = out / "steps.jsonl"
    steps: dict[str, dict] = {}
    if path.is_file():
        for text in path.read_text().splitlines():
            if text.strip():
                line = json.loads(text)
                steps[line["step"]] = line
    return steps


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _brief(line: dict) -> str:
    """The figures of one step that fit a table cell."""
    name = line["step"]
    if line.get("error"):
        return f"error: {line['error']}"
    fails = "; FAILED: " + "; ".join(line["failures"]) if line.get("failures") else ""
    if name == "install":
        return (line.get("how") or "") + fails
    if name == "env":
        return f"{line.get('gpu') or 'no GPU'}, torch {line.get('torch')}, AMP {line.get('amp_dtype')}" + fails
    if name == "faithfulness":
        b = line["bounds"]
        return (f"fp32: loss {_g(line['fp32']['loss_rel_max'])} (<= {b['fp32']['loss']:g}), grad "
                f"{_g(line['fp32']['grad_rel_max'])} (<= {b['fp32']['grad']:g}); AMP {line['amp_dtype']}: loss "
                f"{_g(line['amp']['loss_rel_max'])} (<= {b['amp']['loss']:g}), grad {_g(line['amp']['grad_rel_max'])} "
                f"(<= {b['amp']['grad']:g})" + fails)
    if name == "extract_device":
        b = line["bounds"]
        return (f"features rel L2 {_g(line['features_rel_l2_max'])} (<= {b['features_rel_l2']:g}), GT logits "
                f"{_g(line['gt_logits_rel_l2_max'])} (<= {b['gt_logits_rel_l2']:g}), proposals matched "
                f"{_g(line['proposals_matched_mean'])} (>= {b['proposals_matched']:g})" + fails)
    if name == "sampling":
        return f"generators on {line.get('generator_device')}: alone == in batch == reordered, repeatable" + fails
    if name == "codecs":
        return ", ".join(f"{c} {_g(line[c]['max_rel_diff'])} (<= {b:g})" for c, b in line["bounds"].items()
                         if c in line) + fails
    if name == "torchrun":
        t, s = line.get("train", {}), line.get("sync_bn", {})
        sync = (f"--sync-bn {s.get('iterations')} steps ({s.get('sync_bn_layers')} SyncBatchNorm layers)"
                if "iterations" in s else f"--sync-bn refused: {s.get('error', '')[:60]}")
        return (f"{line.get('backend')}, world {line.get('world_size')}: extract {line.get('extract', {}).get('items')} "
                f"items, train {t.get('iterations')} steps (AMP {t.get('amp')}), {sync}" + fails)
    if name == "time_extract":
        return (f"{line['teacher']} {line['items']} items: bare {_g(line['bare_forward']['items_per_s'])} items/s, "
                f"extract fp16 x{_g(line['extract_fp16']['overhead_vs_bare'])}, compact "
                f"x{_g(line['extract_compact']['overhead_vs_bare'])}" + fails)
    if name == "time_train":
        r = line["ratios"]
        return (f"cache/online {_g(r['cache_vs_online'])}, cache/plain {_g(r['cache_vs_plain'])}, "
                f"cache/in-memory {_g(r['cache_vs_in_memory'])}" + fails)
    return fails


def _machine(env: dict | None) -> str:
    if not env:
        return "machine: unknown (the env step did not run)"
    gpu = (f"{env['gpu']} ({env.get('gpu_memory_GiB')} GiB, compute capability {env.get('capability')}, driver "
           f"{env.get('driver')}), " if env.get("gpu") else "no GPU, ")
    return (f"{gpu}{env.get('cpu_count')} CPUs ({env.get('machine')}); Python {env.get('python')}, torch "
            f"{env.get('torch')}, torchvision {env.get('torchvision')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}"
            + (f", NCCL {env['nccl']}" if env.get("nccl") else "")
            + f", zarr {env.get('zarr')}, numcodecs {env.get('numcodecs')}; AMP dtype {env.get('amp_dtype')}"
            + (f"; TF32: cuDNN {env.get('cudnn_allow_tf32')}, matmul {env.get('matmul_allow_tf32')}" if env.get("gpu") else "")
            + f"; commit {env.get('git_commit')}")


def _extract_table(line: dict) -> list[str]:
    rows = [f"| {line['teacher']} extraction | seconds | items/s | vs bare forward (loop only) | peak GPU MB | cache MB |",
            "|---|---|---|---|---|---|"]
    b = line["bare_forward"]
    rows.append(f"| bare teacher forward | {_g(b['seconds'])} | {_g(b['items_per_s'])} | 1 | {_g(b['peak_gpu_MB'])} | |")
    for codec in ("fp16", "compact"):
        e = line[f"extract_{codec}"]
        rows.append(f"| extract {codec} | {_g(e['seconds'])} | {_g(e['items_per_s'])} | {_g(e['overhead_vs_bare'])} "
                    f"({_g(e['loop_overhead_vs_bare'])}) | {_g(e['peak_gpu_MB'])} | {_g(e['cache_MB'])} |")
    return [f"{line['teacher']} teacher, {line['items']} items (image x view), mean canvas "
            f"{line['canvas_hw_mean'][0]}x{line['canvas_hw_mean'][1]}, batch {line['batch_size']}, "
            f"{line['workers']} workers, {line['proposals']} proposals:", "", *rows]


def _train_table(line: dict) -> list[str]:
    rows = ["| student mode | step s | images/s | peak GPU MB | sample s | loader share | DataLoader-bound |",
            "|---|---|---|---|---|---|---|"]
    loader = line.get("dataloader", {})
    for mode, m in line["modes"].items():
        d = loader.get(mode, {})
        rows.append(f"| {mode} | {_g(m['step_s'])} | {_g(m['images_per_s'])} | {_g(m['peak_gpu_MB'])} | "
                    f"{_g(d.get('sample_s'))} | {_g(d.get('loader_share_of_step'))} | "
                    f"{'yes' if d.get('dataloader_bound') else 'no' if d else '-'} |")
    r = line["ratios"]
    return [f"{line['student']} student from {line['teacher']}, batch {line['batch_size']}, {line['workers']} workers, "
            f"AMP {'on' if line['amp'] else 'off'}, {line['iterations']} iterations ({line['warmup_dropped']} warm-up "
            f"dropped), preset {line['preset']}:", "", *rows, "",
            f"Ratios (step time): cache/online {_g(r['cache_vs_online'])}, cache/plain {_g(r['cache_vs_plain'])}, "
            f"cache/in-memory {_g(r['cache_vs_in_memory'])} (fp16 cache); compact: /online "
            f"{_g(r['compact_vs_online'])}, /plain {_g(r['compact_vs_plain'])}, /in-memory {_g(r['compact_vs_in_memory'])}."]


def write_summary(out: Path) -> str:
    """Writes OUT/summary.md and returns its text."""
    steps = load_steps(out)
    env = steps.get("env")
    order = ["install", *STEPS]
    ran = [steps[s] for s in order if s in steps]
    missing = [s for s in STEPS if s not in steps]
    ok = all(line["ok"] for line in ran) and not missing
    total = sum(line.get("seconds") or 0 for line in ran)
    dry = " (dry run: CPU-scale models, tiny images)" if env and env.get("dry_run") else ""
    lines = [f"### GPU check, {time.strftime('%Y-%m-%d')}: {'all steps ok' if ok else 'NOT all steps ok'}{dry}", "",
             f"Device {env.get('device') if env else '?'}; {_machine(env)}. Steps took {total:.0f} s together.", "",
             "| step | ok | seconds | figures |", "|---|---|---|---|"]
    for line in ran:
        lines.append(f"| {line['step']} | {'yes' if line['ok'] else 'NO'} | {_g(line.get('seconds'))} | "
                     f"{_brief(line).replace('|', '/')} |")
    for s in missing:
        lines.append(f"| {s} | NO | - | did not run |")
    if steps.get("time_extract", {}).get("bare_forward"):
        lines += ["", *_extract_table(steps["time_extract"])]
    if steps.get("time_train", {}).get("ratios"):
        lines += ["", *_train_table(steps["time_train"])]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text
