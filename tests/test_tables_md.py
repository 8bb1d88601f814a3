"""pipeline/tables_md.py: the results tables from a (made-up) `defeat-cache report` of tables.sh's runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def _load_script():
    spec = importlib.util.spec_from_file_location("tables_md_script", PIPELINE / "tables_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables_md = _load_script()


def _run(name: str, seed: int, ap: float | None, iterations: int = 450, seconds: float = 120.0) -> dict:
    return {"name": f"{name}-seed{seed}", "seed": seed, "iterations": iterations, "total_iters": 450,
            "train_seconds": seconds, "metrics": None if ap is None else {"AP": ap / 100}}


def _row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _section(text: str, title: str) -> str:
    return text.split(f"### {title}")[1].split("### ")[0]


def test_tables_pair_each_seed_with_its_plain_student_and_use_each_sections_seeds(tmp_path):
    runs = [_run("plain", 0, 3.0), _run("plain", 1, 2.0), _run("plain", 2, 4.0),
            _run("defeat_cpu", 0, 10.0), _run("defeat_cpu", 1, 12.0), _run("defeat_cpu", 2, 14.0, seconds=300),
            _run("fgd", 0, 7.0), _run("fgd", 1, None, iterations=160),  # still training
            _run("neck_bg_cpu", 1, 6.0)]
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps({"runs": runs, "groups": []}))
    assert tables_md.main([str(tmp_path)]) == 0
    text = (tmp_path / "report" / "tables.md").read_text()

    methods = _section(text, "Methods")
    # mean ± sample sd of 10, 12, 14; gains paired by seed: 7, 10, 10
    assert _row(methods, "DeFeat")[1:4] == ["12.00 ± 2.00", "10.00, 12.00, 14.00", "+9.00 (min +7.00)"]
    assert _row(methods, "DeFeat")[-1] == f"{120 / 60:.1f} min"  # the fastest seed, not the one slowed down
    assert _row(methods, "FGD")[0].endswith("(1 of 2 runs finished)") and _row(methods, "FGD")[1] == "7.00"
    assert _row(methods, "MGD")[1] == "not run yet"

    table1 = _section(text, "Table 1")  # seeds 0 1 only: seed 2 of the shared runs is left out
    assert _row(table1, "+ decoupled-cls")[1:4] == ["11.00 ± 1.41", "10.00, 12.00", "+8.50 (min +7.00)"]
    assert _row(table1, "student")[1] == "2.50 ± 0.71" and _row(table1, "student")[4] == "37.4"

    obj_bg = _section(text, "Object-only against background-only")
    assert _row(obj_bg, "background only")[1:4] == ["6.00", "6.00", "+4.00"]  # one seed: no sd, its own pair

    masks = _section(text, "Imitation masks")  # no paper numbers known: no paper column
    assert masks.splitlines()[2].count("|") == 6


def test_tables_md_without_a_report_says_what_to_run(tmp_path, capsys):
    assert tables_md.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pipeline/tables.sh" in err and "table" in err
