"""The manifest: the group attribute that says what a cache is and what it was made from.

It is written last when a cache is created (its presence means the arrays exist; until then the
group holds a creation marker, `CREATING_KEY`), compared with the current run's on resume
(`mismatch_message`), and marked complete at the end. `read_manifest` checks it is one.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from .errors import DAMAGED, CacheError
from .layout import SCHEMA_VERSION, CacheLayout, meta_columns

__all__ = ["MANIFEST_KEY", "CREATING_KEY", "COMPARED_KEYS", "comparable_part", "new_manifest", "mismatch_message",
           "now", "read_manifest"]

MANIFEST_KEY = "defeat_cache"
# Written (alone) into the group's zarr.json before anything else of a new cache, replaced by the
# manifest in one write once the arrays exist: a group holding it is our own interrupted
# creation, which a new extraction may clear; any other group without a manifest is not ours.
CREATING_KEY = "defeat_cache_creating"
# manifest keys compared on resume / by the reader's callers; the rest (created time,
# complete flag, software version, derived descriptions) are volatile or derived.
COMPARED_KEYS = ("schema_version", "codec", "layout", "provenance")


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


def _software_version() -> str:
    try:
        from defeat_cache import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _without_ranks(layout: dict | None) -> dict | None:
    """A layout dict without the basis ranks: they are fitted when the cache is created, so a
    resuming run (which has not fitted anything) compares everything else."""
    if not isinstance(layout, dict):
        return layout
    out = dict(layout)
    for key in ("feature_levels", "backbone_levels"):
        out[key] = [{k: v for k, v in lv.items() if k != "stored_channels"} for lv in layout.get(key) or []]
    return out


def comparable_part(layout: CacheLayout, provenance: dict) -> dict:
    """The COMPARED_KEYS of a manifest for this layout and provenance (JSON-normalised)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "codec": layout.codec,
        "layout": _jsonable(layout.to_dict(), "layout"),
        "provenance": _jsonable(provenance, "provenance"),
    }


def new_manifest(layout: CacheLayout, provenance: dict) -> dict:
    """The manifest of a cache being created (complete=False until every shard is done)."""
    manifest = comparable_part(layout, provenance)
    manifest.update({
        "complete": False,
        "created": now(),
        "software_version": _software_version(),
        "meta_columns": meta_columns(layout),
        "rois_columns": ["x1", "y1", "x2", "y2", "objectness"] + ([] if layout.separate_logits else ["logits..."]),
        "feature_compressors": _jsonable(layout.codec_object().describe_compressors(), "compressors"),
    })
    return manifest


def mismatch_message(path, stored: dict, ours: dict) -> str | None:
    """None if the compared parts agree, else a message naming every differing key."""
    def flat(m):
        c = {k: m.get(k) for k in COMPARED_KEYS}
        c["layout"] = _without_ranks(c.get("layout"))
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


def read_manifest(attrs, path) -> tuple[dict, CacheLayout]:
    """The manifest of a group's attributes and the layout it describes; a manifest that is not a
    mapping or has no valid layout is a one-line CacheError. (The caller has checked that the
    attribute exists: without it the group is not a cache at all.)"""
    manifest = attrs.get(MANIFEST_KEY)
    where = f"cache at {path}: its manifest (attribute {MANIFEST_KEY!r} of its zarr.json)"
    if not isinstance(manifest, dict):
        raise CacheError(f"{where} is a {type(manifest).__name__}, not a mapping; {DAMAGED}")
    layout = manifest.get("layout")
    if not isinstance(layout, dict):
        raise CacheError(f"{where} has no layout (the array shapes); {DAMAGED}")
    try:
        parsed = CacheLayout.from_dict(layout)
        parsed.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{where} has an invalid layout ({type(e).__name__}: {e}); {DAMAGED}") from None
    return dict(manifest), parsed
