"""How a state dict differs from the one a model expects: the one comparison behind the refusals
of checkpoint loading (models/checkpoint.py) and of the mmdetection/detectron2 converters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class StateDiff:
    missing: list[str]  # expected, absent (in the expected dict's order)
    extra: list[str]  # present, not expected (in the given dict's order)
    shapes: list[str]  # "key (given shape) vs model (expected shape)"


def state_diff(given: dict[str, Tensor], expected: dict[str, Tensor]) -> StateDiff:
    return StateDiff(
        missing=[k for k in expected if k not in given],
        extra=[k for k in given if k not in expected],
        shapes=[f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in expected if k in given and given[k].shape != expected[k].shape])


__all__ = ["StateDiff", "state_diff"]
