"""The report's figures (matplotlib, headless Agg backend): every loss term and the lr against the
iteration, all runs on the same axes per term; AP against the epoch for runs with evaluation lines.

The functions return matplotlib Figures (tests read their lines back); `save` writes a PNG and
closes the figure. A run keeps one colour in every panel and figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: reports are written on training servers and in CI

from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.figure import Figure  # noqa: E402

from .runs import Run  # noqa: E402

PANEL_COLUMNS = 3


def _colours(runs: list[Run]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    return {r.name: cmap(i % cmap.N) for i, r in enumerate(runs)}


def _legend_handles(runs: list[Run], colours: dict) -> list:
    return [plt.Line2D([], [], color=colours[r.name], label=r.name) for r in runs]


def curve_panels(runs: list[Run]) -> list[str]:
    """The panels of `loss_figure`: the total loss, every other loss term (first-logged order over
    the runs), then the lr."""
    terms: dict[str, None] = {}
    for r in runs:
        terms.update((t, None) for t in r.loss_terms)
    ordered = sorted(terms, key=lambda t: t != "loss")
    return ordered + (["lr"] if any("lr" in line for r in runs for line in r.log) else [])


def loss_figure(runs: list[Run]) -> Figure | None:
    """One panel per loss term and one for the lr; one line per run that logged it. None when no
    run has metrics lines."""
    runs = [r for r in runs if r.log]
    if not runs:
        return None
    panels = curve_panels(runs)
    columns = min(PANEL_COLUMNS, len(panels) + 1)
    rows = math.ceil((len(panels) + 1) / columns)  # + the legend's panel
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.0 * rows + 0.5), squeeze=False, sharex=True)
    colours = _colours(runs)
    for ax, panel in zip(axes.flat, panels):
        for r in runs:
            points = [(line["iter"], line[panel]) for line in r.log if line.get(panel) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colours[r.name], linewidth=1.2, label=r.name)
        ax.set_title(panel, fontsize="medium")
        ax.set_ylabel("learning rate" if panel == "lr" else "loss")
        ax.set_xlabel("iteration")
        ax.tick_params(labelbottom=True)
        ax.grid(True, alpha=0.3)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.set_visible(False)
    legend_ax = spare[0]  # the first free panel holds the legend of the runs' colours
    legend_ax.set_visible(True)
    legend_ax.axis("off")
    legend_ax.legend(handles=_legend_handles(runs, colours), loc="center", title="run", frameon=False,
                     fontsize="small" if len(runs) <= 12 else "x-small", ncol=1 if len(runs) <= 12 else 2)
    fig.suptitle("training curves (metrics.jsonl)")
    fig.tight_layout()
    return fig


def ap_figure(runs: list[Run]) -> Figure | None:
    """COCO AP (x 100) against the epoch, one line per run with evaluation lines; None when no run has any."""
    runs_with = [r for r in runs if any(e["metrics"].get("AP") is not None for e in r.evals)]
    if not runs_with:
        return None
    colours = _colours(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in runs_with:
        points = [(e["epoch"] if e["epoch"] is not None else e["iter"], 100 * e["metrics"]["AP"])
                  for e in r.evals if e["metrics"].get("AP") is not None]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=colours[r.name], label=r.name)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("COCO AP (x 100), val split")
    ax.set_title("AP during training (--eval-every)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ap_figure", "curve_panels", "loss_figure", "save"]
