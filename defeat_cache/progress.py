"""Progress bars with throughput and ETA (tqdm), quiet on non-zero ranks and when asked."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .distributed import is_main_process


def progress(total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, smoothing=0.1,
                disable=not (enabled and is_main_process()), file=sys.stderr, mininterval=1.0)


def log(message: str) -> None:
    if is_main_process():
        tqdm.write(message, file=sys.stderr)
