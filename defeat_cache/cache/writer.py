"""Writing a cache: create it (or resume one), then write it one whole shard at a time.

Concurrency contract (docs/design.md, invariant 5 and Zarr facts (measured)): each shard is
written by exactly one process, in ONE assignment per array covering the whole shard
(``CacheWriter.write_shard``); zarr rewrites a whole shard on any chunk change, so two
writers on one shard lose data silently.  The arrays are laid out as layout.py describes.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from zarr.codecs import Crc32cCodec

from ..models.teacher import TeacherOutput
from . import storage
from .arrays import array_specs, open_checked_arrays, read_shard_done
from .codecs import FeatureCodec, small_array_compressors
from .compact import LevelBasis
from .errors import CacheError, CacheMismatchError, NonFiniteError, NotACacheError
from .layout import CacheLayout, ItemMeta
from .manifest import CREATING_KEY, MANIFEST_KEY, comparable_part, mismatch_message, new_manifest, now, read_manifest
from .reader import read_bases
from .target import MEMBER_NAMES, OutState, probe_out

__all__ = ["CacheWriter"]

_STALE_PARTIAL_S = 3600.0


def _create_arrays(group, layout: CacheLayout, bases: dict | None = None) -> None:
    codec = layout.codec_object()
    specs = array_specs(layout)
    for name, _ in layout.all_levels:
        sp = specs[name]
        group.create_array(
            name, shape=sp.shape, dtype=sp.dtype, chunks=sp.chunks, shards=sp.shards, serializer=codec.serializer(),
            compressors=codec.compressors(), fill_value=0, dimension_names=("item", "channel", "y", "x"),
        )
    for name in layout.basis_names():  # side data, written once here, before any shard
        sp = specs[name]
        arr = group.create_array(name, shape=sp.shape, dtype=sp.dtype, chunks=sp.chunks,
                                 compressors=small_array_compressors(), fill_value=0.0)
        arr[:] = bases[name[len("bases/"):]].to_array()
    for name in ("params", "rois", "logits", "meta"):
        if name in specs:
            sp = specs[name]
            group.create_array(name, shape=sp.shape, dtype=sp.dtype, chunks=sp.chunks, shards=sp.shards,
                               compressors=small_array_compressors(), fill_value=0)
    sp = specs["shard_done"]
    group.create_array("shard_done", shape=sp.shape, dtype=sp.dtype, chunks=sp.chunks,
                       compressors=[Crc32cCodec()], fill_value=False)


def _to_numpy(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what}: expected a numeric tensor, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


class CacheWriter:
    """Creates or resumes a cache and writes it one whole shard at a time."""

    def __init__(self, path, group, layout: CacheLayout, storage_options: dict | None = None):
        self.path = path
        self.layout = layout
        self.codec: FeatureCodec = layout.codec_object()
        self._storage_options = storage_options
        self._group = group
        self._arrays = open_checked_arrays(group, layout, path)
        self.bases: dict[str, LevelBasis] = read_bases(group, layout)

    # ---- construction
    @classmethod
    def create_or_resume(cls, path, provenance: dict, layout: CacheLayout, create: bool = True,
                         storage_options: dict | None = None,
                         fit_bases: Callable[[], dict[str, LevelBasis]] | None = None) -> "CacheWriter":
        """Nothing at path (or our own interrupted creation): create group, arrays and manifest
        (complete=False).  Existing cache: refuse with CacheMismatchError if provenance/layout/
        codec/schema differ, else resume.  Anything else at path is refused (target.py).
        ``create=False`` only opens an existing cache (non-zero ranks, after rank 0 made it).
        Basis codecs: ``fit_bases()`` (level array name -> LevelBasis) is called only when the
        cache is created; the bases and their ranks are stored before any shard, and a resumed
        or other-rank writer reads them back, so every shard uses the same ones.
        Extraction calls this holding the cache's lock (lock.py): one creator at a time."""
        storage.configure_zarr_threads()
        layout.validate()
        state = probe_out(path, storage_options)
        if state.kind != "cache":
            if not create:
                raise NotACacheError(f"no cache at {path} (the creating rank must create it first)")
            return cls._create(path, provenance, layout, storage_options, fit_bases, state)
        stored, stored_layout = read_manifest(state.attrs, path)
        msg = mismatch_message(path, stored, comparable_part(layout, provenance))
        if msg:
            raise CacheMismatchError(msg)
        # the stored layout: the same as ours but for the basis ranks fitted at creation
        writer = cls(path, storage.open_group(path, "r+", storage_options), stored_layout, storage_options)
        if create:
            writer._remove_stale_partials()
        return writer

    @classmethod
    def _create(cls, path, provenance: dict, layout: CacheLayout, storage_options: dict | None,
                fit_bases, state: OutState) -> "CacheWriter":
        bases = None
        if layout.codec_object().needs_basis:
            if fit_bases is None:
                raise ValueError(f"codec {layout.codec} needs fit_bases to create a cache")
            bases = fit_bases()
            layout = layout.with_ranks({name: bases[name].rank for name, _ in layout.all_levels})
        # The creation marker is the first thing written: whatever a crash leaves from here on
        # is recognisably ours (target.py), so the next run may clear it and start over.
        marker = {CREATING_KEY: {"started": now()}}
        if state.kind == "interrupted":
            group = storage.open_group(path, "r+", storage_options)
            storage.delete_members(group, sorted(MEMBER_NAMES))
            group.attrs.put(marker)
        else:
            group = storage.create_group(path, marker, storage_options)
        _create_arrays(group, layout, bases)
        # one write replaces the marker by the manifest: its presence = all arrays exist
        group.attrs.put({MANIFEST_KEY: new_manifest(layout, provenance)})
        return cls(path, group, layout, storage_options)

    # ---- state
    def _fresh_group(self):
        return storage.open_group(self.path, "r", self._storage_options)

    @property
    def manifest(self) -> dict:
        return dict(self._fresh_group().attrs[MANIFEST_KEY])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    def shard_items(self, shard_index: int) -> range:
        return self.layout.shard_items(shard_index)

    def done_mask(self) -> np.ndarray:
        return read_shard_done(self._arrays["shard_done"], self.path)

    def pending_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done_mask())]

    def mark_complete(self) -> bool:
        """Set complete=True in the manifest iff every shard is done; return it."""
        if not self.done_mask().all():
            return False
        group = storage.open_group(self.path, "r+", self._storage_options)
        manifest = dict(group.attrs[MANIFEST_KEY])
        if not manifest.get("complete"):
            manifest["complete"] = True
            manifest["completed"] = now()
            group.attrs[MANIFEST_KEY] = manifest
        return True

    def _remove_stale_partials(self) -> None:
        """Remove ``*.partial`` files a killed writer left (local stores only).  Only old
        ones: a fresh one may belong to a writer still running elsewhere."""
        root = storage.local_root(self._group)
        if root is None:
            return
        cutoff = time.time() - _STALE_PARTIAL_S
        for p in root.rglob("*.partial"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except OSError:
                pass

    # ---- writing
    def _prepare_item(self, i: int, item: TeacherOutput) -> dict:
        """Check one item against the layout (place, shapes, finiteness, codec range) and
        pack its small arrays; raises before anything of the shard is written."""
        L = self.layout
        identity = (item.image_index, item.view_index, item.image_size, item.canvas_size)
        if any(v is None for v in identity):
            raise ValueError(f"item {i}: image_index, view_index, image_size and canvas_size must be set "
                             f"(got {identity}); extraction sets them with dataclasses.replace")
        who = f"item {i} (image_index={item.image_index}, view={item.view_index})"
        exp = L.image_view(i)
        if (int(item.image_index), int(item.view_index)) != exp:
            raise ValueError(f"{who}: expected image_index={exp[0]}, view={exp[1]} at this "
                             f"position (item = image * {L.num_views} + view)")
        h, w = (int(v) for v in item.image_size)
        H, W = (int(v) for v in item.canvas_size)
        if not (0 < h <= H and 0 < w <= W):
            raise ValueError(f"{who}: image_size {(h, w)} must be positive and within canvas_size {(H, W)}")

        def arr(x, name, shape):
            a = _to_numpy(x, f"{who} {name}")
            if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
                want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"{who}: {name} has shape {list(a.shape)}, expected {want}")
            bad = ~np.isfinite(a)
            if bad.any():
                raise NonFiniteError(f"{who}: {name} holds {int(bad.sum())} non-finite value(s) "
                                     f"(NaN/Inf); refusing to cache it", int(item.image_index), int(item.view_index))
            return a

        def levels(tensors, specs, kind):
            if len(tensors) != len(specs):
                raise ValueError(f"{who}: {len(tensors)} {kind} tensors, layout has {len(specs)} levels")
            out = []
            for t, spec in zip(tensors, specs):
                name = f"{kind}[{spec.name}]"
                a = arr(t, name, (spec.channels, None, None))
                hl, wl = a.shape[1:]
                if not (0 < hl <= spec.max_h and 0 < wl <= spec.max_w):
                    raise ValueError(f"{who}: {name} extent {(hl, wl)} outside layout max "
                                     f"{(spec.max_h, spec.max_w)}")
                if float(np.abs(a).max(initial=0.0)) > self.codec.max_abs:
                    raise NonFiniteError(f"{who}: {name} has |values| up to {float(np.abs(a).max()):.4g}, "
                                         f"which overflow codec {self.codec.name} (max {self.codec.max_abs:g})",
                                         int(item.image_index), int(item.view_index))
                out.append(a)
            return out

        feats = levels(item.features, L.feature_levels, "features")
        if L.backbone_levels:
            if item.backbone_features is None:
                raise ValueError(f"{who}: backbone_features missing; the layout has backbone levels")
            bb = levels(item.backbone_features, L.backbone_levels, "backbone_features")
        else:
            if item.backbone_features:
                raise ValueError(f"{who}: backbone_features given but the layout has no backbone levels")
            bb = []
        K = L.num_logits
        props = arr(item.proposals, "proposals", (None, 4))
        n = props.shape[0]
        if n > L.max_proposals:
            raise ValueError(f"{who}: {n} proposals > max_proposals={L.max_proposals}")
        obj = arr(item.objectness, "objectness", (n,))
        plog = arr(item.proposal_logits, "proposal_logits", (n, K))
        gt = arr(item.gt_boxes, "gt_boxes", (None, 4))
        g = gt.shape[0]
        if g > L.max_gt:
            raise ValueError(f"{who}: {g} gt boxes > max_gt={L.max_gt}")
        glog = arr(item.gt_logits, "gt_logits", (g, K))
        if self.codec.box_quantum:
            q = self.codec.box_quantum
            props, gt = np.round(props / q) * q, np.round(gt / q) * q
        if L.separate_logits:
            top = float(np.finfo(L.logits_dtype).max)
            for name, lg in (("proposal_logits", plog), ("gt_logits", glog)):
                if lg.size and float(np.abs(lg).max()) > top:
                    raise NonFiniteError(f"{who}: {name} has |values| up to {float(np.abs(lg).max()):.4g}, which "
                                         f"overflow {L.logits_dtype} (max {top:g})",
                                         int(item.image_index), int(item.view_index))

        meta = ItemMeta(image_index=exp[0], view_index=exp[1], n_proposals=n, n_gt=g, image_size=(h, w),
                        canvas_size=(H, W), extents=tuple((a.shape[1], a.shape[2]) for a in feats + bb))
        rois = np.zeros((L.rows, 5 + K), np.float32)
        rois[:n, :4] = props
        rois[:n, 4] = obj
        rois[:n, 5:] = plog
        P = L.max_proposals
        rois[P:P + g, :4] = gt
        rois[P:P + g, 5:] = glog
        return {"levels": feats + bb, "meta": meta.to_row(), "rois": rois}

    def write_shard(self, shard_index: int, items: Sequence[TeacherOutput]) -> None:
        """Validate all items of the shard, write each array in one whole-shard assignment,
        then mark the shard done.  Raises NonFiniteError / ValueError before writing anything."""
        rng = self.shard_items(shard_index)
        if len(items) != len(rng):
            raise ValueError(f"shard {shard_index} holds items {rng.start}..{rng.stop - 1} "
                             f"({len(rng)} items), got {len(items)}")
        if self.complete:
            raise CacheError(f"cache at {self.path} is complete and immutable; refusing to write")
        if bool(self._arrays["shard_done"][shard_index]):
            raise CacheError(f"shard {shard_index} of {self.path} is already written")
        prepared = [self._prepare_item(i, it) for i, it in zip(rng, items)]
        B, L, codec = len(rng), self.layout, self.codec
        sel = slice(rng.start, rng.stop)

        params = np.zeros((B, L.total_stored_channels, codec.params_per_channel), np.float32) \
            if codec.has_params else None
        c0 = 0
        for li, (name, spec) in enumerate(L.all_levels):
            Hp, Wp = spec.padded
            buf = np.zeros((B, spec.stored, Hp, Wp), dtype=codec.stored_dtype)
            for b, p in enumerate(prepared):
                x = p["levels"][li]
                stored, prm = codec.encode(x[None], basis=self.bases.get(name))
                if not codec.stored_finite(stored):
                    raise NonFiniteError(f"item {rng.start + b}: {name} does not fit codec {codec.name}")
                buf[b, :, : x.shape[1], : x.shape[2]] = stored[0]
                if params is not None:
                    params[b, c0:c0 + spec.stored] = prm[0]
            c0 += spec.stored
            self._arrays[name][sel] = buf  # one assignment = one shard rewrite
            del buf
        rois = np.stack([p["rois"] for p in prepared])
        small = [(self._arrays["meta"], sel, np.stack([p["meta"] for p in prepared]))]
        if L.separate_logits:
            small += [(self._arrays["rois"], sel, np.ascontiguousarray(rois[..., :5])),
                      (self._arrays["logits"], sel, rois[..., 5:].astype(L.logits_dtype))]
        else:
            small.append((self._arrays["rois"], sel, rois))
        if params is not None:
            small.append((self._arrays["params"], sel, params))
        storage.set_many(small)
        self._arrays["shard_done"][shard_index] = True
