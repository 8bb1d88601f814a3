"""Reading a cache: `TeacherCache` opens one read-only and decodes it item by item.

Each item comes back as the same `TeacherOutput` record an online teacher produces, with its
item identity filled in.  Checking a whole cache (`verify`) and describing it (`inspect`)
live in verify.py and inspection.py; TeacherCache offers both as methods.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..models.teacher import TeacherOutput
from . import storage
from .codecs import FeatureCodec, stored_to_torch
from .arrays import open_checked_arrays, read_shard_done
from .compact import LevelBasis
from .errors import DAMAGED, CacheError, CacheMismatchError, IncompleteCacheError, NotACacheError
from .inspection import inspect_cache
from .layout import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, CacheLayout, ItemMeta
from .lock import read_lock_holder
from .manifest import MANIFEST_KEY, read_manifest
from .verify import VerifyReport, verify_cache

__all__ = ["TeacherCache", "EncodedItem", "read_bases"]


def read_bases(group, layout: CacheLayout) -> dict[str, LevelBasis]:
    """Level array name -> its basis, for basis codecs (else empty)."""
    return {name[len("bases/"):]: LevelBasis.from_array(np.asarray(group[name][:])) for name in layout.basis_names()}


@dataclass
class EncodedItem:
    """An item as stored: the record without its levels, each level's stored tensor (cropped to
    its extent) and the item's params row. `TeacherCache.decode_item` turns it into the record."""

    record: TeacherOutput
    stored: list[torch.Tensor]
    params: torch.Tensor | None


class TeacherCache:
    """Read-only view of a cache.  Picklable and fork-safe: zarr arrays are opened lazily
    in each process (re-opened when the pid changes, e.g. in DataLoader workers)."""

    def __init__(self, path, storage_options: dict | None = None, allow_incomplete: bool = False):
        storage.configure_zarr_threads()
        self.path = path
        self.storage_options = storage_options
        try:
            group = storage.open_group(path, "r", storage_options)
        except FileNotFoundError:
            raise NotACacheError(f"no cache at {path} (no zarr group there)") from None
        if MANIFEST_KEY not in group.attrs:
            raise NotACacheError(f"{path} is a zarr group but not a defeat-cache cache "
                                 f"(no {MANIFEST_KEY!r} manifest)")
        raw = group.attrs[MANIFEST_KEY]
        sv = raw.get("schema_version") if isinstance(raw, dict) else None
        if isinstance(raw, dict) and sv not in READABLE_SCHEMA_VERSIONS:  # first: another schema's layout may not parse
            raise CacheMismatchError(f"cache at {path} has schema_version={sv}, this software "
                                     f"reads schema versions {list(READABLE_SCHEMA_VERSIONS)} "
                                     f"(writes {SCHEMA_VERSION}); re-extract it")
        self.manifest, self.layout = read_manifest(group.attrs, path)
        self._arrays: dict | None = None
        self._pid: int | None = None
        self._present: set[tuple[str, int]] = set()  # (array, shard) whose shard file exists
        arrays = self.open_arrays()  # checks every array against the manifest
        if not self.manifest.get("complete") and not allow_incomplete:
            raise IncompleteCacheError(self._incomplete_message(arrays))
        self.codec: FeatureCodec = self.layout.codec_object()
        self.num_views = self.layout.num_views
        self._level_names = [n for n, _ in self.layout.all_levels]
        # the arrays an item has parts in: its levels (and params) always, its rows when it has any
        params = ["params"] if self.codec.has_params else []
        rows = ["rois"] + (["logits"] if self.layout.separate_logits else [])
        self._level_arrays = self._level_names + params
        self._item_arrays = self._level_arrays + rows
        self._small_arrays = rows + params  # read together, before the levels
        self._nf = len(self.layout.feature_levels)
        # the bases are small (a few C x C floats per level): read once, kept with the reader
        by_name = read_bases(group, self.layout)
        self.bases: list[LevelBasis | None] = [by_name.get(n) for n in self._level_names]
        self._device_bases: dict = {}
        offs = np.cumsum([0] + [s.stored for _, s in self.layout.all_levels])
        self._chan_slices = [slice(int(a), int(b)) for a, b in zip(offs[:-1], offs[1:])]

    def _incomplete_message(self, arrays: dict) -> str:
        done = read_shard_done(arrays["shard_done"], self.path)
        counts = f"{int(done.sum())} of {done.size} shards done"
        holder = read_lock_holder(self.path, self.storage_options)
        if holder is not None and not holder.is_stale():
            return (f"cache at {self.path} is still being written by extract ({holder.describe()}): {counts}; "
                    f"wait for that extraction to finish")
        return (f"cache at {self.path} is incomplete: {counts} (its extraction did not finish); run the same "
                f"extract command again to finish it")

    def __len__(self) -> int:
        return self.layout.num_items

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None
        state["_pid"] = None
        state["_present"] = set()
        return state

    def open_arrays(self) -> dict:
        """name -> zarr array, opened once per process."""
        pid = os.getpid()
        if self._arrays is None or self._pid != pid:
            storage.configure_zarr_threads()
            group = storage.open_group(self.path, "r", self.storage_options)
            self._arrays = open_checked_arrays(group, self.layout, self.path)
            self._pid = pid
            self._present = set()
        return self._arrays

    def provenance(self) -> dict:
        return dict(self.manifest.get("provenance") or {})

    # ---- reading
    def decode_level(self, stored: np.ndarray | torch.Tensor, params: np.ndarray | torch.Tensor | None,
                     level_index: int) -> torch.Tensor:
        """Stored values of one level (index into layout.all_levels) -> float32 tensor on the
        stored tensor's device; ``params``: the item's whole params row, sliced to that level here."""
        if isinstance(stored, np.ndarray):
            stored = stored_to_torch(stored)
        prm = None
        if params is not None:
            prm = params[..., self._chan_slices[level_index], :]
            prm = torch.from_numpy(np.ascontiguousarray(prm)) if isinstance(prm, np.ndarray) else prm.to(stored.device)
        return self.codec.decode(stored, prm, basis=self._basis(level_index, stored.device)).contiguous()

    def _basis(self, level_index: int, device) -> LevelBasis | None:
        basis = self.bases[level_index]
        if basis is None or torch.device(device).type == "cpu":
            return basis
        key = (level_index, str(device))  # moved to a device once, not once per item
        if key not in self._device_bases:
            self._device_bases[key] = basis.to(device)
        return self._device_bases[key]

    def read(self, item_index: int) -> TeacherOutput:
        """One item, decoded to float32 torch tensors cropped to its own extents.
        Two zarr round trips: meta, then everything else concurrently."""
        if not 0 <= item_index < len(self):
            raise IndexError(f"item {item_index} out of range [0, {len(self)})")
        try:
            return self._read(item_index)
        except CacheError:
            raise
        except Exception as e:  # storage errors (a dropped endpoint, expired credentials, a bad chunk)
            raise CacheError(f"cache {self.path}: reading item {item_index} failed "
                             f"({type(e).__name__}: {e})") from e

    def _read(self, i: int, decode: bool = True):
        A = self.open_arrays()
        meta = ItemMeta.from_row(A["meta"][i])
        shard = i // self.layout.items_per_shard
        if not meta.written:
            if bool(A["shard_done"][shard]):
                self._check_shard_files(A, ["meta"], i, shard)
            raise IncompleteCacheError(f"item {i} of cache {self.path} was never written "
                                       f"(shard {shard} not done)")
        # Zarr reads a missing chunk as fill (zeros): every array holding part of this item must
        # have its shard file, or a deleted file would train as zeros.
        has_rows = meta.n_proposals + meta.n_gt > 0
        self._check_shard_files(A, self._item_arrays if has_rows else self._level_arrays, i, shard)
        small = self._small_arrays
        reqs = [(A[name], i) for name in small]
        for name, (h, w) in zip(self._level_names, meta.extents):
            reqs.append((A[name], (i, slice(None), slice(0, h), slice(0, w))))
        res = storage.get_many(reqs)
        got = dict(zip(small, res))
        stored = res[len(small):]
        rois = torch.from_numpy(np.ascontiguousarray(got["rois"]))
        logits = torch.from_numpy(got["logits"].astype(np.float32)) if "logits" in got else rois[:, 5:]
        n, g = meta.n_proposals, meta.n_gt
        P = self.layout.max_proposals
        for what, rows in (("proposal", rois[:n]), ("gt", rois[P:P + g])):
            if rows.numel() and not bool(rows.any()):  # its chunk is absent: written rows are never all zero
                raise CacheError(f"cache {self.path}: item {i}: array rois has no chunk for its {len(rows)} {what} rows "
                                 f"(read as zeros); {DAMAGED}")
        record = TeacherOutput(
            image_index=meta.image_index,
            view_index=meta.view_index,
            image_size=meta.image_size,
            canvas_size=meta.canvas_size,
            features=[],
            proposals=rois[:n, :4].clone(),
            objectness=rois[:n, 4].clone(),
            proposal_logits=logits[:n].clone(),
            gt_boxes=rois[P:P + g, :4].clone(),
            gt_logits=logits[P:P + g].clone(),
        )
        params = got.get("params")
        if not decode:
            return EncodedItem(record, [stored_to_torch(x) for x in stored],
                               None if params is None else torch.from_numpy(np.ascontiguousarray(params)))
        return self._with_levels(record, [self.decode_level(x, params, li) for li, x in enumerate(stored)])

    def _check_shard_files(self, A: dict, names: list[str], item: int, shard: int) -> None:
        """Each array of `names` has the shard file of `shard` (checked once per process and shard)."""
        todo = [n for n in names if (n, shard) not in self._present]
        if not todo:
            return
        keys = [storage.shard_key(A[n], shard) for n in todo]
        for name, key, ok in zip(todo, keys, storage.exists_many(A["meta"].store, keys)):
            if not ok:
                raise CacheError(f"cache {self.path}: item {item}: array {name} has no shard file {key} although "
                                 f"shard {shard} is marked done (`defeat-cache verify` lists every damaged shard); "
                                 f"{DAMAGED}")
            self._present.add((name, shard))

    def _with_levels(self, record: TeacherOutput, levels: list[torch.Tensor]) -> TeacherOutput:
        record.features = levels[: self._nf]
        record.backbone_features = levels[self._nf:] if self.layout.backbone_levels else None
        return record

    def read_encoded(self, item_index: int) -> "EncodedItem":
        """One item with its levels still in the stored form (codes + params), for `decode_item`
        on the training device: decoding there moves less data to the device and spends no
        DataLoader-worker time on it (a compact level is one matrix product on the device)."""
        if not 0 <= item_index < len(self):
            raise IndexError(f"item {item_index} out of range [0, {len(self)})")
        try:
            return self._read(item_index, decode=False)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"cache {self.path}: reading item {item_index} failed "
                             f"({type(e).__name__}: {e})") from e

    def decode_item(self, item: "EncodedItem", device="cpu") -> TeacherOutput:
        """An `EncodedItem` -> the TeacherOutput `read` returns, its levels decoded on `device`."""
        params = None if item.params is None else item.params.to(device, non_blocking=True)
        levels = [self.decode_level(x.to(device, non_blocking=True), params, li) for li, x in enumerate(item.stored)]
        return self._with_levels(item.record, levels)

    __getitem__ = read

    # ---- whole-cache checks
    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Read every item of every array of every shard (see verify.verify_cache)."""
        return verify_cache(self, progress)

    def inspect(self) -> dict:
        """Manifest, completeness, bytes per array and per item, level shapes (see inspection.py)."""
        return inspect_cache(self)
