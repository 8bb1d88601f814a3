"""Reads and compares what the tests produced: relative errors of tensors, two caches' arrays, and
a training run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (L2 over all elements, in float64)."""
    return float(torch.linalg.vector_norm((a - ref).double()) / torch.linalg.vector_norm(ref.double()).clamp_min(1e-30))


def assert_same_caches(a, b, atol: float = 0.0) -> None:
    """Two caches' zarr groups hold the same arrays (top level, features/, backbone/...), equal within atol."""
    names = sorted(k for k, _ in a.arrays())
    assert names == sorted(k for k, _ in b.arrays()) and {"rois", "meta", "shard_done"} <= set(names)
    for sub, group in a.groups():  # features/, backbone/
        names += [f"{sub}/{k}" for k, _ in group.arrays()]
    assert any(n.startswith("features/") for n in names)
    for name in names:
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=0, atol=atol, err_msg=name)


def run_metrics(run_dir: str | Path) -> list[dict]:
    """The lines of a training run's metrics.jsonl, each a JSON object."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
