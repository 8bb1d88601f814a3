"""What an extraction's `--out` holds, found before anything is written there.

Extraction writes only into nothing (a new path, an empty folder or prefix), into its own
cache (resume), or over its own interrupted creation (a group holding the creation marker
`CREATING_KEY` and nothing but names the writer creates). Anything else -- a file, a folder
of other files, a zarr group without our manifest -- is refused with one line and left as it
is: we never delete what we did not create (docs/design.md, invariant 7).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import storage
from .errors import NotACacheError
from .lock import is_lock_file
from .manifest import CREATING_KEY, MANIFEST_KEY

__all__ = ["OutState", "probe_out", "MEMBER_NAMES"]

#: the top-level names a cache's writer creates (layout.py): all an interrupted creation may hold
MEMBER_NAMES = frozenset({"features", "backbone", "bases", "params", "rois", "logits", "meta", "shard_done"})


@dataclass
class OutState:
    #: "new" (nothing there), "cache" (a group with our manifest: resume or refuse a mismatch),
    #: "interrupted" (our creation, stopped before its manifest: cleared and made again)
    kind: str
    attrs: dict | None = None


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def probe_out(path, storage_options: dict | None = None) -> OutState:
    """What `path` holds; raises NotACacheError (one line) for anything extraction must not touch."""
    names = storage.list_names(path, storage_options)
    # the lock's files and zarr's temporary files are ours (a killed writer leaves them)
    names = [n for n in names or [] if not is_lock_file(n) and not n.endswith(".partial")]
    if not names:
        return OutState("new")
    if "zarr.json" not in names:
        what = "already holds objects" if storage.is_url(path) else "is not empty"
        raise NotACacheError(f"{path} {what} and holds no defeat-cache cache ({_some(names)}); refusing to "
                             f"write there: give a new or empty --out")
    group = storage.open_group(path, "r", storage_options)
    attrs = group.attrs.asdict()
    if MANIFEST_KEY in attrs:
        return OutState("cache", attrs)
    foreign = [n for n in names if n != "zarr.json" and n not in MEMBER_NAMES]
    if CREATING_KEY in attrs and not foreign:
        return OutState("interrupted", attrs)
    if CREATING_KEY in attrs:
        raise NotACacheError(f"{path} holds an interrupted defeat-cache creation and other files ({_some(foreign)}); "
                             f"refusing to delete them: move them away or give a new --out")
    raise NotACacheError(f"{path} holds a zarr group that defeat-cache did not create (no manifest; it holds "
                         f"{_some(names)}); refusing to write there: give a new --out, or delete it yourself")
