"""`defeat-cache report`: compare training runs after a sweep.

`runs.read_runs` reads what each run folder holds (config.json, metrics.jsonl with its loss lines
and any evaluation lines, eval.json) into `runs.Run` records; `tables` turns them into one row per
run and one per group of runs that differ only in their seed (mean ± sd), as Markdown, CSV and
JSON; `plots` draws every loss term and the lr against the iteration, and AP against the epoch.
`write.write_report` does all of it into one folder.
"""

from .runs import Run, read_runs
from .write import write_report

__all__ = ["Run", "read_runs", "write_report"]
