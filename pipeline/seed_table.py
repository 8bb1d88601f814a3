"""Mean and spread over seeds of the plain and DeFeat students (see pipeline/seeds.sh).

usage: python pipeline/seed_table.py OUT_DIR SEED [SEED ...]
"""

import json
import statistics
import sys
from pathlib import Path

KEYS = ["AP", "AP50", "AP75", "APS", "APM", "APL"]


def main(out_dir: str, *seeds: str) -> None:
    out = Path(out_dir)
    rows = {}
    for name in ("student", "defeat"):
        runs = [json.loads((out / "seeds" / f"{name}-seed{s}" / "eval.json").read_text()) for s in seeds]
        rows[name] = {k: [100 * r[k] for r in runs] for k in KEYS}
    teacher = out / "teacher" / "eval.json"
    lines = ["| model | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    if teacher.is_file():
        t = json.loads(teacher.read_text())
        lines.append("| teacher r18_fpn_cpu | 0 | " + " | ".join(f"{100 * t[k]:.1f}" for k in KEYS) + " |")
    for name, label in (("student", "plain r18q_fpn_cpu"), ("defeat", "DeFeat r18q_fpn_cpu (cache)")):
        cells = []
        for k in KEYS:
            vals = rows[name][k]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        lines.append(f"| {label} | {','.join(seeds)} | " + " | ".join(cells) + " |")
    per_seed = ["", "| seed | plain AP | DeFeat AP | gain |", "|---|---|---|---|"]
    for i, s in enumerate(seeds):
        p, d = rows["student"]["AP"][i], rows["defeat"]["AP"][i]
        per_seed.append(f"| {s} | {p:.2f} | {d:.2f} | {d - p:+.2f} |")
    gain = [d - p for p, d in zip(rows["student"]["AP"], rows["defeat"]["AP"])]
    summary = {
        "seeds": list(seeds), "runs": rows,
        "AP_mean": {n: statistics.mean(rows[n]["AP"]) for n in rows},
        "AP_spread": {n: max(rows[n]["AP"]) - min(rows[n]["AP"]) for n in rows},
        "AP_stdev": {n: statistics.stdev(rows[n]["AP"]) if len(seeds) > 1 else 0.0 for n in rows},
        "gain_mean": statistics.mean(gain), "gain_min": min(gain),
    }
    text = "\n".join(lines + per_seed) + (
        f"\n\nMean gain {summary['gain_mean']:+.2f} AP (smallest {summary['gain_min']:+.2f}); seed-to-seed "
        f"spread (max - min) of AP: plain {summary['AP_spread']['student']:.2f}, "
        f"DeFeat {summary['AP_spread']['defeat']:.2f}. Values are COCO bbox AP x 100 on the val split, mean ± stdev.\n")
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    (out / "seeds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
