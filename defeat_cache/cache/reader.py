"""Reading a cache: `TeacherCache` opens one read-only and decodes it item by item.

Each item comes back as the same `TeacherOutput` record an online teacher produces, with its
item identity filled in.  Checking a whole cache (`verify`) and describing it (`inspect`)
live in verify.py and inspection.py; TeacherCache offers both as methods.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from ..models.teacher import TeacherOutput
from . import storage
from .codecs import FeatureCodec, get_codec, stored_to_torch
from .errors import CacheError, CacheMismatchError, IncompleteCacheError, NotACacheError
from .inspection import inspect_cache
from .layout import SCHEMA_VERSION, CacheLayout, ItemMeta
from .manifest import MANIFEST_KEY
from .verify import VerifyReport, verify_cache

__all__ = ["TeacherCache"]


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
        self.manifest: dict = dict(group.attrs[MANIFEST_KEY])
        sv = self.manifest.get("schema_version")
        if sv != SCHEMA_VERSION:
            raise CacheMismatchError(f"cache at {path} has schema_version={sv}, this software "
                                     f"reads schema_version={SCHEMA_VERSION}; re-extract it")
        if not self.manifest.get("complete") and not allow_incomplete:
            raise IncompleteCacheError(
                f"cache at {path} is incomplete (extraction did not finish); re-run the extract "
                f"command to finish it, or pass allow_incomplete=True")
        self.layout = CacheLayout.from_dict(self.manifest["layout"])
        self.codec: FeatureCodec = get_codec(self.layout.codec)
        self.num_views = self.layout.num_views
        self._level_names = [n for n, _ in self.layout.all_levels]
        self._nf = len(self.layout.feature_levels)
        offs = np.cumsum([0] + [s.channels for _, s in self.layout.all_levels])
        self._chan_slices = [slice(int(a), int(b)) for a, b in zip(offs[:-1], offs[1:])]
        self._arrays: dict | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.layout.num_items

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None
        state["_pid"] = None
        return state

    def open_arrays(self) -> dict:
        """name -> zarr array, opened once per process."""
        pid = os.getpid()
        if self._arrays is None or self._pid != pid:
            storage.configure_zarr_threads()
            group = storage.open_group(self.path, "r", self.storage_options)
            self._arrays = {n: group[n] for n in self.layout.array_names()}
            self._pid = pid
        return self._arrays

    def provenance(self) -> dict:
        return dict(self.manifest.get("provenance") or {})

    # ---- reading
    def decode_level(self, stored: np.ndarray, params: np.ndarray | None, level_index: int) -> torch.Tensor:
        """Stored values of one level (index into layout.all_levels) -> float32 tensor;
        ``params``: the item's whole params row (int8 codec), sliced to that level here."""
        prm = None if params is None else torch.from_numpy(
            np.ascontiguousarray(params[..., self._chan_slices[level_index], :]))
        return self.codec.decode(stored_to_torch(stored), prm).contiguous()

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

    def _read(self, i: int) -> TeacherOutput:
        A = self.open_arrays()
        meta = ItemMeta.from_row(A["meta"][i])
        if not meta.written:
            raise IncompleteCacheError(f"item {i} of cache {self.path} was never written "
                                       f"(shard {i // self.layout.items_per_shard} not done)")
        reqs = [(A["rois"], i)]
        if self.codec.has_params:
            reqs.append((A["params"], i))
        for name, (h, w) in zip(self._level_names, meta.extents):
            reqs.append((A[name], (i, slice(None), slice(0, h), slice(0, w))))
        res = storage.get_many(reqs)
        rois = torch.from_numpy(np.ascontiguousarray(res[0]))
        params = res[1] if self.codec.has_params else None
        stored = res[2:] if self.codec.has_params else res[1:]
        levels = [self.decode_level(s, params, li) for li, s in enumerate(stored)]
        n, g = meta.n_proposals, meta.n_gt
        P = self.layout.max_proposals
        return TeacherOutput(
            image_index=meta.image_index,
            view_index=meta.view_index,
            image_size=meta.image_size,
            canvas_size=meta.canvas_size,
            features=levels[: self._nf],
            proposals=rois[:n, :4].clone(),
            objectness=rois[:n, 4].clone(),
            proposal_logits=rois[:n, 5:].clone(),
            gt_boxes=rois[P:P + g, :4].clone(),
            gt_logits=rois[P:P + g, 5:].clone(),
            backbone_features=levels[self._nf:] if self.layout.backbone_levels else None,
        )

    __getitem__ = read

    # ---- whole-cache checks
    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Read every item of every array of every shard (see verify.verify_cache)."""
        return verify_cache(self, progress)

    def inspect(self) -> dict:
        """Manifest, completeness, bytes per array and per item, level shapes (see inspection.py)."""
        return inspect_cache(self)
