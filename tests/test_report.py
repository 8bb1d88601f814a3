"""`defeat-cache report`: runs read back from their folders (two real tiny runs, plain and
distilled from a cache, plus copies of them with other seeds and known metrics), grouping over
seeds with mean ± sd, CSV and Markdown tables, the figures' lines, resumed and incomplete runs."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib import pyplot as plt
from PIL import Image

from builders import tiny_train_options, write_json
from defeat_cache.cli import main
from defeat_cache.distill.presets import load_preset
from defeat_cache.engine.metrics import COCO_METRIC_NAMES
from defeat_cache.errors import UserError
from defeat_cache.report import plots, read_runs, write_report
from defeat_cache.report.runs import history
from defeat_cache.report.tables import group_runs

ITERS = 4


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, tiny_student_toml, tiny_shapes, tiny_cache) -> dict[str, Path]:
    """Two real 4-iteration runs of the tiny student: plain with --eval-every 1 (one evaluation line,
    after the last iteration), and DeFeat from the fp32 tiny cache with a --set override."""
    from defeat_cache.engine.train import train

    base = tmp_path_factory.mktemp("report_runs")
    preset = load_preset("defeat", [f"teacher.proposals={tiny_cache.proposals}",
                                    f"teacher.pre_nms_top_n={tiny_cache.pre_nms_top_n}", "neck.alpha_bg=8"])
    train(tiny_train_options(tiny_student_toml, tiny_shapes, base / "plain", max_iters=ITERS, eval_every=1))
    train(tiny_train_options(tiny_student_toml, tiny_shapes, base / "defeat", max_iters=ITERS, distill=preset,
                             cache=tiny_cache("fp32")))
    return {"plain": base / "plain", "defeat": base / "defeat"}


def _metrics(ap: float, **others) -> dict:
    """An eval.json: AP as given, the others derived from it, APL and ARL undefined (null)."""
    m = {k: round(ap * (1 + i / 20), 6) for i, k in enumerate(COCO_METRIC_NAMES)}
    m.update(APL=None, ARL=None, eval_seconds=1.0, **others)
    return m


def _copy_run(src: Path, dst: Path, seed: int, eval_ap: float | None, keep_evals: bool = True,
              **option_changes) -> Path:
    """A run folder like `src` (its config.json and metrics.jsonl, without evaluation lines unless
    `keep_evals`), with another seed and an eval.json."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["options"].update(seed=seed, out=str(dst), **option_changes)
    write_json(dst / "config.json", config)
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(t for t in lines if keep_evals or '"eval"' not in t))
    if eval_ap is not None:
        write_json(dst / "eval.json", _metrics(eval_ap))
    return dst


def _sweep(tmp_path: Path, real_runs) -> list[str]:
    """plain seeds 0, 1, 2 (AP 0.10, 0.12, 0.17), DeFeat seeds 0, 1 (0.20, 0.25), and a plain run
    with another lr (its own group)."""
    plain, defeat = real_runs["plain"], real_runs["defeat"]
    runs = [_copy_run(plain, tmp_path / "plain" / f"seed{s}", s, ap) for s, ap in ((0, 0.10), (1, 0.12), (2, 0.17))]
    runs += [_copy_run(defeat, tmp_path / "defeat" / f"seed{s}", s, ap) for s, ap in ((0, 0.20), (1, 0.25))]
    runs.append(_copy_run(plain, tmp_path / "plain_lr" / "seed0", 0, 0.05, lr=0.5))
    return [str(r) for r in runs]


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_report_tables_group_seeds_with_mean_and_sd(tmp_path, real_runs, tiny_cache):
    r = CliRunner().invoke(main, ["report", *_sweep(tmp_path, real_runs), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    written = {k: tmp_path / "report" / name for k, name in (
        ("losses", "losses.png"), ("markdown", "report.md"), ("runs_csv", "runs.csv"), ("groups_csv", "groups.csv"),
        ("json", "report.json"))}
    # the plain runs' evaluation lines (--eval-every) give the AP figure
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        [p.name for p in written.values()] + ["ap_epoch.png"])
    assert r.stdout.startswith(written["markdown"].read_text())  # printed, then the files' list

    runs = _csv(written["runs_csv"])
    assert [r["run"] for r in runs] == ["plain/seed0", "plain/seed1", "plain/seed2", "plain_lr/seed0",
                                        "defeat/seed0", "defeat/seed1"]
    by_name = {r["run"]: r for r in runs}
    assert float(by_name["plain/seed2"]["AP"]) == pytest.approx(17.0)
    assert by_name["plain/seed2"]["APL"] == "" and by_name["plain/seed2"]["seed"] == "2"
    assert all(r["iterations"] == str(ITERS) and float(r["train_seconds"]) > 0 for r in runs)
    d = by_name["defeat/seed1"]
    assert (d["student"], d["teacher"], d["preset"], d["codec"]) == ("tiny_student", "tiny_frcnn", "defeat", "fp32")
    assert d["overrides"].split() == ["teacher.proposals=20", "teacher.pre_nms_top_n=50", "neck.alpha_bg=8"]
    assert by_name["plain/seed0"]["teacher"] == "" and by_name["plain/seed0"]["preset"] == "plain"

    groups = _csv(written["groups_csv"])
    assert [(g["preset"], g["runs"], g["seeds"]) for g in groups] == [
        ("plain", "3", "0 1 2"), ("plain", "1", "0"), ("defeat", "2", "0 1")]
    plain_group, lr_group, defeat_group = groups
    assert float(plain_group["AP_mean"]) == pytest.approx(100 * statistics.mean([0.10, 0.12, 0.17]), abs=1e-3)
    assert float(plain_group["AP_sd"]) == pytest.approx(100 * statistics.stdev([0.10, 0.12, 0.17]), abs=1e-3)
    ap50 = [0.10 * 1.05, 0.12 * 1.05, 0.17 * 1.05]
    assert float(plain_group["AP50_mean"]) == pytest.approx(100 * statistics.mean(ap50), abs=1e-3)
    assert float(defeat_group["AP_mean"]) == pytest.approx(22.5, abs=1e-3)
    assert float(defeat_group["AP_sd"]) == pytest.approx(100 * statistics.stdev([0.20, 0.25]), abs=1e-3)
    assert lr_group["AP_sd"] == "" and float(lr_group["AP_mean"]) == pytest.approx(5.0)  # one run: no sd
    # what tells the two plain groups apart is said: the lr (the DeFeat group differs in its own columns)
    assert [g["other_settings"] for g in groups] == ["lr=default", "lr=0.5", "lr=default"]
    assert by_name["plain_lr/seed0"]["other_settings"] == "lr=0.5"
    assert plain_group["APL_mean"] == "" and plain_group["APL_sd"] == ""

    md = written["markdown"].read_text()
    mean, sd = 100 * statistics.mean([0.10, 0.12, 0.17]), 100 * statistics.stdev([0.10, 0.12, 0.17])
    plain_row = next(line for line in md.splitlines() if line.startswith("| tiny_student | - | plain |")
                     and "| 3 |" in line)
    assert f"| {mean:.2f} ± {sd:.2f} |" in plain_row and "| n/a |" in plain_row  # APL
    assert "neck.alpha_bg=8" in md and "-100" not in md and "-1.00" not in md
    assert "![losses](losses.png)" in md
    with Image.open(written["losses"]) as im:  # a real image, not an empty canvas
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 600
        assert len(im.convert("RGB").resize((64, 64)).getcolors(4096)) > 20

    report = json.loads(written["json"].read_text())
    assert report["groups"][0]["metrics"]["AP"]["mean"] == pytest.approx(statistics.mean([0.10, 0.12, 0.17]))


def test_loss_figure_has_one_line_per_run_and_term(tmp_path, real_runs):
    runs = read_runs(_sweep(tmp_path, real_runs))
    fig = plots.loss_figure(runs)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    plain_terms = {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    kd_terms = set(panels) - plain_terms - {"lr"}
    assert plain_terms < set(panels) and "lr" in panels and kd_terms  # the KD terms by name
    assert all(t.startswith("loss_") for t in kd_terms)
    for title, ax in panels.items():
        expected = 2 if title in kd_terms else len(runs)  # KD terms: the two DeFeat runs only
        assert len(ax.get_lines()) == expected, title
        assert ax.get_xlabel() == "iteration" and ax.get_ylabel() in ("loss", "learning rate")
        assert all(len(line.get_xdata()) == ITERS for line in ax.get_lines())
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
    assert [t.get_text() for t in legend.get_texts()] == [r.name for r in runs]
    colours = {line.get_label(): line.get_color() for ax in panels.values() for line in ax.get_lines()}
    assert len(set(colours.values())) == len(runs)  # one colour per run, the same in every panel
    plt.close(fig)


def test_a_real_run_with_eval_every_is_read_back(real_runs, tiny_shapes):
    """What `train --eval-every` writes, without an eval.json: the evaluation line is the run's AP."""
    from defeat_cache.data.dataset import load_dataset

    plain, defeat = read_runs([str(real_runs["plain"]), str(real_runs["defeat"])])
    assert plain.metrics_from == "metrics.jsonl" and set(COCO_METRIC_NAMES) <= set(plain.metrics)
    assert all(v is None or 0.0 <= v <= 1.0 for k, v in plain.metrics.items() if k in COCO_METRIC_NAMES)
    per_epoch = len(load_dataset(tiny_shapes, "train").records) // 2  # one view per image and epoch, batches of 2
    assert [e["iter"] for e in plain.evals] == [ITERS] and plain.best_epoch == pytest.approx(ITERS / per_epoch, abs=1e-3)
    assert plain.iterations == ITERS == plain.total_iters and plain.segments == 1 and plain.train_seconds > 0
    assert [line["iter"] for line in plain.log] == list(range(1, ITERS + 1))  # the eval line is not a loss line
    assert defeat.metrics is None and defeat.evals == [] and any("not evaluated" in n for n in defeat.notes)


def _line(it: int, time: float, loss: float, epoch: int = 0) -> dict:
    return {"loss_classifier": loss / 2, "loss": loss, "iter": it, "epoch": epoch, "lr": 0.01, "time": time}


def test_history_of_resumed_restarted_and_evaluated_runs():
    # resumed from iteration 4 after lines up to 6 were written; the clock restarted at 0
    lines = [_line(i, float(i), 1.0) for i in range(1, 7)] + [_line(5, 0.5, 2.0), _line(6, 1.5, 2.0)]
    train, evals, segments = history(lines)
    assert [t["iter"] for t in train] == [1, 2, 3, 4, 5, 6] and segments == 2
    assert [t["loss"] for t in train][-2:] == [2.0, 2.0]  # the resumed segment's lines replace the old ones
    assert train[-1]["time"] == pytest.approx(4 + 1.5)  # cumulative: 4 s before the resume + 1.5 s after
    # the same with a clock that is already cumulative across resumes: nothing added
    lines = [_line(i, float(i), 1.0) for i in range(1, 7)] + [_line(5, 4.5, 2.0), _line(6, 5.5, 2.0)]
    assert history(lines)[0][-1]["time"] == pytest.approx(5.5)
    # an old run re-started from scratch into the same folder: only the new run counts
    lines = [_line(i, float(i), 1.0) for i in range(1, 7)] + [_line(1, 0.1, 3.0), _line(2, 0.2, 3.0)]
    train, _, segments = history(lines)
    assert [(t["iter"], t["loss"], t["time"]) for t in train] == [(1, 3.0, 0.1), (2, 3.0, 0.2)]
    # evaluation lines at the end of epochs, one of them superseded by the resume
    lines = [_line(2, 2.0, 1.0), {"iter": 2, "epoch": 1, "eval": {"AP": 0.1}}, _line(4, 4.0, 1.0, 1),
             {"iter": 4, "epoch": 2, "eval": {"AP": 0.3}}, _line(3, 0.5, 1.0, 1), _line(4, 1.5, 1.0, 1),
             {"iter": 4, "epoch": 2, "eval": {"AP": 0.2}}]
    train, evals, segments = history(lines)
    assert [(e["epoch"], e["eval"]["AP"]) for e in evals] == [(1, 0.1), (2, 0.2)] and segments == 2
    assert [t["iter"] for t in train] == [2, 3, 4] and train[-1]["time"] == pytest.approx(3.5)


def test_report_with_eval_lines_draws_ap_per_epoch(tmp_path, real_runs):
    runs = []
    for seed, aps in ((0, [0.05, 0.15, 0.12]), (1, [0.04, 0.10, 0.18])):
        run = _copy_run(real_runs["plain"], tmp_path / f"seed{seed}", seed, None, keep_evals=False)
        with (run / "metrics.jsonl").open("a") as f:
            for epoch, ap in enumerate(aps, start=1):
                # an evaluation line as `train --eval-every` writes it (engine.run_log): epoch 0-based
                f.write(json.dumps({"iter": ITERS * epoch, "epoch": epoch - 1, "epochs_done": float(epoch),
                                    "time": 1.0, "eval_seconds": 0.5, "eval": _metrics(ap)}) + "\n")
        runs.append(str(run))
    no_eval = _copy_run(real_runs["plain"], tmp_path / "noeval", 2, None, keep_evals=False)
    written = write_report([*runs, str(no_eval)], tmp_path / "report")
    assert "ap_epoch" in written
    got = read_runs([*runs, str(no_eval)])
    assert [r.best_epoch for r in got] == [2, 3, None]
    assert got[0].metrics["AP"] == pytest.approx(0.12) and got[0].metrics_from == "metrics.jsonl"
    assert "noeval: not evaluated" in written["markdown"].read_text()
    fig = plots.ap_figure(got)
    (ax,) = fig.axes
    plt.close(fig)
    assert [line.get_label() for line in ax.get_lines()] == ["seed0", "seed1"]  # the run without evals: no line
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([4.0, 10.0, 18.0])
    assert ax.get_xlabel() == "epochs trained" and "AP" in ax.get_ylabel()
    assert list(ax.get_lines()[0].get_xdata()) == [1.0, 2.0, 3.0]
    with Image.open(written["ap_epoch"]) as im:
        assert im.format == "PNG"


def test_report_refusals_and_skips(tmp_path, real_runs, capsys):
    r = CliRunner().invoke(main, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 1 and "missing: no such run folder" in r.output and "Traceback" not in r.output
    (tmp_path / "not_a_run").mkdir()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 1 and "none of the folders given holds a training run" in r.output

    run = _copy_run(real_runs["plain"], tmp_path / "run", 0, 0.1)
    (tmp_path / "run_link").symlink_to(run)
    capsys.readouterr()
    got = read_runs([f"mine={run}", str(tmp_path / "run_link"), str(tmp_path / "not_a_run")])
    assert [r.name for r in got] == ["mine"]
    messages = capsys.readouterr().err
    assert "run_link: the same run folder as" in messages and "counted once" in messages
    assert "skipping" in messages and "not_a_run: no config.json" in messages

    # a sweep's parent folder stands for the runs in it (not_a_run and files in it are no runs)
    _copy_run(real_runs["plain"], tmp_path / "sweep" / "b", 1, 0.2)
    _copy_run(real_runs["plain"], tmp_path / "sweep" / "a", 0, 0.1)
    (tmp_path / "sweep" / "not_a_run").mkdir()
    (tmp_path / "sweep" / "notes.txt").write_text("x")
    assert [(r.name, r.seed) for r in read_runs([str(tmp_path / "sweep")])] == [("a", 0), ("b", 1)]
    assert "reading the 2 run folders in it" in capsys.readouterr().err

    (run / "metrics.jsonl").write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "loss"\n{"iter": 3, "loss": 1.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_runs([str(run)])
    (run / "metrics.jsonl").write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "lo')  # killed mid-write
    assert read_runs([str(run)])[0].iterations == 1
    (run / "metrics.jsonl").unlink()
    (got,) = read_runs([str(run)])
    assert got.iterations is None and got.metrics["AP"] == pytest.approx(0.1) and group_runs([got])
    assert any("no metrics.jsonl" in n for n in got.notes)
    assert plots.loss_figure([got]) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write_report([str(run)], tmp_path / "file")
