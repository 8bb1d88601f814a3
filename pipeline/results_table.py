"""Collects eval JSONs of a pipeline run into results.json and a Markdown table.

usage: python pipeline/results_table.py OUT_DIR name=RUN_DIR [name=RUN_DIR ...]
Each RUN_DIR holds eval.json (from `defeat-cache eval --json`) and, when it was trained,
config.json/metrics.jsonl (train time is read from the last metrics line).
"""

import json
import sys
from pathlib import Path

COLUMNS = ["AP", "AP50", "AP75", "APS", "APM", "APL"]


def train_seconds(run: Path) -> float | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = metrics.read_text().strip().splitlines()
    return json.loads(lines[-1]).get("time") if lines else None


def main(out_dir: str, *runs: str) -> None:
    out = Path(out_dir)
    rows = []
    for spec in runs:
        name, run = spec.split("=", 1)
        run = Path(run)
        metrics = json.loads((run / "eval.json").read_text())
        row = {"name": name, **{k: None if metrics[k] is None else round(100 * metrics[k], 2) for k in COLUMNS}}
        cfg = run / "config.json"
        if cfg.is_file():
            row["model"] = json.loads(cfg.read_text())["model"]["name"]
        row["train_seconds"] = train_seconds(run)
        rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    head = "| name | model | " + " | ".join(COLUMNS) + " | train time (s) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        t = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {r['name']} | {r.get('model', '')} | " + " | ".join("n/a" if r[k] is None else f"{r[k]:.1f}" for k in COLUMNS) + f" | {t} |")
    table = "\n".join(lines) + "\n\nAP values are COCO bbox AP x 100 on the validation split.\n"
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(*sys.argv[1:])
