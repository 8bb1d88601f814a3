"""What a cache holds and where: array shapes, the item-index rule, and the `meta` columns by name.

On-disk layout (a Zarr v3 group at the cache's path; N items, S = items_per_shard,
V = num_views; item ``item_index(image, view) = image * V + view``):

    zarr.json                      group; attributes["defeat_cache"] = manifest (manifest.py)
    features/<level>               [N, C, Hp, Wp] codec.stored_dtype, fill 0
    backbone/<stage>               [N, C, Hp, Wp] (only if layout.backbone_levels)
        inner chunks (1, C, th, tw): th = min(64, max_h) (tw likewise), Hp/Wp = max_h/max_w
        padded up to a multiple of th/tw; shards (S, C, Hp, Wp).  An item is written
        zero-padded beyond its own extent, so tiles fully outside it are fill, never stored.
        With a basis codec (compact) the channel axis holds the r stored components of the
        level's basis (`LevelSpec.stored_channels`), not its C channels.
    bases/features/<level>         [2 + r, C] float32 (basis codecs only; written once, before any
    bases/backbone/<stage>         shard): row 0 the mean, row 1 the variances of all C principal
                                   components, rows 2.. the r stored components (compact.py).
    params                         [N, sum(stored channels over all levels), P] float32 (codecs with
                                   params): int8 per channel [min, scale]; compact per component
                                   [step]; feature levels then backbone levels, in layout order.
    rois                           [N, P + G, 5 + K] float32 (logits_dtype float32) or
                                   [N, P + G, 5] (otherwise).  Rows 0..P-1: proposals
                                   [x1, y1, x2, y2, objectness, logits...]; rows P..P+G-1:
                                   gt boxes [x1, y1, x2, y2, 0, logits...].  Zero beyond
                                   n_proposals / n_gt.
    logits                         [N, P + G, K] logits_dtype (only when it is not float32):
                                   the logits columns of `rois`, same rows.
    meta                           [N, M] int64, columns ``meta_columns(layout)``:
                                   image_index, view_index, n_proposals, n_gt, image_h,
                                   image_w, canvas_h, canvas_w, then (h, w) per feature level,
                                   then (h, w) per backbone level (read and written through
                                   `ItemMeta`).  canvas_h == 0 means the item was never written.
    shard_done                     [num_shards] bool, chunk 1, unsharded: set only after
                                   every array of that shard is written.

All per-item arrays are chunked one item per chunk and sharded S items per shard, so a
shard is one file per array.  Every chunk carries a crc32c checksum (see codecs.py).

Schema versions: 1 had no bases, no `logits` array and no `stored_channels` / `codec_options` /
`logits_dtype` fields; version 2 added them with defaults that describe a version-1 cache
exactly, so both read the same way.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .codecs import get_codec

__all__ = ["SCHEMA_VERSION", "READABLE_SCHEMA_VERSIONS", "TILE", "LevelSpec", "CacheLayout", "ItemMeta", "META_FIXED", "meta_columns",
           "item_index", "image_view"]

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
TILE = 64  # inner chunk edge: an item's padding beyond its extent costs at most one tile per edge


def item_index(image: int, view: int, num_views: int) -> int:
    """The cache item of (image, view): all views of an image are neighbours."""
    return image * num_views + view


def image_view(item: int, num_views: int) -> tuple[int, int]:
    """(image, view) of a cache item; the inverse of `item_index`."""
    return divmod(item, num_views)


@dataclass(frozen=True)
class LevelSpec:
    name: str
    channels: int
    max_h: int
    max_w: int
    #: channels stored per item: the basis rank for basis codecs, else 0 (= channels)
    stored_channels: int = 0

    @property
    def stored(self) -> int:
        return self.stored_channels or self.channels

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
    #: the codec's settings (e.g. compact's step); empty for codecs without any
    codec_options: dict = dataclasses.field(default_factory=dict)
    #: dtype of the RoI logits (float32: inside `rois`; else a separate `logits` array)
    logits_dtype: str = "float32"
    # items are (image, view) pairs in `item_index` order; the writer checks every item's place.
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

    @property
    def total_stored_channels(self) -> int:
        """Rows of `params`: the stored channels of every level, in layout order."""
        return sum(l.stored for _, l in self.all_levels)

    @property
    def separate_logits(self) -> bool:
        return self.logits_dtype != "float32"

    def codec_object(self):
        """The feature codec with this layout's settings."""
        return get_codec(self.codec, self.codec_options)

    def basis_names(self) -> list[str]:
        """The basis array of each level (basis codecs only), in layout order."""
        return [f"bases/{n}" for n, _ in self.all_levels] if get_codec(self.codec).needs_basis else []

    def with_ranks(self, ranks: dict[str, int]) -> "CacheLayout":
        """This layout with each level's stored channels set (array name -> basis rank)."""
        def spec(name, l):
            return dataclasses.replace(l, stored_channels=int(ranks[name]))
        fl = [spec(f"features/{l.name}", l) for l in self.feature_levels]
        bl = [spec(f"backbone/{l.name}", l) for l in self.backbone_levels]
        return dataclasses.replace(self, feature_levels=fl, backbone_levels=bl)

    def item_index(self, image: int, view: int) -> int:
        return item_index(image, view, self.num_views)

    def image_view(self, item: int) -> tuple[int, int]:
        return image_view(item, self.num_views)

    def shard_items(self, shard_index: int) -> range:
        """The items of one shard (the last shard may be shorter)."""
        if not 0 <= shard_index < self.num_shards:
            raise IndexError(f"shard {shard_index} out of range [0, {self.num_shards})")
        S = self.items_per_shard
        return range(shard_index * S, min((shard_index + 1) * S, self.num_items))

    def array_names(self) -> list[str]:
        """Every array of the group, level arrays first."""
        names = [n for n, _ in self.all_levels] + self.basis_names()
        if get_codec(self.codec).has_params:
            names.append("params")
        names.append("rois")
        if self.separate_logits:
            names.append("logits")
        return names + ["meta", "shard_done"]

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
        try:
            self.codec_object()
        except ValueError as e:
            bad(str(e))
        if self.logits_dtype not in ("float32", "float16"):
            bad(f"logits_dtype={self.logits_dtype!r} must be float32 or float16")
        for kind, levels in (("feature", self.feature_levels), ("backbone", self.backbone_levels)):
            names = [l.name for l in levels]
            if len(set(names)) != len(names):
                bad(f"duplicate {kind} level names {names}")
            for l in levels:
                if not l.name or "/" in l.name or l.name.startswith("."):
                    bad(f"{kind} level name {l.name!r} is not a valid array name")
                if min(l.channels, l.max_h, l.max_w) < 1:
                    bad(f"{kind} level {l.name}: channels/max_h/max_w must be >= 1, got {l}")
                if not 0 <= l.stored_channels <= l.channels:
                    bad(f"{kind} level {l.name}: stored_channels={l.stored_channels} outside [0, {l.channels}]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheLayout":
        d = dict(d)
        d["feature_levels"] = [LevelSpec(**l) for l in d["feature_levels"]]
        d["backbone_levels"] = [LevelSpec(**l) for l in d.get("backbone_levels") or []]
        return cls(**d)


# --------------------------------------------------------------------------- meta columns
META_FIXED = (
    "image_index", "view_index", "n_proposals", "n_gt",
    "image_h", "image_w", "canvas_h", "canvas_w",
)


def meta_columns(layout: CacheLayout) -> list[str]:
    """The `meta` array's column names (stored in the manifest, so the file explains itself)."""
    cols = list(META_FIXED)
    for l in layout.feature_levels:
        cols += [f"{l.name}_h", f"{l.name}_w"]
    for l in layout.backbone_levels:
        cols += [f"backbone.{l.name}_h", f"backbone.{l.name}_w"]
    return cols


@dataclass(frozen=True)
class ItemMeta:
    """One item's row of `meta`, by name: the only code that knows the column order.

    ``extents``: the stored (h, w) of each level, in ``layout.all_levels`` order."""

    image_index: int
    view_index: int
    n_proposals: int
    n_gt: int
    image_size: tuple[int, int]
    canvas_size: tuple[int, int]
    extents: tuple[tuple[int, int], ...]

    @property
    def written(self) -> bool:
        """A row never written is all fill (0); a written item has a positive canvas."""
        return self.canvas_size[0] > 0

    def to_row(self) -> np.ndarray:
        named = {"image_index": self.image_index, "view_index": self.view_index,
                 "n_proposals": self.n_proposals, "n_gt": self.n_gt,
                 "image_h": self.image_size[0], "image_w": self.image_size[1],
                 "canvas_h": self.canvas_size[0], "canvas_w": self.canvas_size[1]}
        values = [named[c] for c in META_FIXED] + [v for hw in self.extents for v in hw]
        return np.asarray(values, np.int64)

    @classmethod
    def from_row(cls, row) -> "ItemMeta":
        values = [int(v) for v in np.asarray(row)]
        named = dict(zip(META_FIXED, values))
        hw = values[len(META_FIXED):]  # the per-level columns follow the fixed ones, (h, w) each
        return cls(image_index=named["image_index"], view_index=named["view_index"],
                   n_proposals=named["n_proposals"], n_gt=named["n_gt"],
                   image_size=(named["image_h"], named["image_w"]),
                   canvas_size=(named["canvas_h"], named["canvas_w"]),
                   extents=tuple(zip(hw[0::2], hw[1::2])))
