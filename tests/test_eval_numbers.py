"""`defeat-cache eval`'s output: all twelve COCO numbers by name, `n/a` (JSON null) for empty area
ranges, and the per-class AP table of `--classwise`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from defeat_cache.cli import main
from defeat_cache.engine.metrics import COCO_METRIC_NAMES


def _renumbered_without(data_toml: Path, out: Path, dropped: str) -> tuple[Path, dict]:
    """A copy of a shapes dataset whose category ids are 10, 20, ... (non-contiguous) and whose
    val split has no box of class `dropped`; returns (data.toml, {name: new id})."""
    src = data_toml.parent
    shutil.copytree(src / "annotations", out / "annotations")
    (out / "images").symlink_to(src / "images")
    shutil.copy(data_toml, out / "data.toml")
    ids = {}
    for split in ("train", "val"):
        path = out / "annotations" / f"{split}.json"
        coco = json.loads(path.read_text())
        new_id = {c["id"]: 10 * (i + 1) for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        ids = {c["name"]: new_id[c["id"]] for c in coco["categories"]}
        for c in coco["categories"]:
            c["id"] = new_id[c["id"]]
        for a in coco["annotations"]:
            a["category_id"] = new_id[a["category_id"]]
        if split == "val":
            coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != ids[dropped]]
        path.write_text(json.dumps(coco))
    return out / "data.toml", ids


def test_eval_classwise_table_and_json_with_a_class_without_ground_truth(tmp_path, tiny_shapes,
                                                                         tiny_trained_checkpoint):
    data, ids = _renumbered_without(Path(tiny_shapes), tmp_path / "data", dropped="ring")
    out_json = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(tiny_trained_checkpoint), "--data", str(data),
                                  "--workers", "0", "--batch-size", "3", "--classwise", "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    written = json.loads(out_json.read_text())
    # the twelve numbers by name, fractions or null, never pycocotools' -1
    assert set(COCO_METRIC_NAMES) <= set(written)
    assert all(written[k] is None or 0.0 <= written[k] <= 1.0 for k in COCO_METRIC_NAMES)
    per_class = written["per_class"]
    assert [c["category_id"] for c in per_class] == sorted(ids.values())
    assert {c["name"]: c["category_id"] for c in per_class} == ids
    ap = {c["name"]: c["AP"] for c in per_class}
    assert ap["ring"] is None and all(v is not None for k, v in ap.items() if k != "ring")

    text = r.stdout
    assert "-1" not in text and "-100" not in text
    summary = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("  A")}
    assert list(summary) == list(COCO_METRIC_NAMES)
    for name in COCO_METRIC_NAMES:  # the printed numbers are the written ones, x 100
        expected = "n/a" if written[name] is None else f"{100 * written[name]:.2f}"
        assert summary[name] == expected, name
    rows = {}
    for line in text.split("per-class AP")[1].splitlines()[2:]:
        cells = line.split()
        if len(cells) == 3 and cells[0].isdigit():
            rows[cells[1]] = cells
    assert rows["ring"] == [str(ids["ring"]), "ring", "n/a"]
    assert rows["circle"] == [str(ids["circle"]), "circle", f"{100 * ap['circle']:.2f}"]
    assert len(rows) == len(ids)


def test_eval_refuses_impossible_loader_options_in_one_line(tiny_trained_checkpoint, tiny_shapes):
    """--batch-size 0 and --workers -1 were DataLoader tracebacks; now one line, before the checkpoint loads."""
    for option, value, said in (("--batch-size", "0", "--batch-size 0: must be at least 1"),
                                ("--workers", "-1", "--workers -1: must be 0 or more")):
        res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tiny_trained_checkpoint), "--data",
                                        str(tiny_shapes), "--model", "unused-model-name", option, value])
        assert res.exit_code == 1 and said in res.output and "Traceback" not in res.output, res.output
