"""AP per codec over seeds, with each cache's size (see pipeline/codec_seeds.sh).

usage: python pipeline/codec_table.py OUT_DIR STEP [STEP ...]     (compact steps; fp16 is always included)
The runs are read and averaged by `defeat-cache report`'s library (defeat_cache.report); this
script adds what the report does not know: each cache's bytes per view (`defeat-cache inspect
--json`). Rows whose runs are not all finished are listed with the seeds that are.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the defeat_cache package, also without an install
from defeat_cache.engine.metrics import COCO_AP_NAMES  # noqa: E402
from defeat_cache.engine.metrics_text import percent  # noqa: E402
from defeat_cache.report import read_runs  # noqa: E402
from defeat_cache.report.tables import Group  # noqa: E402


def _row(out: Path, runs_dir: str, inspect: str) -> dict | None:
    folders = sorted(str(p.parent) for p in (out / runs_dir).glob("defeat-seed*/eval.json"))
    if not folders:
        return None
    group = Group(read_runs(folders))
    info = json.loads((out / inspect).read_text()) if (out / inspect).is_file() else {}
    kinds = info.get("bytes_per_item_by_kind") or {}
    return {"group": group, "seeds": [str(s) for s in group.seeds],
            "AP": {str(r.seed): 100 * r.metrics["AP"] for r in group.runs},
            "bytes_per_view": info.get("bytes_per_item"),
            "feature_bytes_per_view": kinds.get("features", info.get("feature_bytes_per_item")),
            "roi_bytes_per_view": kinds.get("roi_arrays")}


def _kb(value) -> str:
    return "?" if value is None else f"{value / 1e3:.1f}"


def main(out_dir: str, *steps: str) -> None:
    out = Path(out_dir)
    rows = {"fp16": _row(out, "seeds", "inspect_fp16.json")}
    for step in steps:
        rows[f"compact step {step}"] = _row(out, f"compact{step}", f"inspect_compact{step}.json")
    rows = {k: v for k, v in rows.items() if v}
    fp16_feat = (rows.get("fp16") or {}).get("feature_bytes_per_view")
    lines = ["| cache | features kB/view | fp16 / this (features) | all arrays kB/view | seeds | "
             + " | ".join(COCO_AP_NAMES) + " |", "|---|---|---|---|---|" + "---|" * len(COCO_AP_NAMES)]
    for name, r in rows.items():
        cells = []
        for k in COCO_AP_NAMES:
            mean, sd = r["group"].mean_sd(k)
            cells.append(percent(mean) + ("" if mean is None else f" ± {100 * (sd or 0.0):.2f}"))
        feat = r["feature_bytes_per_view"]
        ratio = f"{fp16_feat / feat:.1f}x" if fp16_feat and feat else "?"
        lines.append(f"| {name} | {_kb(feat)} | {ratio} | {_kb(r['bytes_per_view'])} | {','.join(r['seeds'])} | "
                     + " | ".join(cells) + " |")
    seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    lines += ["", "| seed | " + " | ".join(f"{n} AP" for n in rows) + " |", "|---|" + "---|" * len(rows)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{r['AP'][s]:.2f}" if s in r["AP"] else "-" for r in rows.values()) + " |")
    summary = {}
    for n, r in rows.items():
        aps = list(r["AP"].values())
        stats = {k: dict(zip(("mean", "sd"), r["group"].mean_sd(k))) for k in COCO_AP_NAMES}
        summary[n] = {"AP_mean": sum(aps) / len(aps), "AP_min": min(aps), "AP_max": max(aps),
                      "AP_spread": max(aps) - min(aps), "metrics": stats,
                      **{k: v for k, v in r.items() if k != "group"}}
    text = "\n".join(lines) + "\n\nCOCO bbox AP x 100 on the val split, mean ± sample stdev over the seeds listed.\n"
    (out / "codecs.json").write_text(json.dumps(summary, indent=2))
    (out / "codecs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
