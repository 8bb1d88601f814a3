"""The report's tables: one row per run, and one per group of runs that share everything but
the seed (`runs.Run.experiment`), with the mean ± sample standard deviation over the group's
runs. Groups are listed by preset (plain training first), then student, teacher and codec; an
"other settings" column names any other option in which they differ (lr=0.5, epochs=24).

COCO numbers are AP x 100 in every table (fractions in eval.json and metrics.jsonl); `n/a`
(Markdown) or an empty cell (CSV) where a number is undefined: no evaluation, or no ground truth
in that area range.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..engine.metrics import COCO_AP_NAMES, COCO_METRIC_NAMES
from ..engine.metrics_text import NOT_AVAILABLE, percent
from .runs import Run


@dataclass
class Group:
    """Runs that differ only in their seed."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def values(self, metric: str) -> list[float]:
        """The group's defined values of `metric` (fractions)."""
        return [r.metrics[metric] for r in self.runs if r.metrics and r.metrics.get(metric) is not None]

    def mean_sd(self, metric: str) -> tuple[float | None, float | None]:
        """(mean, sample sd) of `metric` over the runs that have it; sd None below two runs."""
        values = self.values(metric)
        if not values:
            return None, None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None

    def train_seconds(self) -> float | None:
        times = [r.train_seconds for r in self.runs if r.train_seconds is not None]
        return statistics.mean(times) if times else None


def _order(run: Run) -> tuple:
    return (run.preset is not None, run.preset or "", run.student or "", run.teacher or "", run.codec or "",
            " ".join(run.overrides))


def group_runs(runs: list[Run]) -> list[Group]:
    """The runs grouped by `Run.experiment`, groups in preset order, runs in seed order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)
    ordered = [Group(sorted(g, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0)))
               for g in groups.values()]
    return sorted(ordered, key=lambda g: _order(g.first))


#: Experiment keys the tables show in their own columns.
_SHOWN = {"student", "teacher", "codec", "distill", "total_iters"}


def _short(value) -> str:
    if value is None:
        return "default"  # the option was not given
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    if isinstance(value, str) and "/" in value:
        text = Path(value).name  # a path: its last part tells the runs apart
    return text if len(text) <= 40 else text[:37] + "..."


def settings_label(run: Run, runs: list[Run]) -> str:
    """The run's settings that differ between `runs` and have no column of their own (lr=0.5,
    epochs=24, ...); "" when there are none."""
    mine = json.loads(run.experiment or "{}")
    others = [json.loads(r.experiment or "{}") for r in runs]
    keys = sorted({k for o in others for k in o} - _SHOWN)
    differing = [k for k in keys if any(o.get(k) != others[0].get(k) for o in others)]
    return " ".join(f"{k}={_short(mine.get(k))}" for k in differing)


def preset_label(run: Run) -> str:
    """The preset and its --set overrides ("plain" without distillation)."""
    if run.preset is None:
        return "plain"
    return " ".join([run.preset, *run.overrides])


def teacher_label(run: Run) -> str:
    """The teacher's name; "-" for plain training, "?" when the run's cache is not readable here."""
    return "-" if run.preset is None else run.teacher or "?"


def codec_label(run: Run) -> str:
    """The cache's codec ("online" for an online teacher); "-" for plain training, "?" when unknown."""
    return "-" if run.preset is None else run.codec or "?"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return NOT_AVAILABLE
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _iterations(run: Run) -> str:
    if run.iterations is None:
        return NOT_AVAILABLE
    if run.total_iters is not None and run.iterations < run.total_iters:
        return f"{run.iterations}/{run.total_iters} (unfinished)"
    return str(run.iterations)


def _epoch(value) -> str:
    if value is None:
        return NOT_AVAILABLE
    return f"{value:g}" if isinstance(value, float) else str(value)


def _mean_sd_text(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return NOT_AVAILABLE
    return percent(mean) if sd is None else f"{percent(mean)} ± {100 * sd:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text) -> str:
        return str(text).replace("|", "\\|")
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def runs_markdown(runs: list[Run]) -> list[str]:
    """Every run, in group order."""
    header = ["run", "student", "teacher", "preset", "codec", "seed", "iterations", "train time",
              *COCO_AP_NAMES, "best epoch"]
    rows = []
    for group in group_runs(runs):
        for r in group.runs:
            m = r.metrics or {}
            rows.append([r.name, r.student or "?", teacher_label(r), preset_label(r), codec_label(r),
                         r.seed if r.seed is not None else "?", _iterations(r), duration(r.train_seconds),
                         *(percent(m.get(k)) for k in COCO_AP_NAMES), _epoch(r.best_epoch),
                         settings_label(r, runs)])
    return _with_settings(header, rows)


def _with_settings(header: list[str], rows: list[list]) -> list[str]:
    """The table, with a last "other settings" column only when some row has any."""
    if any(row[-1] for row in rows):
        return _markdown(header + ["other settings"], rows)
    return _markdown(header, [row[:-1] for row in rows])


def groups_markdown(groups: list[Group]) -> list[str]:
    """One row per group: mean ± sd over its seeds; "other settings": what tells groups apart
    besides the columns (lr, epochs, ...)."""
    firsts = [g.first for g in groups]
    header = ["student", "teacher", "preset", "codec", "runs", "seeds", "iterations", "train time (mean)",
              *COCO_AP_NAMES, "best epochs"]
    rows = []
    for g in groups:
        r = g.first
        iters = sorted({str(x.iterations) for x in g.runs if x.iterations is not None}) or [NOT_AVAILABLE]
        rows.append([r.student or "?", teacher_label(r), preset_label(r), codec_label(r), len(g.runs),
                     ",".join("?" if s is None else str(s) for s in g.seeds), ",".join(iters),
                     duration(g.train_seconds()),
                     *(_mean_sd_text(*g.mean_sd(k)) for k in COCO_AP_NAMES),
                     ",".join(_epoch(x.best_epoch) for x in g.runs), settings_label(r, firsts)])
    return _with_settings(header, rows)


def _number(value: float | None, scale: float = 1.0) -> str:
    return "" if value is None else f"{scale * value:.4f}"


def runs_csv(runs: list[Run]) -> str:
    """One line per run: its settings, iterations, train seconds, the twelve COCO numbers x 100."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["run", "path", "student", "teacher", "preset", "overrides", "codec", "seed", "iterations",
                "total_iters", "train_seconds", *COCO_METRIC_NAMES, "best_epoch", "metrics_from", "group",
                "other_settings"])
    groups = group_runs(runs)
    for index, g in enumerate(groups, start=1):
        for r in g.runs:
            m = r.metrics or {}
            w.writerow([r.name, str(r.path), r.student or "", r.teacher or "", r.preset or "plain",
                        " ".join(r.overrides), r.codec or "", "" if r.seed is None else r.seed,
                        "" if r.iterations is None else r.iterations, "" if r.total_iters is None else r.total_iters,
                        _number(r.train_seconds), *(_number(m.get(k), 100) for k in COCO_METRIC_NAMES),
                        "" if r.best_epoch is None else r.best_epoch, r.metrics_from, index,
                        settings_label(r, runs)])
    return out.getvalue()


def groups_csv(groups: list[Group]) -> str:
    """One line per group: settings, runs, seeds, mean train seconds, mean and sd of each COCO number x 100."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["group", "student", "teacher", "preset", "overrides", "codec", "runs", "seeds", "train_seconds_mean",
                *(f"{k}_{stat}" for k in COCO_METRIC_NAMES for stat in ("mean", "sd")), "runs_named", "other_settings"])
    firsts = [g.first for g in groups]
    for index, g in enumerate(groups, start=1):
        r = g.first
        cells = []
        for k in COCO_METRIC_NAMES:
            mean, sd = g.mean_sd(k)
            cells += [_number(mean, 100), _number(sd, 100)]
        w.writerow([index, r.student or "", r.teacher or "", r.preset or "plain", " ".join(r.overrides), r.codec or "",
                    len(g.runs), " ".join("" if s is None else str(s) for s in g.seeds), _number(g.train_seconds()),
                    *cells, " ".join(x.name for x in g.runs), settings_label(r, firsts)])
    return out.getvalue()


def report_json(runs: list[Run]) -> dict:
    """The tables' content, machine-readable (COCO numbers as fractions, as eval.json has them)."""
    def run_dict(r: Run) -> dict:
        return {"name": r.name, "path": str(r.path), "student": r.student, "teacher": r.teacher, "preset": r.preset,
                "overrides": list(r.overrides), "codec": r.codec, "seed": r.seed, "iterations": r.iterations,
                "total_iters": r.total_iters, "train_seconds": r.train_seconds, "metrics": r.metrics,
                "metrics_from": r.metrics_from or None, "best_epoch": r.best_epoch,
                "evals": [{"epoch": e["epoch"], "iter": e["iter"], "AP": e["metrics"].get("AP")} for e in r.evals],
                "notes": r.notes}
    groups = []
    for g in group_runs(runs):
        stats = {k: dict(zip(("mean", "sd"), g.mean_sd(k))) for k in COCO_METRIC_NAMES}
        groups.append({"runs": [r.name for r in g.runs], "seeds": g.seeds, "preset": g.first.preset,
                       "student": g.first.student, "teacher": g.first.teacher, "codec": g.first.codec,
                       "train_seconds_mean": g.train_seconds(), "metrics": stats})
    return {"runs": [run_dict(r) for r in runs], "groups": groups}


__all__ = ["Group", "duration", "group_runs", "groups_csv", "groups_markdown", "preset_label", "report_json",
           "runs_csv", "runs_markdown"]
