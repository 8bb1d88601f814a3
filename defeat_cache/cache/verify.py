"""Verifying a cache: read every chunk of every shard and list what is wrong with it.

Checksum failures, non-finite values, inconsistent metadata, missing shards and missing
shard files are reported (not raised), so one pass names every problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import storage
from .arrays import unreadable_markers
from .errors import DAMAGED
from .layout import ItemMeta

if TYPE_CHECKING:
    from .reader import TeacherCache

__all__ = ["VerifyReport", "verify_cache"]


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_total: int = 0
    shards_done: int = 0
    items_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _missing_shard_files(A: dict, names: list[str], s: int, rep: VerifyReport) -> set[str]:
    """The arrays of `names` whose shard file of shard `s` is absent (each reported)."""
    keys = [storage.shard_key(A[n], s) for n in names]
    missing = set()
    for name, key, ok in zip(names, keys, storage.exists_many(A["meta"].store, keys)):
        if not ok:
            missing.add(name)
            rep.problems.append(f"shard {s}: {name} shard file {key} missing")
    return missing


def _missing_tiles(stored: np.ndarray, tile: tuple[int, int]) -> list[tuple[int, int]]:
    """(y, x) origins of the tiles of one item's level (stored[C, h, w], its own extent) whose
    chunk is absent. Zarr stores no chunk that is all fill (zero), so an absent chunk reads as
    zeros; a written tile inside an extent is never all zero (no teacher output is), so an
    all-zero tile is a missing chunk."""
    th, tw = tile
    nz = np.any(stored != 0, axis=0)
    h, w = nz.shape
    ny, nx = -(-h // th), -(-w // tw)
    grid = np.zeros((ny * th, nx * tw), bool)  # a tile only partly inside the extent counts its inside part
    grid[:h, :w] = nz
    present = grid.reshape(ny, th, nx, tw).any(axis=(1, 3))
    return [(int(y) * th, int(x) * tw) for y, x in zip(*np.nonzero(~present))]


def verify_cache(cache: "TeacherCache", progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Read every item of every array of every shard: checksum failures, non-finite
    values, inconsistent metadata, missing shards/shard files.  ``progress(done, total)``
    is called after each shard."""
    A = cache.open_arrays()
    L = cache.layout
    rep = VerifyReport(shards_total=L.num_shards)
    try:
        done = np.asarray(A["shard_done"][:], dtype=bool)
    except Exception:
        bad, first = unreadable_markers(A["shard_done"])
        # a shard with an unreadable marker is still checked: its data may be intact
        done = np.array([s in bad or bool(A["shard_done"][s]) for s in range(L.num_shards)], bool)
        rep.problems.append(f"shard_done marker of shard {', '.join(map(str, bad))} unreadable ({first}): which "
                            f"shards are complete is unknown; {DAMAGED}")
    for name in L.basis_names():  # side data every shard decodes with
        try:
            if not np.isfinite(np.asarray(A[name][:])).all():
                rep.problems.append(f"{name}: basis holds non-finite values")
        except Exception as e:
            rep.problems.append(f"{name}: basis unreadable ({type(e).__name__}: {e})")
    for s in range(L.num_shards):
        rng = L.shard_items(s)
        if not done[s]:
            rep.problems.append(f"shard {s} (items {rng.start}..{rng.stop - 1}) missing: not marked done")
            if progress:
                progress(s + 1, L.num_shards)
            continue
        rep.shards_done += 1
        sel = slice(rng.start, rng.stop)

        def read_checked(name):
            """Whole shard in one read; on error, item by item to name the bad items."""
            try:
                return np.asarray(A[name][sel])
            except Exception:
                out = np.zeros((len(rng),) + A[name].shape[1:], A[name].dtype)
                for b, i in enumerate(rng):
                    try:
                        out[b] = A[name][i]
                    except Exception as e:
                        rep.problems.append(f"shard {s} item {i}: {name} unreadable "
                                            f"({type(e).__name__}: {e})")
                return out

        metas = [ItemMeta.from_row(row) for row in read_checked("meta")]
        # every array holding part of a written item must have this shard's file (rois/logits
        # only if an item has rows); zarr would read a missing one as zeros
        per_item = [n for n, _ in L.all_levels] + ["meta"] + (["params"] if cache.codec.has_params else [])
        if any(m.n_proposals + m.n_gt > 0 for m in metas):
            per_item += ["rois"] + (["logits"] if L.separate_logits else [])
        missing = _missing_shard_files(A, per_item, s, rep)
        rois = read_checked("rois")
        logits = read_checked("logits") if L.separate_logits else None
        params = read_checked("params") if cache.codec.has_params else None
        for b, i in enumerate(rng):
            m = metas[b]
            who = f"shard {s} item {i}"
            if not m.written:
                rep.problems.append(f"{who}: meta missing (item never written)")
                continue
            if (m.image_index, m.view_index) != L.image_view(i):
                rep.problems.append(f"{who}: meta says image {m.image_index} view {m.view_index}, "
                                    f"expected {L.image_view(i)}")
            if not (0 <= m.n_proposals <= L.max_proposals and 0 <= m.n_gt <= L.max_gt):
                rep.problems.append(f"{who}: n_proposals={m.n_proposals} / n_gt={m.n_gt} out of range")
            for (name, spec), (h, w) in zip(L.all_levels, m.extents):
                if not (0 < h <= spec.max_h and 0 < w <= spec.max_w):
                    rep.problems.append(f"{who}: {name} extent {(h, w)} out of range")
            P = L.max_proposals
            for what, rows in (("proposal", rois[b, :m.n_proposals]), ("gt", rois[b, P:P + m.n_gt])):
                if "rois" not in missing and rows.size and not rows.any():
                    rep.problems.append(f"{who}: rois chunk missing ({len(rows)} {what} rows read as zeros)")
            if not np.isfinite(rois[b]).all():
                rep.problems.append(f"{who}: rois hold non-finite values")
            if logits is not None and not np.isfinite(logits[b]).all():
                rep.problems.append(f"{who}: logits hold non-finite values")
            if params is not None and not np.isfinite(params[b]).all():
                rep.problems.append(f"{who}: params hold non-finite values")
        for li, (name, spec) in enumerate(L.all_levels):
            stored = read_checked(name)
            for b, i in enumerate(rng):
                h, w = metas[b].extents[li]
                if h <= 0 or w <= 0:
                    continue
                gaps = [] if name in missing else _missing_tiles(stored[b, :, :h, :w], spec.tile)
                if gaps:
                    (y, x), (th, tw) = gaps[0], spec.tile
                    rep.problems.append(f"shard {s} item {i}: {name} chunk missing inside the item's extent {h}x{w} "
                                        f"(tile y {y}..{y + th - 1}, x {x}..{x + tw - 1}"
                                        + (f", and {len(gaps) - 1} more tiles)" if len(gaps) > 1 else ")"))
                x = cache.decode_level(stored[b, :, :h, :w], None if params is None else params[b], li)
                if not torch.isfinite(x).all():
                    rep.problems.append(f"shard {s} item {i}: {name} holds non-finite values")
        rep.items_checked += len(rng)
        if progress:
            progress(s + 1, L.num_shards)
    if cache.manifest.get("complete") and not done.all():
        rep.problems.append("manifest says complete but some shards are not marked done")
    return rep
