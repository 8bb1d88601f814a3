"""The teacher cache: a Zarr v3 group written shard by shard, read item by item.

On-disk layout (group at ``path``; N items, S = items_per_shard, item i = image i // V,
view i % V):

    zarr.json                      group; attributes["defeat_cache"] = manifest
    features/<level>               [N, C, Hp, Wp] codec.stored_dtype, fill 0
    backbone/<stage>               [N, C, Hp, Wp] (only if layout.backbone_levels)
        inner chunks (1, C, th, tw): th = min(64, max_h) (tw likewise), Hp/Wp = max_h/max_w
        padded up to a multiple of th/tw; shards (S, C, Hp, Wp).  An item is written
        zero-padded beyond its own extent, so tiles fully outside it are fill, never stored.
    params                         [N, sum(C over all levels), 2] float32 (int8 codec only):
                                   per channel [min, scale]; feature levels then backbone
                                   levels, in layout order.
    rois                           [N, P + G, 5 + K] float32.  Rows 0..P-1: proposals
                                   [x1, y1, x2, y2, objectness, logits...]; rows P..P+G-1:
                                   gt boxes [x1, y1, x2, y2, 0, logits...].  Zero beyond
                                   n_proposals / n_gt.
    meta                           [N, M] int64, columns ``meta_columns(layout)``:
                                   image_index, view_index, n_proposals, n_gt, image_h,
                                   image_w, canvas_h, canvas_w, then (h, w) per feature level,
                                   then (h, w) per backbone level.  canvas_h == 0 means the
                                   item was never written.
    shard_done                     [num_shards] bool, chunk 1, unsharded: set only after
                                   every array of that shard is written.

All per-item arrays are chunked one item per chunk and sharded S items per shard, so a
shard is one file per array.  Every chunk carries a crc32c checksum (see codecs.py).

Concurrency contract (DESIGN.md invariant 5 and the measured zarr facts): each shard is
written by exactly one process, in ONE assignment per array covering the whole shard
(``CacheWriter.write_shard``); zarr rewrites a whole shard on any chunk change, so two
writers on one shard lose data silently.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync as _zarr_sync

from .codecs import FeatureCodec, get_codec, small_array_compressors, stored_to_torch

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_KEY",
    "LevelSpec",
    "CacheLayout",
    "CacheItem",
    "CacheError",
    "CacheMismatchError",
    "NonFiniteError",
    "IncompleteCacheError",
    "NotACacheError",
    "VerifyReport",
    "CacheWriter",
    "TeacherCache",
    "meta_columns",
    "measure_codec",
    "configure_zarr_threads",
    "is_url",
    "parse_storage_options",
]

SCHEMA_VERSION = 1
MANIFEST_KEY = "defeat_cache"
TILE = 64
# manifest keys compared on resume / by the reader's callers; the rest (created time,
# complete flag, software version, derived descriptions) are volatile or derived.
COMPARED_KEYS = ("schema_version", "codec", "layout", "provenance")
META_FIXED = (
    "image_index", "view_index", "n_proposals", "n_gt",
    "image_h", "image_w", "canvas_h", "canvas_w",
)
_STALE_PARTIAL_S = 3600.0


# --------------------------------------------------------------------------- errors
class CacheError(Exception):
    """Base class of cache errors."""


class CacheMismatchError(CacheError):
    """The cache at a path was made with different provenance/layout than this run."""


class NonFiniteError(CacheError, ValueError):
    """A tensor to be cached holds NaN/Inf (or overflows the codec's stored dtype).

    `image_index`/`view_index` say which item, so callers can name the image to the user."""

    def __init__(self, message: str, image_index: int | None = None, view_index: int | None = None):
        super().__init__(message)
        self.image_index, self.view_index = image_index, view_index


class IncompleteCacheError(CacheError):
    """The cache (or the requested item) is not completely written."""


class NotACacheError(CacheError):
    """The path holds no defeat-cache cache."""


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class LevelSpec:
    name: str
    channels: int
    max_h: int
    max_w: int

    @property
    def tile(self) -> tuple[int, int]:
        return (min(TILE, self.max_h), min(TILE, self.max_w))

    @property
    def padded(self) -> tuple[int, int]:
        th, tw = self.tile
        return (math.ceil(self.max_h / th) * th, math.ceil(self.max_w / tw) * tw)


@dataclass
class CacheLayout:
    num_items: int
    items_per_shard: int
    feature_levels: list[LevelSpec]
    backbone_levels: list[LevelSpec]
    max_proposals: int
    max_gt: int
    num_logits: int
    codec: str
    # item i = (image i // num_views, view i % num_views); checked on write.
    num_views: int = 1

    def __post_init__(self) -> None:
        self.feature_levels = [l if isinstance(l, LevelSpec) else LevelSpec(**l) for l in self.feature_levels]
        self.backbone_levels = [l if isinstance(l, LevelSpec) else LevelSpec(**l) for l in self.backbone_levels or []]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.items_per_shard)

    @property
    def rows(self) -> int:
        return self.max_proposals + self.max_gt

    @property
    def all_levels(self) -> list[tuple[str, LevelSpec]]:
        """(array name, spec) for feature levels then backbone levels."""
        return [(f"features/{l.name}", l) for l in self.feature_levels] + [
            (f"backbone/{l.name}", l) for l in self.backbone_levels
        ]

    @property
    def total_channels(self) -> int:
        return sum(l.channels for _, l in self.all_levels)

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"invalid CacheLayout: {msg}")

        if self.num_items < 1:
            bad(f"num_items={self.num_items} must be >= 1")
        if self.items_per_shard < 1:
            bad(f"items_per_shard={self.items_per_shard} must be >= 1")
        if self.num_views < 1 or self.num_items % self.num_views:
            bad(f"num_items={self.num_items} must be a positive multiple of num_views={self.num_views}")
        if not self.feature_levels:
            bad("feature_levels is empty")
        # A teacher without an RoI head (RetinaNet) stores no proposals and no logits: both 0.
        no_roi_head = self.max_proposals == 0 and self.num_logits == 0
        if (not no_roi_head and (self.max_proposals < 1 or self.num_logits < 1)) or self.max_gt < 0:
            bad(f"max_proposals={self.max_proposals} (>=1), max_gt={self.max_gt} (>=0), "
                f"num_logits={self.num_logits} (>=1), or both 0 for a teacher without RoI head")
        get_codec(self.codec)
        for kind, levels in (("feature", self.feature_levels), ("backbone", self.backbone_levels)):
            names = [l.name for l in levels]
            if len(set(names)) != len(names):
                bad(f"duplicate {kind} level names {names}")
            for l in levels:
                if not l.name or "/" in l.name or l.name.startswith("."):
                    bad(f"{kind} level name {l.name!r} is not a valid array name")
                if min(l.channels, l.max_h, l.max_w) < 1:
                    bad(f"{kind} level {l.name}: channels/max_h/max_w must be >= 1, got {l}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheLayout":
        d = dict(d)
        d["feature_levels"] = [LevelSpec(**l) for l in d["feature_levels"]]
        d["backbone_levels"] = [LevelSpec(**l) for l in d.get("backbone_levels") or []]
        return cls(**d)


def meta_columns(layout: CacheLayout) -> list[str]:
    cols = list(META_FIXED)
    for l in layout.feature_levels:
        cols += [f"{l.name}_h", f"{l.name}_w"]
    for l in layout.backbone_levels:
        cols += [f"backbone.{l.name}_h", f"backbone.{l.name}_w"]
    return cols


@dataclass
class CacheItem:
    image_index: int
    view_index: int
    image_size: tuple[int, int]
    canvas_size: tuple[int, int]
    features: list[torch.Tensor]
    proposals: torch.Tensor
    objectness: torch.Tensor
    proposal_logits: torch.Tensor
    gt_boxes: torch.Tensor
    gt_logits: torch.Tensor
    backbone_features: list[torch.Tensor] | None = None


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_total: int = 0
    shards_done: int = 0
    items_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- zarr plumbing
def configure_zarr_threads(max_workers: int | None = None) -> None:
    """Cap zarr's per-process decode/IO thread pool.

    zarr sizes its pool from os.cpu_count() in *every* process; with several DataLoader
    workers per rank and several ranks per node that is hundreds of threads fighting over
    the same cores (and GIL-holding Python in each worker).  One item is only a handful of
    chunks, so a few threads per process already overlap IO with decode.  Only effective
    before zarr's first call in a process (zarr re-creates the pool after fork, so calling
    this in a DataLoader worker before its first read works).  An explicit user setting
    (zarr.config or DEFEAT_CACHE_ZARR_THREADS) wins.
    """
    if max_workers is None:
        if zarr.config.get("threading.max_workers", None) is not None:
            return
        env = os.environ.get("DEFEAT_CACHE_ZARR_THREADS")
        max_workers = int(env) if env else max(1, min(4, os.cpu_count() or 1))
    zarr.config.set({"threading.max_workers": int(max_workers)})


def is_url(path) -> bool:
    """True for fsspec URLs (s3://, gs://, memory://...); local folders are plain paths."""
    return "://" in str(path)


_SECRET_WORDS = ("key", "secret", "token", "password", "session", "credential")


def parse_storage_options(pairs: Sequence[str]) -> dict:
    """``["endpoint_url=http://host:9000", "client_kwargs.region_name=eu-west-1", "anon=true"]``
    -> fsspec storage options. true/false and numbers become booleans and numbers, except
    for keys that name a secret (key, secret, token, ...), which stay strings; dots in a key
    make nested dicts. Errors name the key, never the value (it may be a secret)."""
    options: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CacheError(f"--storage-option {key or '?'}: expected KEY=VALUE, "
                             "e.g. endpoint_url=http://127.0.0.1:9000")
        *parents, leaf = key.split(".")
        value: Any = raw
        if not any(w in leaf.lower() for w in _SECRET_WORDS):
            if raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            else:
                for number in (int, float):
                    try:
                        value = number(raw)
                        break
                    except ValueError:
                        pass
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CacheError(f"--storage-option {key}: {part!r} is already given a value")
        if isinstance(node.get(leaf), dict):
            raise CacheError(f"--storage-option {key}: already given as a group of options ({key}.*)")
        node[leaf] = value
    return options


def _url_holds_objects(path, storage_options: dict | None) -> bool:
    """Whether anything is stored under a URL prefix (an s3:// bucket or folder)."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    fs.invalidate_cache(root)  # fsspec instances are shared with zarr's store: no stale listing
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def _open_group(path, mode: str, storage_options: dict | None):
    kw = {"storage_options": storage_options} if storage_options else {}
    if storage_options and not is_url(path):
        raise CacheError(f"{path}: storage options apply to URLs (s3://...), not to local paths")
    try:
        return zarr.open_group(str(path) if isinstance(path, Path) else path, mode=mode, zarr_format=3, **kw)
    except (FileNotFoundError, CacheError):
        raise
    except ImportError as e:  # fsspec names the package a protocol needs (s3fs, gcsfs, ...)
        raise CacheError(f"{path}: {e}; install it in this environment "
                         "(for s3:// URLs: pip install 'defeat-cache[s3]')") from None
    except Exception as e:
        if not is_url(path):
            raise
        # Object-store client errors (unreachable endpoint, missing credentials, denied access)
        # come from whichever fsspec backend; they are the user's setup, not a bug of ours.
        raise CacheError(f"{path}: cannot open ({type(e).__name__}: {e}); check the URL, the credentials "
                         "(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint "
                         "(AWS_ENDPOINT_URL or --storage-option endpoint_url=...)") from None


async def _gather_get(reqs):
    return await asyncio.gather(*(arr.async_array.getitem(sel) for arr, sel in reqs))


async def _gather_set(reqs):
    await asyncio.gather(*(arr.async_array.setitem(sel, val) for arr, sel, val in reqs))


def _get_many(reqs: list) -> list:
    """Read several (array, selection) pairs in one zarr event-loop round trip."""
    return list(_zarr_sync(_gather_get(reqs)))


def _set_many(reqs: list) -> None:
    _zarr_sync(_gather_set(reqs))


def _jsonable(x: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(x, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _comparable(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in COMPARED_KEYS}


def _diff_message(path, stored: dict, ours: dict) -> str | None:
    def flat(m):
        c = _comparable(m)
        out = _flatten(c.get("provenance") or {})  # provenance keys shown bare: teacher=...
        for k in COMPARED_KEYS:
            if k != "provenance":
                out.update(_flatten({k: c[k]}))
        return out

    a, b = flat(stored), flat(ours)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    if not keys:
        return None
    fmt = lambda m: ", ".join(f"{k}={json.dumps(m.get(k, '<missing>'))}" for k in keys)  # noqa: E731
    return (f"cache at {path} was made with {fmt(a)}, this run has {fmt(b)}; "
            f"use a new --out or delete it")


def _local_root(group) -> Path | None:
    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return Path(store.root) / group.path if group.path else Path(store.root)
    return None


def _create_arrays(group, layout: CacheLayout) -> None:
    codec = get_codec(layout.codec)
    N, S = layout.num_items, layout.items_per_shard
    for name, spec in layout.all_levels:
        th, tw = spec.tile
        Hp, Wp = spec.padded
        C = spec.channels
        group.create_array(
            name, shape=(N, C, Hp, Wp), dtype=codec.stored_dtype, chunks=(1, C, th, tw),
            shards=(S, C, Hp, Wp), compressors=codec.compressors(), fill_value=0,
            dimension_names=("item", "channel", "y", "x"),
        )
    if codec.has_params:
        T = layout.total_channels
        group.create_array(
            "params", shape=(N, T, codec.params_per_channel), dtype="float32",
            chunks=(1, T, codec.params_per_channel), shards=(S, T, codec.params_per_channel),
            compressors=small_array_compressors(), fill_value=0.0,
        )
    R, F = layout.rows, 5 + layout.num_logits
    group.create_array("rois", shape=(N, R, F), dtype="float32", chunks=(1, R, F),
                       shards=(S, R, F), compressors=small_array_compressors(), fill_value=0.0)
    M = len(meta_columns(layout))
    group.create_array("meta", shape=(N, M), dtype="int64", chunks=(1, M), shards=(S, M),
                       compressors=small_array_compressors(), fill_value=0)
    group.create_array("shard_done", shape=(layout.num_shards,), dtype="bool", chunks=(1,),
                       compressors=[Crc32cCodec()], fill_value=False)


def _array_names(layout: CacheLayout) -> list[str]:
    names = [n for n, _ in layout.all_levels]
    if get_codec(layout.codec).has_params:
        names.append("params")
    return names + ["rois", "meta", "shard_done"]


def _software_version() -> str:
    try:
        from defeat_cache import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


# --------------------------------------------------------------------------- writer
class CacheWriter:
    """Creates or resumes a cache and writes it one whole shard at a time."""

    def __init__(self, path, group, layout: CacheLayout, storage_options: dict | None = None):
        self.path = path
        self.layout = layout
        self.codec: FeatureCodec = get_codec(layout.codec)
        self._storage_options = storage_options
        self._group = group
        self._arrays = {name: group[name] for name in _array_names(layout)}
        self._meta_cols = meta_columns(layout)

    # ---- construction
    @classmethod
    def create_or_resume(cls, path, provenance: dict, layout: CacheLayout, create: bool = True,
                         storage_options: dict | None = None) -> "CacheWriter":
        """New path: create group, arrays and manifest (complete=False).  Existing cache:
        refuse with CacheMismatchError if provenance/layout/codec/schema differ, else resume.
        ``create=False`` only opens an existing cache (non-zero ranks, after rank 0 made it)."""
        configure_zarr_threads()
        layout.validate()
        ours = {
            "schema_version": SCHEMA_VERSION,
            "codec": layout.codec,
            "layout": _jsonable(layout.to_dict(), "layout"),
            "provenance": _jsonable(provenance, "provenance"),
        }
        try:
            group = _open_group(path, "r+", storage_options)
        except FileNotFoundError:
            group = None

        interrupted = False
        if group is not None and MANIFEST_KEY not in group.attrs:
            members = set(_array_names(layout)) | {"features", "backbone"}
            found = set(group.keys())
            if create and found <= members:
                group, interrupted = None, True  # creation was interrupted before the manifest: start over
            else:
                raise NotACacheError(
                    f"{path} is a zarr group without a defeat-cache manifest "
                    f"(members {sorted(found)}); use a new --out or delete it")

        if group is None:
            if not create:
                raise NotACacheError(f"no cache at {path} (the creating rank must create it first)")
            # zarr's mode "w" deletes everything under the path: only ever on our own leftovers
            if is_url(path):
                if not interrupted and _url_holds_objects(path, storage_options):
                    raise NotACacheError(f"{path} already holds objects and is not a defeat-cache cache; "
                                         f"use a new, empty --out prefix")
            elif isinstance(path, (str, Path)):
                p = Path(path)
                if p.exists() and (not p.is_dir() or any(x.name != "zarr.json" for x in p.iterdir())):
                    if not (p / "zarr.json").exists():
                        raise NotACacheError(f"{path} exists and is not a defeat-cache cache; "
                                             f"use a new --out or delete it")
            group = _open_group(path, "w", storage_options)
            _create_arrays(group, layout)
            manifest = dict(ours)
            manifest.update({
                "complete": False,
                "created": _now(),
                "software_version": _software_version(),
                "meta_columns": meta_columns(layout),
                "rois_columns": ["x1", "y1", "x2", "y2", "objectness", "logits..."],
                "feature_compressors": _jsonable(get_codec(layout.codec).describe_compressors(), "compressors"),
            })
            group.attrs[MANIFEST_KEY] = manifest  # written last: its presence = arrays exist
            return cls(path, group, layout, storage_options)

        stored = dict(group.attrs[MANIFEST_KEY])
        msg = _diff_message(path, stored, ours)
        if msg:
            raise CacheMismatchError(msg)
        writer = cls(path, group, layout, storage_options)
        if create:
            writer._remove_stale_partials()
        return writer

    # ---- state
    def _fresh_group(self):
        return _open_group(self.path, "r", self._storage_options)

    @property
    def manifest(self) -> dict:
        return dict(self._fresh_group().attrs[MANIFEST_KEY])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    def shard_items(self, shard_index: int) -> range:
        if not 0 <= shard_index < self.layout.num_shards:
            raise IndexError(f"shard {shard_index} out of range [0, {self.layout.num_shards})")
        S = self.layout.items_per_shard
        return range(shard_index * S, min((shard_index + 1) * S, self.layout.num_items))

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._arrays["shard_done"][:], dtype=bool)

    def pending_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done_mask())]

    def mark_complete(self) -> bool:
        """Set complete=True in the manifest iff every shard is done; return it."""
        if not self.done_mask().all():
            return False
        group = _open_group(self.path, "r+", self._storage_options)
        manifest = dict(group.attrs[MANIFEST_KEY])
        if not manifest.get("complete"):
            manifest["complete"] = True
            manifest["completed"] = _now()
            group.attrs[MANIFEST_KEY] = manifest
        return True

    def _remove_stale_partials(self) -> None:
        """Remove ``*.partial`` files a killed writer left (local stores only).  Only old
        ones: a fresh one may belong to a writer still running elsewhere."""
        root = _local_root(self._group)
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
    def _prepare_item(self, i: int, item: CacheItem) -> dict:
        L = self.layout
        who = f"item {i} (image_index={item.image_index}, view={item.view_index})"
        exp = divmod(i, L.num_views)
        if (int(item.image_index), int(item.view_index)) != exp:
            raise ValueError(f"{who}: expected image_index={exp[0]}, view={exp[1]} at this "
                             f"position (item i = image i // {L.num_views}, view i % {L.num_views})")
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

        meta = [exp[0], exp[1], n, g, h, w, H, W]
        for a in feats + bb:
            meta += [a.shape[1], a.shape[2]]
        rois = np.zeros((L.rows, 5 + K), np.float32)
        rois[:n, :4] = props
        rois[:n, 4] = obj
        rois[:n, 5:] = plog
        P = L.max_proposals
        rois[P:P + g, :4] = gt
        rois[P:P + g, 5:] = glog
        return {"levels": feats + bb, "meta": np.asarray(meta, np.int64), "rois": rois}

    def write_shard(self, shard_index: int, items: Sequence[CacheItem]) -> None:
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

        params = np.zeros((B, L.total_channels, codec.params_per_channel), np.float32) if codec.has_params else None
        c0 = 0
        for li, (name, spec) in enumerate(L.all_levels):
            Hp, Wp = spec.padded
            buf = np.zeros((B, spec.channels, Hp, Wp), dtype=codec.stored_dtype)
            for b, p in enumerate(prepared):
                x = p["levels"][li]
                stored, prm = codec.encode(x[None])
                if not codec.stored_finite(stored):
                    raise NonFiniteError(f"item {rng.start + b}: {name} does not fit codec {codec.name}")
                buf[b, :, : x.shape[1], : x.shape[2]] = stored[0]
                if params is not None:
                    params[b, c0:c0 + spec.channels] = prm[0]
            c0 += spec.channels
            self._arrays[name][sel] = buf  # one assignment = one shard rewrite
            del buf
        small = [
            (self._arrays["rois"], sel, np.stack([p["rois"] for p in prepared])),
            (self._arrays["meta"], sel, np.stack([p["meta"] for p in prepared])),
        ]
        if params is not None:
            small.append((self._arrays["params"], sel, params))
        _set_many(small)
        self._arrays["shard_done"][shard_index] = True


# --------------------------------------------------------------------------- reader
class TeacherCache:
    """Read-only view of a cache.  Picklable and fork-safe: zarr arrays are opened lazily
    in each process (re-opened when the pid changes, e.g. in DataLoader workers)."""

    def __init__(self, path, storage_options: dict | None = None, allow_incomplete: bool = False):
        configure_zarr_threads()
        self.path = path
        self.storage_options = storage_options
        try:
            group = _open_group(path, "r", storage_options)
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

    def _open(self) -> dict:
        pid = os.getpid()
        if self._arrays is None or self._pid != pid:
            configure_zarr_threads()
            group = _open_group(self.path, "r", self.storage_options)
            self._arrays = {n: group[n] for n in _array_names(self.layout)}
            self._pid = pid
        return self._arrays

    def provenance(self) -> dict:
        return dict(self.manifest.get("provenance") or {})

    # ---- reading
    def _decode(self, stored: np.ndarray, params: np.ndarray | None, li: int) -> torch.Tensor:
        prm = None if params is None else torch.from_numpy(np.ascontiguousarray(params[..., self._chan_slices[li], :]))
        return self.codec.decode(stored_to_torch(stored), prm).contiguous()

    def read(self, item_index: int) -> CacheItem:
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

    def _read(self, item_index: int) -> CacheItem:
        A = self._open()
        i = item_index
        meta = np.asarray(A["meta"][i])
        if meta[6] <= 0:
            raise IncompleteCacheError(f"item {i} of cache {self.path} was never written "
                                       f"(shard {i // self.layout.items_per_shard} not done)")
        ext = meta[len(META_FIXED):].reshape(-1, 2)
        reqs = [(A["rois"], i)]
        if self.codec.has_params:
            reqs.append((A["params"], i))
        for li, name in enumerate(self._level_names):
            h, w = int(ext[li, 0]), int(ext[li, 1])
            reqs.append((A[name], (i, slice(None), slice(0, h), slice(0, w))))
        res = _get_many(reqs)
        rois = torch.from_numpy(np.ascontiguousarray(res[0]))
        params = res[1] if self.codec.has_params else None
        stored = res[2:] if self.codec.has_params else res[1:]
        levels = [self._decode(s, params, li) for li, s in enumerate(stored)]
        n, g = int(meta[2]), int(meta[3])
        P = self.layout.max_proposals
        return CacheItem(
            image_index=int(meta[0]),
            view_index=int(meta[1]),
            image_size=(int(meta[4]), int(meta[5])),
            canvas_size=(int(meta[6]), int(meta[7])),
            features=levels[: self._nf],
            proposals=rois[:n, :4].clone(),
            objectness=rois[:n, 4].clone(),
            proposal_logits=rois[:n, 5:].clone(),
            gt_boxes=rois[P:P + g, :4].clone(),
            gt_logits=rois[P:P + g, 5:].clone(),
            backbone_features=levels[self._nf:] if self.layout.backbone_levels else None,
        )

    __getitem__ = read

    # ---- verification
    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Read every item of every array of every shard: checksum failures, non-finite
        values, inconsistent metadata, missing shards/shard files.  ``progress(done, total)``
        is called after each shard."""
        A = self._open()
        L = self.layout
        rep = VerifyReport(shards_total=L.num_shards)
        try:
            done = np.asarray(A["shard_done"][:], dtype=bool)
        except Exception as e:
            rep.problems.append(f"shard_done markers unreadable: {type(e).__name__}: {e}")
            done = np.zeros(L.num_shards, bool)
        S = L.items_per_shard
        cols = len(META_FIXED)
        store = A["meta"].store
        for s in range(L.num_shards):
            rng = range(s * S, min((s + 1) * S, L.num_items))
            if not done[s]:
                rep.problems.append(f"shard {s} (items {rng.start}..{rng.stop - 1}) missing: not marked done")
                if progress:
                    progress(s + 1, L.num_shards)
                continue
            rep.shards_done += 1
            for name in _array_names(L):
                if name == "shard_done":
                    continue
                arr = A[name]
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))}"
                # rois/params of a shard can legitimately be all fill (no boxes); meta never is,
                # and all-zero teacher features for a whole shard would be a problem anyway.
                if name in ("rois", "params") or _zarr_sync(store.exists(key)):
                    continue
                hint = "" if name == "meta" else " (or every value in it is zero)"
                rep.problems.append(f"shard {s}: {name} shard file {key} missing{hint}")
            sel = slice(rng.start, rng.stop)

            def read_checked(name, per_item_sel=lambda i: i):
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

            meta = read_checked("meta")
            rois = read_checked("rois")
            params = read_checked("params") if self.codec.has_params else None
            for b, i in enumerate(rng):
                m = meta[b]
                who = f"shard {s} item {i}"
                if m[6] <= 0:
                    rep.problems.append(f"{who}: meta missing (item never written)")
                    continue
                if (m[0], m[1]) != divmod(i, L.num_views):
                    rep.problems.append(f"{who}: meta says image {m[0]} view {m[1]}, expected {divmod(i, L.num_views)}")
                if not (0 <= m[2] <= L.max_proposals and 0 <= m[3] <= L.max_gt):
                    rep.problems.append(f"{who}: n_proposals={m[2]} / n_gt={m[3]} out of range")
                ext = m[cols:].reshape(-1, 2)
                for (name, spec), (h, w) in zip(L.all_levels, ext):
                    if not (0 < h <= spec.max_h and 0 < w <= spec.max_w):
                        rep.problems.append(f"{who}: {name} extent {(int(h), int(w))} out of range")
                if not np.isfinite(rois[b]).all():
                    rep.problems.append(f"{who}: rois hold non-finite values")
                if params is not None and not np.isfinite(params[b]).all():
                    rep.problems.append(f"{who}: params hold non-finite values")
            for li, (name, spec) in enumerate(L.all_levels):
                stored = read_checked(name)
                for b, i in enumerate(rng):
                    h, w = (int(v) for v in meta[b, cols + 2 * li: cols + 2 * li + 2])
                    if h <= 0 or w <= 0:
                        continue
                    x = self._decode(stored[b, :, :h, :w], None if params is None else params[b], li)
                    if not torch.isfinite(x).all():
                        rep.problems.append(f"shard {s} item {i}: {name} holds non-finite values")
            rep.items_checked += len(rng)
            if progress:
                progress(s + 1, L.num_shards)
        if self.manifest.get("complete") and not done.all():
            rep.problems.append("manifest says complete but some shards are not marked done")
        return rep

    # ---- inspection
    def inspect(self) -> dict:
        A = self._open()
        L = self.layout
        done = np.asarray(A["shard_done"][:], dtype=bool)
        S = L.items_per_shard
        items_done = int(sum(min((s + 1) * S, L.num_items) - s * S for s in np.flatnonzero(done)))
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
            "path": str(self.path),
            "manifest": self.manifest,
            "codec": L.codec,
            "complete": bool(self.manifest.get("complete")),
            "items_total": L.num_items,
            "items_done": items_done,
            "shards_total": L.num_shards,
            "shards_done": int(done.sum()),
            "arrays": arrays,
            "bytes_total": total,
            "bytes_per_item": (total / items_done) if items_done else None,
            "feature_bytes_per_item": (feature_bytes / items_done) if items_done else None,
            "levels": {
                name: {"channels": spec.channels, "max_hw": [spec.max_h, spec.max_w],
                       "padded_hw": list(spec.padded), "tile": list(spec.tile)}
                for name, spec in L.all_levels
            },
        }
        root = None
        try:
            root = _local_root(_open_group(self.path, "r", self.storage_options))
        except Exception:
            pass
        if root is not None:
            out["partial_files"] = sum(1 for _ in root.rglob("*.partial"))
        return out


# --------------------------------------------------------------------------- benchmarks
def measure_codec(codec_name: str, features: list[np.ndarray], repeats: int = 3) -> dict:
    """Size / error / speed of one codec on one or more items' features.

    ``features``: per level, float32 [C, h, w] (one item) or [B, C, h, w] (B items, all at
    their own full extent).  Written through zarr with the cache's real chunking and byte
    codecs into an in-memory store.  Returns bytes per item (features + int8 params, after
    compression), raw fp32 bytes per item, relative L2 error per level, and encode/decode
    throughput in MB/s of float32 values (single process, zarr + codec)."""
    configure_zarr_threads()
    codec = get_codec(codec_name)
    feats = [np.asarray(f, np.float32) for f in features]
    feats = [f[None] if f.ndim == 3 else f for f in feats]
    B = feats[0].shape[0]
    if any(f.shape[0] != B for f in feats):
        raise ValueError("every level needs the same number of items")
    specs = [LevelSpec(f"l{i}", f.shape[1], f.shape[2], f.shape[3]) for i, f in enumerate(feats)]
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    raw = sum(f.nbytes for f in feats)
    arrays, params_arr = [], None
    for spec in specs:
        th, tw = spec.tile
        Hp, Wp = spec.padded
        arrays.append(group.create_array(
            spec.name, shape=(B, spec.channels, Hp, Wp), dtype=codec.stored_dtype,
            chunks=(1, spec.channels, th, tw), shards=(B, spec.channels, Hp, Wp),
            compressors=codec.compressors(), fill_value=0))
    if codec.has_params:
        T = sum(s.channels for s in specs)
        params_arr = group.create_array("params", shape=(B, T, 2), dtype="float32", chunks=(1, T, 2),
                                        shards=(B, T, 2), compressors=small_array_compressors())

    def write():
        prm_all = []
        for f, spec, arr in zip(feats, specs, arrays):
            Hp, Wp = spec.padded
            stored, prm = codec.encode(f)
            buf = np.zeros((B, spec.channels, Hp, Wp), codec.stored_dtype)
            buf[:, :, : f.shape[2], : f.shape[3]] = stored
            arr[:] = buf
            prm_all.append(prm)
        if params_arr is not None:
            params_arr[:] = np.concatenate(prm_all, axis=1)

    def read():
        prm = None if params_arr is None else params_arr[:]
        out, c0 = [], 0
        for f, arr in zip(feats, arrays):
            C = f.shape[1]
            st = arr[:, :, : f.shape[2], : f.shape[3]]
            p = None if prm is None else torch.from_numpy(np.ascontiguousarray(prm[:, c0:c0 + C]))
            out.append(codec.decode(stored_to_torch(st), p))
            c0 += C
        return out

    t_enc = min(_timed(write) for _ in range(repeats))
    t_dec, decoded = min((_timed_ret(read) for _ in range(repeats)), key=lambda x: x[0])
    nbytes = sum(int(a.nbytes_stored()) for a in arrays)
    nbytes += int(params_arr.nbytes_stored()) if params_arr is not None else 0
    errs = {}
    for spec, f, d in zip(specs, feats, decoded):
        ref = torch.from_numpy(f).double()
        errs[spec.name] = float(torch.linalg.vector_norm(d.double() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    return {
        "codec": codec_name,
        "items": B,
        "bytes_per_item": nbytes / B,
        "fp32_bytes_per_item": raw / B,
        "ratio_vs_fp32": nbytes / raw,
        "rel_l2_error": errs,
        "max_rel_l2_error": max(errs.values()),
        "encode_MBps": raw / t_enc / 1e6,
        "decode_MBps": raw / t_dec / 1e6,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_ret(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r
