"""Describing a cache: manifest, completeness, stored bytes per array and per item, level shapes.

What `defeat-cache inspect` prints and what the benchmarks size codecs with.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import storage
from .arrays import read_shard_done
from .lock import read_lock_holder

if TYPE_CHECKING:
    from .reader import TeacherCache

__all__ = ["inspect_cache"]


def inspect_cache(cache: "TeacherCache") -> dict:
    A = cache.open_arrays()
    L = cache.layout
    done = read_shard_done(A["shard_done"], cache.path)
    items_done = int(sum(len(L.shard_items(int(s))) for s in np.flatnonzero(done)))
    arrays = {}
    total = 0
    for name, arr in A.items():
        nb = int(arr.nbytes_stored())
        total += nb
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "bytes_stored": nb,
            "bytes_per_item": (nb / items_done) if items_done and name != "shard_done" else None,
        }
    feature_bytes = sum(v["bytes_stored"] for k, v in arrays.items() if k.startswith(("features/", "backbone/")))
    out = {
        "path": str(cache.path),
        "manifest": cache.manifest,
        "codec": L.codec,
        "complete": bool(cache.manifest.get("complete")),
        "items_total": L.num_items,
        "items_done": items_done,
        "shards_total": L.num_shards,
        "shards_done": int(done.sum()),
        "arrays": arrays,
        "bytes_total": total,
        "bytes_per_item": (total / items_done) if items_done else None,
        "feature_bytes_per_item": (feature_bytes / items_done) if items_done else None,
        "levels": {
            name: {"channels": spec.channels, "stored_channels": spec.stored, "max_hw": [spec.max_h, spec.max_w],
                   "padded_hw": list(spec.padded), "tile": list(spec.tile)}
            for name, spec in L.all_levels
        },
    }
    # bytes per view by kind: what a codec costs in features, RoI arrays and side data
    kinds = {"features": ("features/", "backbone/", "params"), "roi_arrays": ("rois", "logits"),
             "side_data": ("bases/",), "meta": ("meta",)}
    if items_done:
        out["bytes_per_item_by_kind"] = {
            kind: sum(v["bytes_stored"] for k, v in arrays.items() if k.startswith(prefixes)) / items_done
            for kind, prefixes in kinds.items()}
    for (name, _), basis in zip(L.all_levels, cache.bases):
        if basis is not None:  # what the stored rank keeps of the teacher's centred energy
            out["levels"][name]["explained_energy"] = round(basis.explained(), 4)
            out["levels"][name]["explained_energy_by_rank"] = {
                r: round(basis.explained(r), 4) for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= basis.channels}
    root = None
    try:
        root = storage.local_root(storage.open_group(cache.path, "r", cache.storage_options))
    except Exception:
        pass
    if root is not None:
        out["partial_files"] = sum(1 for _ in root.rglob("*.partial"))
    holder = read_lock_holder(cache.path, cache.storage_options)
    out["extraction_lock"] = None if holder is None else {
        "holder": holder.describe(), "stale": holder.is_stale()}
    return out
