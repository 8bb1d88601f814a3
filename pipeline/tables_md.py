"""The tables of docs/results.md ("Methods and ablations at CPU scale") from tables.sh's runs.

usage: python pipeline/tables_md.py OUT          (OUT: tables.sh's output folder; writes OUT/report/tables.md)

Reads OUT/report/report.json (`defeat-cache report`, tables.sh's `table` piece) and lays the runs out
as the paper's tables: one row per run name (NAME-seedS folders, seeds pooled), mean ± sample sd of
AP over the seeds, every seed's AP (the spread), the gain over the plain student of the SAME seeds
(a paired difference: each seed's student starts from the same initial weights), the row's AP in the
paper where the paper's number is known, and the training wall time of the fastest seed (the run least
slowed by other jobs on a shared machine). A row whose runs are not all
finished says how many are.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# (title, the seeds every row uses, what the paper's column holds, rows: (run name, label, paper AP or None));
# an ablation row uses seeds 0 1 only, also for the rows it shares with the methods table (plain, DeFeat).
METHOD_SEEDS, ABLATION_SEEDS = (0, 1, 2), (0, 1)
SECTIONS = [
    ("Methods", METHOD_SEEDS, "COCO AP the authors report for their own setting (docs/method.md)", [
        ("plain", "plain student", None),
        ("defeat_cpu", "DeFeat (`defeat_cpu`)", "37.4 -> 40.9"),
        ("fgd", "FGD (`fgd`)", "38.4 -> 42.0 (2x)"),
        ("mgd_cpu", "MGD (`mgd_cpu`)", "38.4 -> 42.1 (2x)"),
        ("pkd_cpu", "PKD (`pkd_cpu`)", "38.4 -> 40.3 (2x)"),
        ("cwd_cpu", "CWD (`cwd_cpu`)", None),
        ("pkd_cls_decoupled_cpu", "PKD neck + DeFeat cls (`pkd_cls_decoupled`, pkd.weight 0.8)", None),
    ]),
    ("Table 1: neck and RoI-classifier parts", ABLATION_SEEDS, "paper Table 1, R152 -> R50 FPN, COCO AP", [
        ("plain", "student", "37.4"),
        ("neck_all_cpu", "all-neck (`neck_all`)", "40.1"),
        ("neck_decoupled_cpu", "decoupled-neck (`neck_decoupled`)", "40.4"),
        ("neck_decoupled_cls_all_cpu", "+ all-cls (`neck_decoupled_cls_all`)", "40.5"),
        ("defeat_cpu", "+ decoupled-cls (`defeat_cpu`)", "40.8"),
        ("defeat_backbone_cpu", "+ backbone (`defeat_backbone`)", "40.9"),
    ]),
    ("Imitation masks, object region only (Table 4)", ABLATION_SEEDS, "", [
        ("neck_obj_cpu", "GT-Mask (`neck_obj`)", None),
        ("mask_fgfi_obj_cpu", "FG-Mask, FGFI (`mask_fgfi_obj`)", None),
        ("mask_gaussian_obj_cpu", "Gaussian-Mask, TADF (`mask_gaussian_obj`)", None),
        ("mask_random_obj_cpu", "Random-Mask (`mask_random_obj`)", None),
    ]),
    ("Object-only against background-only neck imitation", ABLATION_SEEDS, "paper Table 1, COCO AP", [
        ("neck_obj_cpu", "object only (`neck_obj`)", None),
        ("neck_bg_cpu", "background only (`neck_bg`)", None),
        ("neck_decoupled_cpu", "both, decoupled (`neck_decoupled`)", "40.4"),
    ]),
    ("RoI-classifier KD alone (Table 5)", ABLATION_SEEDS, "", [
        ("cls_pos", "decoupled form, positives only (`cls_pos`)", None),
        ("cls_neg", "decoupled form, negatives only (`cls_neg`)", None),
        ("cls_decoupled", "decoupled form, both (`cls_decoupled`)", None),
        ("cls_all", "all-cls form, every sampled RoI (`cls_all`)", None),
        ("cls_all_pos", "all-cls form, positives only (`cls_all_pos`)", None),
        ("cls_all_neg", "all-cls form, negatives only (`cls_all_neg`)", None),
        ("cls_all_subneg", "all-cls form, positives + as many negatives (`cls_all_subneg`)", None),
    ]),
    ("Where the KD RoIs come from (Table 6)", ABLATION_SEEDS, "", [
        ("cls_decoupled", "teacher's proposals (`cls_decoupled`)", None),
        ("cls_student_rois", "student's proposals, teacher head alone (`cls_student_rois`)", None),
    ]),
]


def _runs(report: dict) -> dict[str, dict[int, dict]]:
    """run name -> seed -> the report's record, for every NAME-seedS run."""
    by_name: dict[str, dict[int, dict]] = defaultdict(dict)
    for run in report["runs"]:
        name, sep, seed = run["name"].rpartition("-seed")
        if sep and seed.isdigit():
            by_name[name][int(seed)] = run
    return by_name


def _ap(run: dict) -> float | None:
    ap = (run.get("metrics") or {}).get("AP")
    finished = run.get("iterations") == run.get("total_iters")
    return None if ap is None or not finished else 100 * ap


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _table_row(cells: list[str], paper: str | None, with_paper: bool) -> str:
    """One Markdown row; the paper's cell goes before the last (time) cell, in sections that have it."""
    if with_paper:
        cells = [*cells[:-1], paper or "", cells[-1]]
    return "| " + " | ".join(cells) + " |"


def section(title: str, seeds: tuple, paper_header: str, rows: list, by_name: dict) -> list[str]:
    with_paper = any(paper for _, _, paper in rows)  # a column only where the paper's numbers are known
    header = ["row", "AP", "AP per seed", "gain over plain (same seeds)", "train time (fastest seed)"]
    lines = [f"### {title} (seeds {' '.join(map(str, seeds))})", "",
             _table_row(header, paper_header, with_paper),
             _table_row(["---"] * len(header), "---", with_paper).replace(" ", "")]
    plain = {s: _ap(r) for s, r in by_name.get("plain", {}).items() if s in seeds}
    for name, label, paper in rows:
        runs = {s: r for s, r in by_name.get(name, {}).items() if s in seeds}
        aps = {s: _ap(r) for s, r in sorted(runs.items())}
        done = {s: a for s, a in aps.items() if a is not None}
        if not done:
            lines.append(_table_row([label, "not run yet", "", "", ""], paper, with_paper))
            continue
        per_seed = ", ".join(f"{done[s]:.2f}" for s in done)
        pairs = [done[s] - plain[s] for s in done if plain.get(s) is not None]
        gain = "" if name == "plain" or not pairs else (
            f"{statistics.mean(pairs):+.2f} (min {min(pairs):+.2f})" if len(pairs) > 1 else f"{pairs[0]:+.2f}")
        minutes = min(runs[s]["train_seconds"] for s in done) / 60  # the run least slowed by other jobs
        unfinished = "" if len(done) == len(aps) else f" ({len(done)} of {len(aps)} runs finished)"
        lines.append(_table_row([f"{label}{unfinished}", _mean_sd(list(done.values())), per_seed, gain,
                                 f"{minutes:.1f} min"], paper, with_paper))
    return lines + [""]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    report_dir = Path(argv[0]) / "report"
    source = report_dir / "report.json"
    if not source.is_file():
        print(f"Error: {source} not found; run `bash pipeline/tables.sh {argv[0]} table` first", file=sys.stderr)
        return 1
    by_name = _runs(json.loads(source.read_text()))
    lines = []
    for title, seeds, paper_header, rows in SECTIONS:
        lines += section(title, seeds, paper_header, rows, by_name)
    (report_dir / "tables.md").write_text("\n".join(lines))
    print(f"wrote {report_dir / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
