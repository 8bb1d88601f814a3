"""What a training run's folder says about it, read back into one `Run` record.

A run folder (`defeat-cache train --out RUN`) holds config.json (the options and what they
resolved to, `engine.run_files.write_config`), metrics.jsonl (a line of loss terms, lr and
elapsed time every --log-every iterations; evaluation lines carry an ``"eval"`` object of COCO
numbers by name) and, when it was evaluated after training, eval.json (`defeat-cache eval --json`).

metrics.jsonl is read as the history of the run that produced the checkpoint: a line whose
iteration is not after the previous line's starts a new segment (a `--resume` from an earlier
checkpoint, or an older run appended to by a fresh start), and replaces every earlier line from
that iteration on. A segment whose clock restarted (runs before the time was cumulative over
resumes) is shifted by the time reached before it, so the train time covers the whole run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.storage import is_url
from ..errors import UserError
from ..progress import log

#: Options that do not change what a run computes: runs differing only in these (and the seed)
#: are the same experiment. Everything else in config.json's options must be equal.
NOT_THE_EXPERIMENT = frozenset({
    "out", "seed", "resume", "force", "progress", "workers", "device", "log_every", "checkpoint_minutes",
    "storage_options", "cache", "teacher_checkpoint", "cache_in_memory", "eval_every", "keep_epochs",
    "tensorboard",
})


@dataclass
class Run:
    """One training run as its folder records it (None: the folder does not say)."""

    name: str
    path: Path
    student: str | None = None
    teacher: str | None = None  # None: plain training
    preset: str | None = None  # the distillation preset; None: plain training
    overrides: tuple[str, ...] = ()
    codec: str | None = None  # the cache's codec (and its options), "online", or None (plain)
    seed: int | None = None
    iterations: int | None = None  # reached (the last metrics line)
    total_iters: int | None = None
    train_seconds: float | None = None
    metrics: dict | None = None  # COCO numbers of the trained model (fractions; None per undefined range)
    metrics_from: str = ""  # "eval.json" or "metrics.jsonl" (its last evaluation line)
    evals: list[dict] = field(default_factory=list)  # evaluation lines: {"epoch" (epochs done), "iter", "metrics"}
    log: list[dict] = field(default_factory=list)  # training lines (loss terms, lr, iter), one segment history
    segments: int = 0  # training processes that wrote metrics.jsonl (resumes + 1)
    experiment: str = ""  # what the run computes except its seed (JSON): runs with equal ones are grouped
    notes: list[str] = field(default_factory=list)

    @property
    def best_epoch(self) -> float | int | None:
        """The epochs trained before the evaluation with the highest AP (None without evaluation lines)."""
        scored = [e for e in self.evals if e["metrics"].get("AP") is not None]
        return max(scored, key=lambda e: e["metrics"]["AP"])["epoch"] if scored else None

    @property
    def loss_terms(self) -> list[str]:
        """The loss terms the run logged, in first-logged order (the total ``loss`` first)."""
        terms: dict[str, None] = {}
        for line in self.log:
            terms.update((k, None) for k in line if k.startswith("loss"))
        return sorted(terms, key=lambda k: k != "loss")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore or delete the file") from None


def _read_jsonl(path: Path) -> list[dict]:
    lines = []
    texts = path.read_text().splitlines()
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line: the lines before it are whole
            if number == len(texts):
                log(f"{path}: ignoring its unfinished last line {number}")
                continue
            raise UserError(f"{path}: line {number} is not valid JSON; restore or delete the file") from None
    return lines


def _eval_numbers(line: dict) -> dict | None:
    ev = line.get("eval")
    return ev if isinstance(ev, dict) else None


def history(lines: list[dict]) -> tuple[list[dict], list[dict], int]:
    """(training lines, evaluation lines, segments) of metrics.jsonl's lines, as described in the
    module docstring: superseded lines dropped, restarted clocks shifted."""
    train: list[dict] = []
    evals: list[dict] = []
    segments, offset, last_iter = 0, 0.0, None
    for line in lines:
        it = line.get("iter")
        if not isinstance(it, int):
            continue
        is_eval = _eval_numbers(line) is not None
        restarted = last_iter is None or it < last_iter or (it == last_iter and not is_eval)
        if restarted:
            segments += 1
            train = [t for t in train if t["iter"] < it]
            evals = [e for e in evals if e["iter"] < it]
            reached = train[-1].get("time") if train else None
            offset = reached if reached is not None and (line.get("time") or 0.0) < reached else 0.0
        last_iter = it
        line = dict(line)
        if line.get("time") is not None:
            line["time"] = line["time"] + offset
        (evals if is_eval else train).append(line)
    return train, evals, segments


def _teacher_and_codec(options: dict) -> tuple[str | None, str | None, list[str]]:
    """(teacher name, codec, notes) of a distilled run; (None, None, []) for a plain one."""
    if not options.get("distill"):
        return None, None, []
    if options.get("teacher"):
        return Path(str(options["teacher"])).stem, "online", []
    cache = options.get("cache")
    if not cache:
        return None, None, []
    manifest_path = Path(cache) / "zarr.json"
    if is_url(cache) or not manifest_path.is_file():
        return None, None, [f"cache {cache} not readable here: teacher and codec unknown"]
    manifest = json.loads(manifest_path.read_text()).get("attributes", {}).get("defeat_cache", {})
    codec = manifest.get("codec")
    codec_options = (manifest.get("layout") or {}).get("codec_options") or {}
    if codec:
        codec += "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in sorted(codec_options.items()))
    teacher = ((manifest.get("provenance") or {}).get("teacher") or {}).get("name")
    return teacher, codec, []


def read_run(path: Path, name: str) -> Run | None:
    """The run in folder `path`; None (with a one-line message) for a folder that holds no run."""
    config_path, metrics_path, eval_path = path / "config.json", path / "metrics.jsonl", path / "eval.json"
    if not config_path.is_file():
        log(f"skipping {path}: no config.json (not a `defeat-cache train` run folder)")
        return None
    config = _read_json(config_path)
    options = config.get("options") or {}
    run = Run(name=name, path=path, student=(config.get("model") or {}).get("name") or options.get("student"),
              seed=options.get("seed"), total_iters=config.get("total_iters"))
    distill = options.get("distill") or None
    if distill:
        run.preset = distill.get("name") or "?"
        run.overrides = tuple(distill.get("overrides") or ())
    run.teacher, run.codec, run.notes = _teacher_and_codec(options)

    if metrics_path.is_file():
        run.log, lines, run.segments = history(_read_jsonl(metrics_path))
        # epochs_done: the epochs trained before that evaluation (1.0 after the first); `epoch` is 0-based
        run.evals = [{"epoch": e.get("epochs_done", e.get("epoch")), "iter": e["iter"], "metrics": _eval_numbers(e)}
                     for e in lines]
        if run.log:
            run.iterations = run.log[-1]["iter"]
            run.train_seconds = run.log[-1].get("time")
        if run.segments > 1:
            run.notes.append(f"metrics.jsonl holds {run.segments} training segments (resumed or restarted): "
                             "the latest history is used")
    else:
        run.notes.append("no metrics.jsonl: no iterations, train time or curves")
    if eval_path.is_file():
        run.metrics, run.metrics_from = _read_json(eval_path), "eval.json"
    elif run.evals:
        run.metrics, run.metrics_from = run.evals[-1]["metrics"], "metrics.jsonl"
    else:
        run.notes.append("not evaluated (no eval.json, no evaluation lines in metrics.jsonl)")
    if run.metrics is not None:  # older eval.json files hold pycocotools' -1 for an empty range
        run.metrics = {k: None if isinstance(v, (int, float)) and v < 0 else v for k, v in run.metrics.items()}

    experiment = {k: v for k, v in options.items() if k not in NOT_THE_EXPERIMENT}
    experiment.update(student=run.student, teacher=run.teacher, codec=run.codec, total_iters=run.total_iters)
    run.experiment = json.dumps(experiment, sort_keys=True, default=str)
    return run


def _parse_target(target: str) -> tuple[str | None, Path]:
    """RUN_DIR or NAME=RUN_DIR."""
    if "=" in target and not Path(target).exists():
        name, _, folder = target.partition("=")
        return name, Path(folder)
    return None, Path(target)


def _short_names(paths: list[Path]) -> list[str]:
    """Names for the runs: their folder names, or as many trailing path parts of every run as
    tell them all apart (``seeds/defeat-seed1``, ``compact2/defeat-seed1``)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def read_runs(targets: list[str]) -> list[Run]:
    """The runs of `targets` (RUN_DIR or NAME=RUN_DIR each), in the order given. A folder that is no
    run but holds run folders (a sweep's --out parent) stands for them; other folders without a run
    are skipped with a message; a path that does not exist is an error; a folder given twice (also
    through a symlink) counts once."""
    parsed = []
    for name, folder in map(_parse_target, targets):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such run folder (give the --out folder of `defeat-cache train`)")
        inside = sorted(sub for sub in folder.iterdir() if (sub / "config.json").is_file())
        if not (folder / "config.json").is_file() and inside:  # a sweep's folder: its runs
            log(f"{folder}: not a run folder; reading the {len(inside)} run folders in it")
            parsed += [(None, sub) for sub in inside]
        else:
            parsed.append((name, folder))
    unique: dict[Path, tuple[str | None, Path]] = {}
    for name, folder in parsed:
        key = folder.resolve()
        if key in unique:
            log(f"{folder}: the same run folder as {unique[key][1]}; counted once")
            continue
        unique[key] = (name, folder)
    folders = [folder for _, folder in unique.values()]
    names = [given or short for (given, _), short in zip(unique.values(), _short_names(folders))]
    runs = [r for r in (read_run(folder, name) for name, folder in zip(names, folders)) if r is not None]
    if not runs:
        raise UserError("none of the folders given holds a training run (config.json)")
    return runs


__all__ = ["NOT_THE_EXPERIMENT", "Run", "history", "read_run", "read_runs"]
