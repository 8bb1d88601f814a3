"""AP per codec over seeds, with each cache's size (see pipeline/codec_seeds.sh).

usage: python pipeline/codec_table.py OUT_DIR STEP [STEP ...]     (compact steps; fp16 is always included)
Rows whose runs are not all finished are listed with the seeds that are.
"""

import json
import statistics
import sys
from pathlib import Path

KEYS = ["AP", "AP50", "AP75", "APS", "APM", "APL"]


def _row(out: Path, runs_dir: str, inspect: str) -> dict | None:
    evals = sorted((out / runs_dir).glob("defeat-seed*/eval.json"))
    if not evals:
        return None
    runs = {p.parent.name.removeprefix("defeat-seed"): json.loads(p.read_text()) for p in evals}
    info = json.loads((out / inspect).read_text()) if (out / inspect).is_file() else {}
    kinds = info.get("bytes_per_item_by_kind") or {}
    feats = kinds.get("features", info.get("feature_bytes_per_item"))
    return {"seeds": sorted(runs), "AP": {s: 100 * r["AP"] for s, r in runs.items()},
            "metrics": {k: [100 * r[k] for r in runs.values()] for k in KEYS},
            "bytes_per_view": info.get("bytes_per_item"), "feature_bytes_per_view": feats,
            "roi_bytes_per_view": kinds.get("roi_arrays")}


def main(out_dir: str, *steps: str) -> None:
    out = Path(out_dir)
    rows = {"fp16": _row(out, "seeds", "inspect_fp16.json")}
    for step in steps:
        rows[f"compact step {step}"] = _row(out, f"compact{step}", f"inspect_compact{step}.json")
    rows = {k: v for k, v in rows.items() if v}
    fp16_feat = (rows.get("fp16") or {}).get("feature_bytes_per_view")
    lines = ["| cache | features kB/view | fp16 / this (features) | all arrays kB/view | seeds | "
             + " | ".join(KEYS) + " |", "|---|---|---|---|---|" + "---|" * len(KEYS)]
    for name, r in rows.items():
        cells = []
        for k in KEYS:
            v = r["metrics"][k]
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}")
        feat = r["feature_bytes_per_view"]
        ratio = f"{fp16_feat / feat:.1f}x" if fp16_feat and feat else "?"
        lines.append(f"| {name} | {feat / 1e3:.1f} | {ratio} | {r['bytes_per_view'] / 1e3:.1f} | {','.join(r['seeds'])} | "
                     + " | ".join(cells) + " |" if feat else f"| {name} | ? | ? | ? | {','.join(r['seeds'])} | " + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    lines += ["", "| seed | " + " | ".join(f"{n} AP" for n in rows) + " |", "|---|" + "---|" * len(rows)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{r['AP'][s]:.2f}" if s in r["AP"] else "-" for r in rows.values()) + " |")
    summary = {n: {"AP_mean": statistics.mean(r["AP"].values()), "AP_min": min(r["AP"].values()),
                   "AP_max": max(r["AP"].values()), "AP_spread": max(r["AP"].values()) - min(r["AP"].values()),
                   **r} for n, r in rows.items()}
    text = "\n".join(lines) + "\n\nCOCO bbox AP x 100 on the val split, mean ± sample stdev over the seeds listed.\n"
    (out / "codecs.json").write_text(json.dumps(summary, indent=2))
    (out / "codecs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
