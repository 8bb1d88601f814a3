"""`write_report`: the runs' tables and figures into one folder.

OUT/report.md   the Markdown report: runs grouped over seeds (mean ± sd), every run, the figures, notes
OUT/runs.csv    one line per run        OUT/groups.csv  one line per group (mean and sd columns)
OUT/report.json both, machine-readable  OUT/losses.png  loss terms and lr against the iteration
OUT/ap_epoch.png AP against the epoch (only when some run has evaluation lines in metrics.jsonl)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from . import plots, tables
from .runs import Run, read_runs

LOSS_PNG, AP_PNG = "losses.png", "ap_epoch.png"


def report_markdown(runs: list[Run], figures: list[str]) -> str:
    groups = tables.group_runs(runs)
    evaluated = [r for r in runs if r.metrics is not None]
    lines = ["# Runs", "",
             f"{len(runs)} runs ({len(evaluated)} evaluated) in {len(groups)} groups. COCO bbox AP x 100 on the "
             "split each run was evaluated on; n/a: not evaluated, or no ground truth of that size.", "",
             "## Over seeds", "",
             "Runs that share everything but the seed (model, data, teacher, cache codec, preset and overrides, "
             "schedule): mean ± sample standard deviation over their runs.", ""]
    lines += tables.groups_markdown(groups)
    lines += ["", "## Every run", ""]
    lines += tables.runs_markdown(runs)
    if figures:
        lines += ["", "## Curves", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    notes = [f"- {r.name}: {note}" for r in runs for note in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def write_report(targets: list[str], out: str | Path) -> dict[str, Path]:
    """Reads the runs of `targets` (RUN_DIR or NAME=RUN_DIR) and writes the report into `out`;
    returns {what: path} of the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    runs = read_runs(targets)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    figures = []
    loss_fig = plots.loss_figure(runs)
    if loss_fig is not None:
        written["losses"] = plots.save(loss_fig, out / LOSS_PNG)
        figures.append(LOSS_PNG)
    ap_fig = plots.ap_figure(runs)
    if ap_fig is not None:
        written["ap_epoch"] = plots.save(ap_fig, out / AP_PNG)
        figures.append(AP_PNG)
    elif (out / AP_PNG).is_file():
        (out / AP_PNG).unlink()  # an older report's figure of runs not in this one
    groups = tables.group_runs(runs)
    files = {"markdown": ("report.md", report_markdown(runs, figures)), "runs_csv": ("runs.csv", tables.runs_csv(runs)),
             "groups_csv": ("groups.csv", tables.groups_csv(groups)),
             "json": ("report.json", json.dumps(tables.report_json(runs), indent=2))}
    for key, (name, text) in files.items():
        (out / name).write_text(text)
        written[key] = out / name
    return written


__all__ = ["AP_PNG", "LOSS_PNG", "report_markdown", "write_report"]
