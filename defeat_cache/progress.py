"""Progress bars with throughput and ETA (tqdm), quiet on non-zero ranks and when asked; log
messages, which a run can also append to a plain-text file (training's RUN_DIR/train.log)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .distributed import is_main_process

# the files `log` also writes to (see `log_file`), rank 0 only
_log_files: list[TextIO] = []


def progress(total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True) -> tqdm:
    """A bar counting `unit`s (say what is counted: "img", "item" = image x view, "shard")."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, smoothing=0.1,
                disable=not (enabled and is_main_process()), file=sys.stderr, mininterval=1.0)


def log(message: str, console: bool = True) -> None:
    """Prints `message` above the progress bars (rank 0) and appends it to the open log files;
    `console=False`: to the log files only (the progress lines the bar shows on the console)."""
    if not is_main_process():
        return
    if console:
        tqdm.write(message, file=sys.stderr)
    if _log_files:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} {line}\n" for line in message.splitlines() or [""])
        for f in _log_files:
            f.write(text)
            f.flush()


@contextmanager
def log_file(path: Path):
    """While open, every `log` message is also appended to `path`, time-stamped (rank 0)."""
    if not is_main_process():
        yield
        return
    f = open(path, "a")
    _log_files.append(f)
    try:
        yield
    finally:
        _log_files.remove(f)
        f.close()
