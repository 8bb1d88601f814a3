"""The arrays a layout implies (shape, dtype, chunking), and checking a store's arrays against them.

The writer creates every array from `array_specs`; readers and resuming writers open them
through `open_checked_arrays`, so a manifest that does not describe the arrays under it (an
edited codec, a changed max_proposals, a deleted array folder) is refused when the cache is
opened instead of being decoded wrongly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DAMAGED, CacheError
from .layout import CacheLayout, meta_columns

__all__ = ["ArraySpec", "array_specs", "open_checked_arrays", "read_shard_done", "unreadable_markers"]

@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None  # None: unsharded


def array_specs(layout: CacheLayout) -> dict[str, ArraySpec]:
    """Array name -> what it must look like, in `layout.array_names()` order (layout.py
    describes what each holds)."""
    N, S = layout.num_items, layout.items_per_shard
    stored = layout.codec_object().stored_dtype
    out: dict[str, ArraySpec] = {}
    levels = dict(layout.all_levels)
    for name, spec in layout.all_levels:
        (th, tw), (Hp, Wp), C = spec.tile, spec.padded, spec.stored
        out[name] = ArraySpec((N, C, Hp, Wp), np.dtype(stored), (1, C, th, tw), (S, C, Hp, Wp))
    for name in layout.basis_names():
        spec = levels[name[len("bases/"):]]
        shape = (2 + spec.stored, spec.channels)
        out[name] = ArraySpec(shape, np.dtype("float32"), shape, None)
    if layout.codec_object().has_params:
        T, P = layout.total_stored_channels, layout.codec_object().params_per_channel
        out["params"] = ArraySpec((N, T, P), np.dtype("float32"), (1, T, P), (S, T, P))
    R, K = layout.rows, layout.num_logits
    F = 5 if layout.separate_logits else 5 + K
    out["rois"] = ArraySpec((N, R, F), np.dtype("float32"), (1, R, F), (S, R, F))
    if layout.separate_logits:
        out["logits"] = ArraySpec((N, R, K), np.dtype(layout.logits_dtype), (1, R, K), (S, R, K))
    M = len(meta_columns(layout))
    out["meta"] = ArraySpec((N, M), np.dtype("int64"), (1, M), (S, M))
    out["shard_done"] = ArraySpec((layout.num_shards,), np.dtype("bool"), (1,), None)
    return out


def open_checked_arrays(group, layout: CacheLayout, path) -> dict:
    """name -> zarr array for every array of `layout`, each checked against `array_specs`;
    a missing or different array is a one-line CacheError naming it."""
    arrays = {}
    for name, want in array_specs(layout).items():
        try:
            arr = group[name]
        except KeyError:
            raise CacheError(f"cache at {path}: array {name} is missing (the manifest lists it; was its folder "
                             f"deleted?); {DAMAGED}") from None
        except Exception as e:  # its zarr.json unreadable
            raise CacheError(f"cache at {path}: array {name} cannot be opened ({type(e).__name__}: {e}); "
                             f"{DAMAGED}") from None
        got = ArraySpec(tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks),
                        tuple(arr.shards) if getattr(arr, "shards", None) else None)
        for field in ("dtype", "shape", "chunks", "shards"):
            a, b = getattr(got, field), getattr(want, field)
            if a != b:
                fmt = (lambda v: str(v)) if field == "dtype" else (lambda v: "none" if v is None else list(v))
                raise CacheError(f"cache at {path}: array {name} has {field} {fmt(a)} but its manifest (codec "
                                 f"{layout.codec}, max_proposals {layout.max_proposals}, {layout.num_items} items) "
                                 f"implies {fmt(b)}; {DAMAGED}")
        arrays[name] = arr
    return arrays


def unreadable_markers(shard_done) -> tuple[list[int], str]:
    """The shards whose `shard_done` chunk cannot be read (checksum, truncation) and the first error."""
    bad, first = [], ""
    for s in range(shard_done.shape[0]):
        try:
            shard_done[s]
        except Exception as e:
            bad.append(s)
            first = first or f"{type(e).__name__}: {e}"
    return bad, first


def read_shard_done(shard_done, path) -> np.ndarray:
    """The `shard_done` markers as a bool array; unreadable ones are a one-line CacheError naming
    the shards (which shards are complete is then unknown)."""
    try:
        return np.asarray(shard_done[:], dtype=bool)
    except Exception:
        bad, first = unreadable_markers(shard_done)
        if not bad:
            raise
        raise CacheError(f"cache at {path}: the shard_done marker of shard {', '.join(map(str, bad))} is unreadable "
                         f"({first}), so which shards are complete is unknown; {DAMAGED}") from None
