"""The teacher cache: a Zarr v3 group written shard by shard, read item by item.

One module per job: layout.py (what is stored where: shapes, the item-index rule, `meta`
columns; the on-disk layout is described there), codecs.py (feature value and byte codecs),
manifest.py (what a cache was made from), arrays.py (the arrays a layout implies, checked on
opening), storage.py (paths, URLs, zarr plumbing), target.py (what an extraction's --out may
hold), lock.py (one extraction job per cache; the lock itself is defeat_cache/locking.py),
writer.py (`CacheWriter`), reader.py (`TeacherCache`), verify.py and inspection.py (whole-
cache checks and sizes), errors.py (the cache's `UserError`s), codec_bench.py
(`measure_codec`), extract.py (stage 1: teacher -> cache; import it from there).
"""
from .codec_bench import measure_codec
from .errors import CacheError, CacheMismatchError, IncompleteCacheError, NonFiniteError, NotACacheError
from .layout import SCHEMA_VERSION, CacheLayout, ItemMeta, LevelSpec, image_view, item_index, meta_columns
from .manifest import MANIFEST_KEY
from .reader import TeacherCache
from .storage import configure_zarr_threads, is_url, parse_storage_options
from .verify import VerifyReport
from .writer import CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_KEY",
    "LevelSpec",
    "CacheLayout",
    "ItemMeta",
    "item_index",
    "image_view",
    "meta_columns",
    "CacheError",
    "CacheMismatchError",
    "NonFiniteError",
    "IncompleteCacheError",
    "NotACacheError",
    "VerifyReport",
    "CacheWriter",
    "TeacherCache",
    "measure_codec",
    "configure_zarr_threads",
    "is_url",
    "parse_storage_options",
]
